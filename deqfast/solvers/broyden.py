"""Limited-memory ("good") Broyden on g(z) = f(z) − z, per sample, with a bounded history."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _checks, ops
from ..reference import SampleState, accumulation_dtype
from .._checks import eager_under_compile
from . import _common, _history

# Per-sample sums over d run in pieces of at most this many elements (see _row_sum).
_CHUNK = 16384


def broyden(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    m: int = 5,
    check_every: Optional[int] = None,
    per_sample: bool = True,
):
    """Solve z = f(z) by Broyden's method on g(z) = f(z) − z, as in locuslab/deq and torchdeq.

    The inverse Jacobian of g is approximated as H = −I + Σ_i u_i v_iᵀ; each step goes
    z ← z − H g(z) and adds one rank-1 "good Broyden" update. Unlike torchdeq (whose history grows
    with max_iter, locuslab/deq issue 28) at most ``m`` updates are kept, in a ring buffer of shape
    (B, m, d): the oldest is overwritten. Each product with H runs over the filled slots only.

    A sample's result does not depend on which other samples share the batch (bitwise, on the
    CPU): every per-sample reduction is an elementwise product summed over the sample's own
    elements, in an order fixed by d alone (no batched matmul, whose order changes with B).

    Args:
        f, z0, max_iter, tol, stop_mode, check_every, per_sample: as :func:`fixed_point_iteration`.
        m: rank-1 updates kept (>= 1); default 5, the ``m`` of :func:`deqfast.fixed_point` and
            :class:`deqfast.DEQ` (one default for both ways in). The history takes 2m states of memory.
            torchdeq's ``broyden_solver`` keeps every update (``LBFGS_thres=None``): ``m=max_iter``
            does the same. A longer memory can save evaluations: on benchmarks/cells.py's cells
            (CPU, quick sizes, tol 1e-4 to 1e-6) m = 30 took 0-30% fewer than m = 5.

    Returns:
        (z, stats): each sample's best iterate (shape of z0) and its :class:`SolverStats`.
    """
    caller = "deqfast.solvers.broyden"
    max_iter, tol, check_every = _common.validate_common(caller, max_iter, tol, stop_mode, check_every)
    m = _checks.check_int(caller, "m", m, 1)
    seed = _history.take_seed()  # backward_warm_start's initial H (before f runs: no nested solve takes it)
    problem = _common.FlatProblem(caller, f, z0, per_sample, stop_mode)
    x = problem.x0
    check_every = _common.resolve_check_every(check_every, x)
    B, d = x.shape
    memory = min(m, max_iter)
    acc = accumulation_dtype(x.dtype)
    state = SampleState(x, problem.tol_for(tol, stop_mode), stop_mode)
    fx = problem(x)
    gx = fx - x
    g_sq, f_sq = _squared_norms(gx, fx, acc)
    state.update(x, g_sq, f_sq)
    # While autograd records through the solve (backward="bptt") the history is a list of the
    # updates' own tensors: a (B, m, d) buffer would have to be copied at every step.
    recording = torch.is_grad_enabled() and (fx.requires_grad or x.requires_grad)
    # A seed (U0, V0) of k terms (deqfast.backward: H starts at −M, not −I) fills slots 0 .. k − 1 for
    # the whole solve; the ring of this solve's updates is slots k .. k + memory − 1.
    base = 0 if seed is None or recording else seed[0].shape[1]
    if recording:
        U, V = _ListHistory(memory), _ListHistory(memory)
    else:
        U = torch.empty(B, base + memory, d, dtype=x.dtype, device=x.device)
        V = torch.empty_like(U)
        if base:
            if tuple(seed[0].shape) != (B, base, d) or tuple(seed[1].shape) != (B, base, d):
                raise RuntimeError(f"{caller}: internal: a seed of shapes {tuple(seed[0].shape)}, "
                                   f"{tuple(seed[1].shape)} for a ({B}, {d}) state")
            U[:, :base] = seed[0]
            V[:, :base] = seed[1]
    # The fused ops where ops.use_fused takes the state, decided once per solve: the first step's
    # deqfast::broyden_direction, then one deqfast::broyden_fused_step per iteration (the whole
    # bookkeeping after f: record, restart, update, clear, the next step). The reference below
    # (_step: _h_times, _update) otherwise and while recording.
    fused = not recording and ops.use_fused(x, U, m=base + memory)
    filled = base  # slots 0 .. filled − 1 hold updates (the seed's, then the ring's)
    if fused:
        work = ops.BroydenWorkspace(x, gx, g_sq)
    else:
        # Restart point: each sample's iterate of least ‖g‖ and its g (see _step); pending: history to
        # clear (see ``clear`` below).
        work = _Work(x, gx, g_sq, torch.zeros(B, dtype=torch.bool, device=x.device))
    on_cpu = x.device.type == "cpu"
    if max_iter > 1 and not _common.should_stop(state, 0, check_every, max_iter):
        # Step: −H g = g − Σ u_i (v_i · g)
        h_g = ops.broyden_direction(U, V, work.gx, filled) if fused else _h_times(U, V, work.gx, filled, acc)
        x_next = state.freeze(work.x - h_g)
        for k in range(1, max_iter):
            fx_next = problem(x_next)
            if k + 1 == max_iter:
                state.update(x_next, *_squared_norms(fx_next - x_next, fx_next, acc))
                break
            slot = base + (k - 1) % memory
            # The histories of restarted samples are cleared at the end of their step by the fused op
            # (masked on the device: no synchronisation) and on the CPU; the pure-PyTorch path on an
            # accelerator clears at a host check (reading pending there is a synchronisation). A clear
            # deferred made the later iterates depend on check_every (a sample converging at 71
            # evaluations with check_every=1 ran to max_iter=100 with 4).
            clear = fused or on_cpu or k % check_every == 0
            if fused:
                x_next = ops.broyden_fused_step(x_next, fx_next, work, U, V, state, filled, slot, clear)
            else:
                x_next = _step(x_next, fx_next, work, U, V, state, filled, slot, clear, acc)
            filled = min(filled + 1, base + memory)
            if _common.should_stop(state, k, check_every, max_iter):
                break
    if not recording:
        # H's update pairs (H ≈ (J − I)⁻¹ near z*), for backward_warm_start; kept only when asked.
        _history.offer("broyden", U=U[:, :filled], V=V[:, :filled])
    return _common.finish(problem, state, "broyden")


class _Work:
    """The reference path's running tensors (rebound, not written in place: autograd may record
    them): the current iterate x and its g, the restart point (restart_x, restart_g, restart_sq) and
    the restarted samples whose history the next step with ``clear`` zeroes (pending)."""

    def __init__(self, x, gx, g_sq, pending):
        self.x, self.gx = x, gx
        self.restart_x, self.restart_g, self.restart_sq = x, gx, g_sq
        self.pending = pending


@eager_under_compile  # its Python-int filled, slot, clear: dynamo would recompile it at every iteration
def _step(x_next, fx_next, work, U, V, state: SampleState, filled: int, slot: int, clear: bool,
          acc: torch.dtype, h_times=None, update=None) -> torch.Tensor:
    """Everything an iteration does after f (the reference of deqfast::broyden_fused_step): record
    the evaluation fx_next = f(x_next) in ``state``, restart a sample that blew up, Broyden's update of H into
    ``slot``, with ``clear`` clear the histories of the samples that restarted, and
    return the next iterate x − H g (a finished sample's best iterate). ``work`` (a _Work) moves to
    the new point. ``h_times``/``update``: _h_times/_update by default (the tests pass the per-op
    fused path's)."""
    h_times = h_times or (lambda U_, V_, v, n: _h_times(U_, V_, v, n, acc))
    update = update or (lambda *a: _update(*a, acc))
    gx_next = fx_next - x_next
    g_sq, f_sq = _squared_norms(gx_next, fx_next, acc)
    state.update(x_next, g_sq, f_sq)
    # Restart: with a bounded ring of rank-1 updates (the oldest overwritten, as torchdeq's
    # LBFGS_thres) H can lose the secant structure and walk a sample away from a point it had
    # nearly solved (seen: rel residual 7.7e-11, then 1e25). A sample whose ‖g‖ grows past
    # _RESTART × its least ‖g‖ goes back to that point, and its history is cleared (``clear``) at the
    # end of this step, or on the pure-PyTorch path on an accelerator at the next host check (until
    # then its H is still used, but no update from the jump enters it). Nothing changes for a sample that never blows up.
    better = g_sq < work.restart_sq
    work.restart_x = torch.where(better.unsqueeze(1), x_next, work.restart_x)
    work.restart_g = torch.where(better.unsqueeze(1), gx_next, work.restart_g)
    work.restart_sq = torch.where(better, g_sq, work.restart_sq)
    blown = ~state.done & (g_sq > (_RESTART * _RESTART) * work.restart_sq)
    work.pending = work.pending | blown
    x_next = torch.where(blown.unsqueeze(1), work.restart_x, x_next)
    gx_next = torch.where(blown.unsqueeze(1), work.restart_g, gx_next)
    # Good Broyden update of H: u = (Δx − H Δg) / (vᵀ Δg), vᵀ = Δxᵀ H.
    accept = ~state.done & ~blown
    update(x_next - work.x, gx_next - work.gx, U, V, accept, filled, slot)
    filled = min(filled + 1, len(U.items) if isinstance(U, _ListHistory) else U.shape[1])
    work.x, work.gx = x_next, gx_next
    if clear and bool(work.pending.any()):
        _clear(U, V, work.pending, filled)
        work.pending = torch.zeros_like(work.pending)
    # Step: −H g = g − Σ u_i (v_i · g)
    return state.freeze(work.x - h_times(U, V, work.gx, filled))


# A sample whose ‖g‖ exceeds this factor times its least ‖g‖ so far restarts from that point
# (deqfast::broyden_fused_step: kBroydenRestartSq = _RESTART², csrc/deqfast_numerics.h).
_RESTART = 1e3


def _clear(U, V, samples: torch.Tensor, filled: int) -> None:
    """Zero the history of ``samples`` (B,) bool: H = −I for them again."""
    keep = ~samples
    if isinstance(U, _ListHistory):
        for history in (U, V):
            history.items = [None if t is None else t * keep.unsqueeze(1).to(t.dtype) for t in history.items]
        return
    U[:, :filled] *= keep.view(-1, 1, 1).to(U.dtype)
    V[:, :filled] *= keep.view(-1, 1, 1).to(V.dtype)


@eager_under_compile
def _update(dx, dg, U, V, accept: torch.Tensor, filled: int, slot: int, acc: torch.dtype) -> None:
    """The good Broyden update of H = −I + Σ_{i<filled} U_i V_iᵀ into slot ``slot`` (the reference of
    deqfast::broyden_update): v = Hᵀ Δx, u = (Δx − H Δg) / (v · Δg). A sample keeps it where ``accept``
    (not done, not restarted), |v · Δg| > tiny and u, v are finite; else the slot keeps its older update
    (slot < filled: a sample frozen early keeps its H, which backward_warm_start reuses) or is zeroed."""
    v = _h_times(V, U, dx, filled, acc)  # vᵀ = Δxᵀ(−I + Σ u_i v_iᵀ): Hᵀ Δx
    h_dg = _h_times(U, V, dg, filled, acc)
    denom = _row_sum(v * dg, acc).unsqueeze(1)
    usable = accept.unsqueeze(1) & (denom.abs() > torch.finfo(denom.dtype).tiny)
    # Divide by 1 where the update is dropped: a frozen sample has Δx = Δg = 0, and its 0/0,
    # though masked below, would make the gradient NaN under backward="bptt" (0 · ∞ in the
    # division's backward).
    u = ((dx - h_dg) / torch.where(usable, denom, torch.ones_like(denom))).to(dx.dtype)
    keep = usable & torch.isfinite(u).all(dim=1, keepdim=True) & torch.isfinite(v).all(dim=1, keepdim=True)
    if slot < filled:
        U[:, slot] = torch.where(keep, u, U[:, slot])
        V[:, slot] = torch.where(keep, v, V[:, slot])
    else:
        U[:, slot] = torch.where(keep, u, torch.zeros_like(u))
        V[:, slot] = torch.where(keep, v, torch.zeros_like(v))


def _row_sum(p: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """p.sum(-1) in ``acc``, each row summed in an order that depends on its length only.

    torch's CPU sum keeps a row's order whatever the other rows, except when the whole reduction
    has one output and at least 32768 elements: then it splits the row between threads. Summing
    pieces of at most _CHUNK (< 32768) elements first, then the pieces, never takes that path."""
    d = p.shape[-1]
    if d <= _CHUNK:
        return p.sum(-1, dtype=acc)
    main = d - d % _CHUNK
    s = p[..., :main].unflatten(-1, (main // _CHUNK, _CHUNK)).sum(-1, dtype=acc).sum(-1)
    if main < d:
        s = s + p[..., main:].sum(-1, dtype=acc)
    return s


def _squared_norms(gx: torch.Tensor, fx: torch.Tensor, acc: torch.dtype):
    """(‖g‖², ‖f‖²) per sample, (B,) in ``acc``, independent of the batch's other samples."""
    return _row_sum(gx * gx, acc), _row_sum(fx * fx, acc)


@eager_under_compile
def _h_times(U, V, x: torch.Tensor, filled: int, acc: torch.dtype) -> torch.Tensor:
    """(−I + Σ_i U_i V_iᵀ) x per sample, over the ``filled`` slots of (B, m, d) buffers (or the
    items of a recorded ``_ListHistory``). Swapping U and V gives the transpose's product."""
    if isinstance(U, _ListHistory):
        out = -x
        for Ui, Vi in zip(U.items, V.items):
            if Ui is not None:
                out = out + Ui * _row_sum(Vi * x, acc).to(x.dtype).unsqueeze(1)
        return out
    if filled == 0:
        return -x
    coef = _row_sum(V[:, :filled] * x.unsqueeze(1), acc).to(x.dtype)  # (B, n): v_i · x
    return (U[:, :filled] * coef.unsqueeze(2)).sum(dim=1) - x


class _ListHistory:
    """A ring of m (B, d) tensors written as ``history[:, slot] = value``, without copying."""

    def __init__(self, m: int):
        self.items = [None] * m

    def __getitem__(self, index):
        return self.items[index[1]]

    def __setitem__(self, index, value):
        self.items[index[1]] = value
