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
):
    """Solve z = f(z) by Broyden's method on g(z) = f(z) − z, as in locuslab/deq and torchdeq.

    The inverse Jacobian of g is approximated as H = −I + Σ_i u_i v_iᵀ; each step goes
    z ← z − H g(z) and adds one rank-1 "good Broyden" update. Unlike torchdeq (whose history grows
    with max_iter, locuslab/deq issue 28) at most ``m`` updates are kept, in a ring buffer of shape
    (B, m, d): the oldest is overwritten.

    Args:
        f, z0, max_iter, tol, stop_mode, check_every: as :func:`fixed_point_iteration`.
        m: rank-1 updates kept (>= 1).

    Returns:
        (z, stats): each sample's best iterate (shape of z0) and its :class:`SolverStats`.
    """
    caller = "deqfast.solvers.broyden"
    _common.validate_common(caller, max_iter, tol, stop_mode, check_every)
    _checks.check_int(caller, "m", m, 1)
    problem = _common.FlatProblem(caller, f, z0)
    x = problem.x0
    check_every = _common.resolve_check_every(check_every, x)
    B, d = x.shape
    memory = min(m, max_iter)
    U = torch.zeros(B, memory, d, dtype=x.dtype, device=x.device)
    V = torch.zeros_like(U)
    state = SampleState(x, tol, stop_mode)
    fx = problem(x)
    gx = fx - x
    state.update(x, *squared_norms(x, fx))
    for k in range(1, max_iter):
        if _common.should_stop(state, k - 1, check_every, max_iter):
            break
        # Step: −H g = g − Σ u_i (v_i · g)
        vg = torch.bmm(V, gx.unsqueeze(2))  # (B, memory, 1)
        x_next = state.freeze(x + gx - torch.bmm(U.transpose(1, 2), vg).squeeze(2))
        fx_next = problem(x_next)
        gx_next = fx_next - x_next
        state.update(x_next, *squared_norms(x_next, fx_next))
        if k + 1 == max_iter:
            break
        # Good Broyden update of H: u = (Δx − H Δg) / (vᵀ Δg), vᵀ = Δxᵀ H.
        dx, dg = x_next - x, gx_next - gx
        v = -dx + torch.bmm(torch.bmm(dx.unsqueeze(1), U.transpose(1, 2)), V).squeeze(1)
        h_dg = -dg + torch.bmm(U.transpose(1, 2), torch.bmm(V, dg.unsqueeze(2))).squeeze(2)
        denom = (v * dg).sum(dim=1, keepdim=True)
        u = (dx - h_dg) / denom
        keep = (~state.done).unsqueeze(1) & (denom.abs() > torch.finfo(x.dtype).tiny)
        keep = keep & torch.isfinite(u).all(dim=1, keepdim=True) & torch.isfinite(v).all(dim=1, keepdim=True)
        u = torch.where(keep, u, torch.zeros_like(u))
        v = torch.where(keep, v, torch.zeros_like(v))
        slot = (k - 1) % memory
        if torch.is_grad_enabled() and (u.requires_grad or U.requires_grad):
            index = torch.tensor([slot], device=x.device)
            U = U.index_copy(1, index, u.unsqueeze(1))
            V = V.index_copy(1, index, v.unsqueeze(1))
        else:
            U[:, slot] = u
            V[:, slot] = v
        x, gx = x_next, gx_next
    return _common.finish(problem, state, "broyden")
