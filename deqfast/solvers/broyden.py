"""Limited-memory ("good") Broyden on g(z) = f(z) − z, per sample, with a bounded history."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _checks
from ..reference import SampleState, squared_norms
from . import _common


def broyden(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    m: int = 30,
    check_every: Optional[int] = None,
    per_sample: bool = True,
):
    """Solve z = f(z) by Broyden's method on g(z) = f(z) − z, as in locuslab/deq and torchdeq.

    The inverse Jacobian of g is approximated as H = −I + Σ_i u_i v_iᵀ; each step goes
    z ← z − H g(z) and adds one rank-1 "good Broyden" update. Unlike torchdeq (whose history grows
    with max_iter, locuslab/deq issue 28) at most ``m`` updates are kept, in a ring buffer of shape
    (B, m, d): the oldest is overwritten.

    Args:
        f, z0, max_iter, tol, stop_mode, check_every, per_sample: as :func:`fixed_point_iteration`.
        m: rank-1 updates kept (>= 1).

    Returns:
        (z, stats): each sample's best iterate (shape of z0) and its :class:`SolverStats`.
    """
    caller = "deqfast.solvers.broyden"
    _common.validate_common(caller, max_iter, tol, stop_mode, check_every)
    _checks.check_int(caller, "m", m, 1)
    problem = _common.FlatProblem(caller, f, z0, per_sample, stop_mode)
    x = problem.x0
    check_every = _common.resolve_check_every(check_every, x)
    B, d = x.shape
    memory = min(m, max_iter)
    state = SampleState(x, problem.tol_for(tol, stop_mode), stop_mode)
    fx = problem(x)
    gx = fx - x
    state.update(x, *squared_norms(x, fx))
    # While autograd records through the solve (backward="bptt") the history is a list of the
    # updates' own tensors: a (B, m, d) buffer would have to be copied at every step.
    recording = torch.is_grad_enabled() and (fx.requires_grad or x.requires_grad)
    if recording:
        U, V = _ListHistory(memory), _ListHistory(memory)
    else:
        U = torch.zeros(B, memory, d, dtype=x.dtype, device=x.device)
        V = torch.zeros_like(U)
    for k in range(1, max_iter):
        if _common.should_stop(state, k - 1, check_every, max_iter):
            break
        # Step: −H g = g − Σ u_i (v_i · g)
        x_next = state.freeze(x + gx - _low_rank(U, V, gx))
        fx_next = problem(x_next)
        gx_next = fx_next - x_next
        state.update(x_next, *squared_norms(x_next, fx_next))
        if k + 1 == max_iter:
            break
        # Good Broyden update of H: u = (Δx − H Δg) / (vᵀ Δg), vᵀ = Δxᵀ H.
        dx, dg = x_next - x, gx_next - gx
        v = -dx + _low_rank(V, U, dx)  # vᵀ = Δxᵀ(−I + Σ u_i v_iᵀ)
        h_dg = -dg + _low_rank(U, V, dg)
        denom = (v * dg).sum(dim=1, keepdim=True)
        usable = (~state.done).unsqueeze(1) & (denom.abs() > torch.finfo(x.dtype).tiny)
        # Divide by 1 where the update is dropped: a frozen sample has Δx = Δg = 0, and its 0/0,
        # though masked below, would make the gradient NaN under backward="bptt" (0 · ∞ in the
        # division's backward).
        u = (dx - h_dg) / torch.where(usable, denom, torch.ones_like(denom))
        keep = usable & torch.isfinite(u).all(dim=1, keepdim=True) & torch.isfinite(v).all(dim=1, keepdim=True)
        u = torch.where(keep, u, torch.zeros_like(u))
        v = torch.where(keep, v, torch.zeros_like(v))
        slot = (k - 1) % memory
        U[:, slot] = u
        V[:, slot] = v
        x, gx = x_next, gx_next
    return _common.finish(problem, state, "broyden")


def _low_rank(U, V, x: torch.Tensor) -> torch.Tensor:
    """Σ_i U_i (V_i · x) per sample, for (B, m, d) buffers or a recorded ``_ListHistory``."""
    if isinstance(U, _ListHistory):
        terms = [Ui * (Vi * x).sum(dim=1, keepdim=True) for Ui, Vi in zip(U.items, V.items) if Ui is not None]
        return sum(terms) if terms else torch.zeros_like(x)
    return torch.bmm(U.transpose(1, 2), torch.bmm(V, x.unsqueeze(2))).squeeze(2)


class _ListHistory:
    """A ring of m (B, d) tensors written as ``history[:, slot] = value``, without copying."""

    def __init__(self, m: int):
        self.items = [None] * m

    def __setitem__(self, index, value):
        self.items[index[1]] = value
