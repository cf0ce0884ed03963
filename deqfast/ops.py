"""The solver steps, fused when deqfast._C is compiled for the tensor's device, else the reference.

Each function here has the signature of its reference in :mod:`deqfast.reference` and the same
result (up to the order of floating-point sums). The fused path is taken when the extension is
loaded and compiled for the device, autograd is not recording through the step (``bptt`` needs
the differentiable reference), and the dtype and history length are supported. A solver decides
that once per solve (:func:`use_fused`) and passes ``fused=``; without it each call decides.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._checks import eager_under_compile
from ._extension import fused_available
from .reference import SampleState

_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def num_chunks(d: int) -> int:
    """Chunks of one sample the fused reductions use (csrc/deqfast_numerics.h: kChunk = 4096)."""
    return (d + 4095) // 4096


def use_fused(*tensors: torch.Tensor, m: int = 0) -> bool:
    """Whether the fused ops take these tensors (the first one the state) with history length m."""
    x = tensors[0]
    if torch.is_grad_enabled():
        for t in tensors:
            if t.requires_grad:
                return False
    if x.dtype not in _FUSED_DTYPES:
        return False
    device = x.device
    if device.type == "cuda" and m > 32:
        return False
    return fused_available(device)


def _state_tensors(state: SampleState):
    return state.best_x, state.residual, state.rel_residual, state.nstep, state.converged, state.failed


@eager_under_compile(recursive=False)
def anderson_history(x, fx, F, G, slot: int, fused: Optional[bool] = None):
    """Pass A; see :func:`deqfast.reference.anderson_history`. Returns (F, G, partials)."""
    if use_fused(x, fx, F, G, m=F.shape[1]) if fused is None else fused:
        partials = torch.ops.deqfast.anderson_history(x.contiguous(), fx.contiguous(), F, G, slot)
        return F, G, partials
    return reference.anderson_history(x, fx, F, G, slot)


@eager_under_compile(recursive=False)
def anderson_step(x, F, G, gram, partials, state: SampleState, n_filled: int, slot: int, lam: float, tau: float,
                  fused: Optional[bool] = None):
    """Pass B; see :func:`deqfast.reference.anderson_step`. Returns (gram, x_next)."""
    if use_fused(x, F, G, gram, m=F.shape[1]) if fused is None else fused:
        x_next = torch.ops.deqfast.anderson_step(
            x.contiguous(), F, G, gram, partials, *_state_tensors(state), n_filled, slot, float(lam), float(tau),
            float(state.tol), state.rel,
        )
        return gram, x_next
    return reference.anderson_step(x, F, G, gram, partials, state, n_filled, slot, lam, tau)


class AndersonWorkspace:
    """The scratch buffers of :func:`anderson_fused_step` for a (B, d) state and history m, allocated
    once per solve: partials (B, C, m + 1) and alpha (B, m) in the accumulation dtype, flags (B, 2)."""

    __slots__ = ("partials", "alpha", "flags")

    def __init__(self, x: torch.Tensor, m: int):
        B, d = x.shape
        acc = reference.accumulation_dtype(x.dtype)
        self.partials = torch.empty(B, num_chunks(d), m + 1, dtype=acc, device=x.device)
        self.alpha = torch.empty(B, m, dtype=acc, device=x.device)
        self.flags = torch.empty(B, 2, dtype=torch.uint8, device=x.device)


@eager_under_compile(recursive=False)
def anderson_fused_step(x, fx, F, G, gram, state: SampleState, workspace: AndersonWorkspace, n_filled: int,
                        slot: int, lam: float, tau: float):
    """Both passes of an Anderson step in one op call (deqfast::anderson_fused_step) on the scratch
    buffers of ``workspace``; returns x_next, a new tensor. The same bits as :func:`anderson_history`
    then :func:`anderson_step` on the fused path. x and fx must be contiguous."""
    return torch.ops.deqfast.anderson_fused_step.default(
        x, fx, F, G, gram, workspace.partials, workspace.alpha, workspace.flags, state.best_x, state.residual,
        state.rel_residual, state.nstep, state.converged, state.failed, n_filled, slot, float(lam), float(tau),
        float(state.tol), state.rel,
    )


def fixed_point_step(x, fx, offset, state: SampleState, tau: float, fused: Optional[bool] = None):
    """See :func:`deqfast.reference.fixed_point_step`. Returns x_next."""
    if fused is None:
        fused = use_fused(x, fx) if offset is None else use_fused(x, fx, offset)
    if fused:
        offset = None if offset is None else offset.contiguous()
        return torch.ops.deqfast.fixed_point_step(x.contiguous(), fx.contiguous(), offset, *_state_tensors(state), float(tau),
                                                    float(state.tol), state.rel)
    return reference.fixed_point_step(x, fx, offset, state, tau)


@eager_under_compile(recursive=False)
def broyden_direction(U, V, x, filled: int):
    """(−I + Σ_{i<filled} U_i V_iᵀ) x per sample (deqfast::broyden_direction), a new (B, d) tensor; with U
    and V swapped, the transpose's product. The fused path of deqfast.solvers.broyden's ``_h_times``:
    U, V contiguous (B, m, d) buffers; x is made contiguous."""
    return torch.ops.deqfast.broyden_direction.default(U, V, x.contiguous(), filled)


@eager_under_compile(recursive=False)
def broyden_update(dx, dg, U, V, accept, filled: int, slot: int) -> None:
    """Broyden's good rank-1 update into slot ``slot`` of U, V in place (deqfast::broyden_update): the
    fused path of deqfast.solvers.broyden's ``_update``, with the same keep rule (``accept`` (B,) bool:
    the samples whose update may be kept)."""
    torch.ops.deqfast.broyden_update.default(dx.contiguous(), dg.contiguous(), U, V, accept.contiguous(), filled, slot)


class BroydenWorkspace:
    """The running tensors of :func:`broyden_fused_step`, written in place by each call: the current
    iterate x and its residual gx (B, d), the restart point restart_x, restart_g (B, d) and
    restart_sq (B,) (each sample's iterate of least ‖g‖ so far, its g and ‖g‖²), and pending (B,)
    bool (the restarted samples whose history the next call with ``clear`` zeroes). Built from the first
    evaluation (x0, g(x0), ‖g(x0)‖²) as contiguous copies."""

    __slots__ = ("x", "gx", "restart_x", "restart_g", "restart_sq", "pending")

    def __init__(self, x: torch.Tensor, gx: torch.Tensor, g_sq: torch.Tensor):
        copy = lambda t: t.detach().clone(memory_format=torch.contiguous_format)  # noqa: E731
        self.x, self.gx = copy(x), copy(gx)
        self.restart_x, self.restart_g, self.restart_sq = copy(x), copy(gx), copy(g_sq)
        self.pending = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)


@eager_under_compile(recursive=False)
def broyden_fused_step(x_next, fx_next, work: BroydenWorkspace, U, V, state: SampleState, filled: int, slot: int,
                       clear: bool) -> torch.Tensor:
    """One Broyden iteration after f in one op call (deqfast::broyden_fused_step): record the evaluation
    fx_next = f(x_next) in ``state``, restart the samples that blew up, the good Broyden update into
    ``slot``, with ``clear`` clear the histories of the samples that restarted, and return
    the next iterate (a new tensor). ``work`` and U, V are updated in place. The same bits as
    deqfast.solvers.broyden's ``_step`` over :func:`broyden_direction` and :func:`broyden_update` (its
    residual and norms are computed by the same ATen ops)."""
    return torch.ops.deqfast.broyden_fused_step.default(
        x_next, fx_next.contiguous(), work.x, work.gx, U, V, work.restart_x, work.restart_g, work.restart_sq,
        work.pending, state.best_x, state.residual, state.rel_residual, state.nstep, state.converged, state.failed,
        filled, slot, bool(clear), float(state.tol), state.rel,
    )
