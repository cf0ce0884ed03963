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

# torchdeq's deeper module paths (DEQ-LM's `from torchdeq.utils.mem import mem_gc`, the docs'
# torchdeq.solver.anderson, ...): each a module of deqfast.compat holding compat's objects under
# torchdeq's names, so that `torchdeq.<path>` -> `deqfast.compat.<path>` works in any import line.
# Registered in sys.modules (the import system finds them there once deqfast.compat is imported,
# which importing any of them does first). torchdeq.grad and torchdeq.utils.layer_utils (internals
# of its cores) and torchdeq.solver.utils (its solvers' bookkeeping) have no counterpart here.
_MODULE_PATHS = {
    "utils.mem": ["mem_gc"], "utils.arg_utils": ["add_deq_args"], "utils.config": ["DEQConfig"],
    "utils.init": ["mixed_init"], "loss.correction": ["fp_correction", "register_weight_func"],
    "loss.jacobian": ["jac_reg", "power_method"],
    "norm.base_norm": ["apply_norm", "reset_norm", "remove_norm", "register_norm", "register_norm_module"],
    "norm.weight_norm": ["WeightNorm"], "norm.spectral_norm": ["SpectralNorm"],
    "solver.anderson": ["anderson_solver"], "solver.broyden": ["broyden_solver"],
    "solver.fp_iter": ["fixed_point_iter", "simple_fixed_point_iter"], "solver.stat": ["SolverStat"],
}


def _register_module_paths():
    import sys
    import types
    for path, names in _MODULE_PATHS.items():
        parent_name, leaf = path.split(".")
        parent = globals()[parent_name]
        module = types.ModuleType(f"{__name__}.{path}", f"torchdeq.{path} in deqfast.compat: "
                                  f"{', '.join(names)} (the objects of deqfast.compat.{parent_name}).")
        for name in names:
            setattr(module, name, getattr(parent, name))
        module.__all__ = list(names)
        sys.modules[module.__name__] = module
        setattr(parent, leaf, module)


_register_module_paths()
