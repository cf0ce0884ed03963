"""Fixed-point solvers (no autograd of their own): each takes (f, z0, **keywords) and returns (z, stats)."""
from .anderson import anderson
from .broyden import broyden
from .fixed_point import fixed_point_iteration

SOLVERS = {
    "anderson": anderson,
    "fixed_point": fixed_point_iteration,
    "broyden": broyden,
}

__all__ = ["anderson", "broyden", "fixed_point_iteration", "SOLVERS"]
