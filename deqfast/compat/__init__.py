"""torchdeq drop-in: change only the import lines.

    import torchdeq                      ->  import deqfast.compat as torchdeq
    from torchdeq import get_deq         ->  from deqfast.compat import get_deq
    from torchdeq.norm import apply_norm ->  from deqfast.compat.norm import apply_norm
    (also .core, .loss, .utils, .dropout, .solver)

torchdeq 0.1.0's public namespace with its signatures, defaults and semantics, on deqfast's solvers
and adjoint; torchdeq need not be installed. What is identical and what differs: the README's
"From torchdeq" section. deqfast's own API (deqfast.fixed_point, deqfast.DEQ) stays strict; compat
takes what torchdeq takes and warns once about what it ignores.
"""
from .utils import add_deq_args
from .core import register_deq, get_deq, reset_deq

from .solver import *  # noqa: F401,F403
from .norm import *  # noqa: F401,F403
from .dropout import *  # noqa: F401,F403
from .loss import *  # noqa: F401,F403
from .utils import *  # noqa: F401,F403

from . import core, dropout, loss, norm, solver, utils  # noqa: F401
from .core import DEQBase, DEQIndexing, DEQSliced, spectral_radius, torchdeq_info  # noqa: F401
from .utils import DEQConfig  # noqa: F401
from .solver import SolverStat  # noqa: F401
