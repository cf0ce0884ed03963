"""Anderson acceleration (type II) with ring buffers and an incrementally updated Gram matrix."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _checks
from .. import ops, reference
from ..reference import SampleState, accumulation_dtype
from . import _common, _history


def anderson(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    m: int = 5,
    lam: float = 1e-4,
    tau: float = 1.0,
    check_every: Optional[int] = None,
    per_sample: bool = True,
):
    """Solve z = f(z) by Anderson acceleration; batch dim 0, every decision per sample.

    Each step mixes the last ``m`` f-values: x_next = τ Σ α_j f(x_j) + (1 − τ) Σ α_j x_j with
    α = argmin ‖Σ α_j g_j‖² + λ Σ α_j² ‖g_j‖² subject to Σ α_j = 1 (g_j = f(x_j) − x_j). History lives in ring buffers F, G of shape (B, m, d); each step adds one Gram row
    and does one fixed-shape (m×m) solve per sample with no host synchronisation.

    Args:
        f, z0, max_iter, tol, stop_mode, tau, check_every, per_sample: as :func:`fixed_point_iteration`.
        m: history length (>= 1; m = 1 is damped fixed-point iteration); min(m, max_iter) slots
            are allocated, all a solve can fill.
        lam: ridge regulariser (> 0); each weight is penalised relative to its residual's squared norm.

    Returns:
        (z, stats): each sample's best iterate (shape of z0) and its :class:`SolverStats`.
    """
    caller = "deqfast.solvers.anderson"
    _common.validate_common(caller, max_iter, tol, stop_mode, check_every)
    _checks.check_int(caller, "m", m, 1)
    _checks.check_positive(caller, "lam", lam)  # lam = 0: a singular Gram has no defined weights
    _checks.check_damping(caller, "tau", tau)
    problem = _common.FlatProblem(caller, f, z0, per_sample, stop_mode)
    x = problem.x0
    check_every = _common.resolve_check_every(check_every, x)
    B, d = x.shape
    # A solve of max_iter evaluations fills at most max_iter slots: with m >= max_iter, slot = k and
    # n_filled = k + 1 whether the ring has m or max_iter slots, so the smaller one decides the same.
    m = min(m, max_iter)
    gram = torch.zeros(B, m, m, dtype=accumulation_dtype(x.dtype), device=x.device)
    state = SampleState(x, problem.tol_for(tol, stop_mode), stop_mode)
    F = G = None
    recording = fused = False
    for k in range(max_iter):
        fx = problem(x)
        slot = k % m
        if k == 0:
            # Differentiating through the solve (backward="bptt") when f's output carries a graph:
            # then the history is a list of the iterates' own tensors (nothing copied per step).
            recording = torch.is_grad_enabled() and (fx.requires_grad or x.requires_grad)
            if recording:
                F, G = [None] * m, [None] * m
            else:
                F = torch.zeros(B, m, d, dtype=x.dtype, device=x.device)
                G = torch.zeros_like(F)
                fused = ops.use_fused(x, fx, F, G, m=m)  # the same for every iteration of the solve
        if recording:
            gram, x = reference.anderson_recorded_step(x, fx, F, G, gram, state, min(k + 1, m), slot, lam, tau)
        else:
            F, G, partials = ops.anderson_history(x, fx, F, G, slot, fused=fused)
            gram, x = ops.anderson_step(x, F, G, gram, partials, state, min(k + 1, m), slot, lam, tau, fused=fused)
        if _common.should_stop(state, k, check_every, max_iter):
            break
    if not recording:  # for backward_warm_start (kept only when asked; see solvers/_history.py)
        _history.offer("anderson", F=F, G=G, filled=min(k + 1, F.shape[1]), newest=slot)
    return _common.finish(problem, state, "anderson")
