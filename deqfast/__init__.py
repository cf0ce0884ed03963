"""deqfast: fast Deep Equilibrium layers for PyTorch.

    z, stats = deqfast.fixed_point(f, z0, solver="anderson", backward="implicit")
    layer = deqfast.DEQ(cell, max_iter=30); z = layer(x)
"""
from . import compat, solvers
from ._extension import extension_info, load_extension
from .dropout import VariationalDropout, reset_dropout
from .functional import fixed_point
from .layer import DEQ
from .regularization import jacobian_penalty
from .stats import SolverStats

__version__ = "0.1.0"

# Registers torch.ops.deqfast.* when deqfast._C is built (never raises; see extension_info()).
load_extension()

__all__ = [
    "fixed_point", "DEQ", "SolverStats", "solvers", "compat", "extension_info",
    "jacobian_penalty", "VariationalDropout", "reset_dropout", "__version__",
]
