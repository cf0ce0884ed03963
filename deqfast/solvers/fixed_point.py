"""Damped fixed-point iteration z ← (1 − τ) z + τ f(z), per sample."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _checks
from ..reference import SampleTracker, residual_norms
from . import _common


def fixed_point_iteration(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    tau: float = 1.0,
    check_every: Optional[int] = None,
):
    """Solve z = f(z) by damped iteration; batch dim 0, every decision per sample.

    Args:
        f: z -> f(z), same shape, dtype and device as z0.
        z0: (B, ...) initial iterate.
        max_iter: evaluations of f at most.
        tol: a sample converges when its residual (``stop_mode`` "abs": ‖f(z) − z‖,
            "rel": ‖f(z) − z‖ / ‖f(z)‖) drops below tol; it is then frozen.
        tau: damping in (0, 1].
        check_every: evaluations between the host checks that end the loop once every sample is
            done (default 1 on the CPU, 4 on accelerators). It never changes a result.

    Returns:
        (z, stats): each sample's best iterate (shape of z0) and its :class:`SolverStats`.
    """
    caller = "deqfast.solvers.fixed_point_iteration"
    _common.validate_common(caller, max_iter, tol, stop_mode, check_every)
    _checks.check_damping(caller, "tau", tau)
    problem = _common.FlatProblem(caller, f, z0)
    x = problem.x0
    check_every = _common.resolve_check_every(check_every, x)
    tracker = SampleTracker(x, tol, stop_mode)
    for k in range(max_iter):
        fx = problem(x)
        tracker.update(x, *residual_norms(x, fx))
        if k + 1 == max_iter or _common.should_stop(tracker, k, check_every):
            break
        x_next = fx if tau == 1.0 else torch.lerp(x, fx, tau)
        x = tracker.freeze(x_next)
    return _common.finish(problem, tracker, "fixed_point")
