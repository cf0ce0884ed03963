"""Damped fixed-point iteration z ← (1 − τ) z + τ f(z), per sample."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _checks
from .. import ops
from ..reference import SampleState
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
    per_sample: bool = True,
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
        per_sample: True (default): dim 0 is a batch of independent samples, each tested, frozen
            and returned at its own best iterate. False: the rows of dim 0 are coupled through f
            (graph nodes, a sequence): one test of the whole state's norms (‖f(z) − z‖ over all
            of it), nothing frozen row by row, one best iterate for all; the stats (each (B,))
            then repeat that one value for every row.

    Returns:
        (z, stats): each sample's best iterate (shape of z0) and its :class:`SolverStats`.
    """
    caller = "deqfast.solvers.fixed_point_iteration"
    max_iter, tol, check_every = _common.validate_common(caller, max_iter, tol, stop_mode, check_every)
    tau = _checks.check_damping(caller, "tau", tau)
    problem = _common.FlatProblem(caller, f, z0, per_sample, stop_mode)
    x = problem.x0
    check_every = _common.resolve_check_every(check_every, x)
    state = SampleState(x, problem.tol_for(tol, stop_mode), stop_mode)
    fused = None
    for k in range(max_iter):
        fx = problem(x)
        if fused is None:  # decided once: f's output requires grad at every iteration or none
            fused = ops.use_fused(x, fx)
        x = ops.fixed_point_step(x, fx, None, state, tau, fused=fused)
        if _common.should_stop(state, k, check_every, max_iter):
            break
    return _common.finish(problem, state, "fixed_point")


def adjoint_iteration(
    vjp: Callable[[torch.Tensor], torch.Tensor],
    g: torch.Tensor,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str,
    check_every: Optional[int] = None,
    per_sample: bool = True,
):
    """Solve u = g + Jᵀu by the iteration u ← g + Jᵀu (``vjp(u) = Jᵀu``), per sample.

    It starts at u = g, the first iterate from u = 0, which saves a VJP of zero: after k
    evaluations u is the (k + 1)-term Neumann sum. The same as
    ``fixed_point_iteration(lambda u: g + vjp(u), g)``, with the accumulation u ← g + v fused
    into the step (one pass) instead of done by the map.
    """
    caller = "deqfast backward (implicit, fixed_point adjoint)"
    problem = _common.FlatProblem(caller, vjp, g.contiguous(), per_sample, stop_mode)
    u = problem.x0
    offset = u
    check_every = _common.resolve_check_every(check_every, u)
    state = SampleState(u, problem.tol_for(tol, stop_mode), stop_mode)
    fused = None
    for k in range(max_iter):
        v = problem(u)
        if fused is None:
            fused = ops.use_fused(u, v, offset)
        u = ops.fixed_point_step(u, v, offset, state, 1.0, fused=fused)
        if _common.should_stop(state, k, check_every, max_iter):
            break
    return _common.finish(problem, state, "fixed_point")
