"""Anderson acceleration (type II) with ring buffers and an incrementally updated Gram matrix."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _checks
from .. import ops, reference
from ..reference import SampleState, accumulation_dtype
from . import _common, _graph


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
    cuda_graph: bool = False,
):
    """Solve z = f(z) by Anderson acceleration; batch dim 0, every decision per sample.

    Each step mixes the last ``m`` f-values: x_next = τ Σ α_j f(x_j) + (1 − τ) Σ α_j x_j with
    α = argmin ‖Σ α_j g_j‖² + λ Σ α_j² ‖g_j‖² subject to Σ α_j = 1 (g_j = f(x_j) − x_j). History lives in ring buffers F, G of shape (B, m, d); each step adds one Gram row
    and does one fixed-shape (m×m) solve per sample with no host synchronisation. With the fused ops a
    step is one op call writing into one of two preallocated buffers: f must not keep a reference to
    its argument past the call (the buffer is overwritten two steps later).

    Args:
        f, z0, max_iter, tol, stop_mode, tau, check_every: as :func:`fixed_point_iteration`.
        m: history length (>= 1; m = 1 is damped fixed-point iteration).
        lam: ridge regulariser; each weight is penalised relative to its residual's squared norm.
        cuda_graph: on a CUDA state with the fused ops, replay the ``check_every`` iterations
            between host checks (f and the step) from CUDA graphs captured during this solve: the
            same bits as the eager solve, less launch overhead. f must then be capturable (no host
            synchronisation inside it; else a RuntimeError says so and names cuda_graph=False).
            Ignored (the eager solve) on the CPU and wherever the fused ops are not used.

    Returns:
        (z, stats): each sample's best iterate (shape of z0) and its :class:`SolverStats`.
    """
    caller = "deqfast.solvers.anderson"
    _common.validate_common(caller, max_iter, tol, stop_mode, check_every)
    _checks.check_int(caller, "m", m, 1)
    _checks.check_real(caller, "lam", lam)
    _checks.check_damping(caller, "tau", tau)
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"{caller}: cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    problem = _common.FlatProblem(caller, f, z0)
    x = problem.x0
    check_every = _common.resolve_check_every(check_every, x)
    B, d = x.shape
    gram = torch.zeros(B, m, m, dtype=accumulation_dtype(x.dtype), device=x.device)
    state = SampleState(x, tol, stop_mode)
    F = G = None
    recording = fused = False
    workspace = buffers = graphs = None

    def fused_step(k: int, x: torch.Tensor) -> torch.Tensor:
        """Iteration k on the fused path: f, then one op call into buffers[k % 2]."""
        fx = problem(x)
        out = buffers[k & 1]
        if not fx.is_contiguous():
            fx = fx.contiguous()
        elif fx.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            out = torch.empty_like(out)  # f returned (a view of) the buffer this step writes
        return ops.anderson_fused_step(x, fx, F, G, gram, state, workspace, out, min(k + 1, m), k % m, lam, tau)

    def fused_block(k0: int, x: torch.Tensor) -> None:
        """Iterations k0 .. k0 + check_every - 1 (one captured graph), ending in buffers[last % 2]."""
        for k in range(k0, k0 + check_every):
            x = fused_step(k, x)
        last = buffers[(k0 + check_every - 1) & 1]
        if x.data_ptr() != last.data_ptr():
            last.copy_(x)

    k = 0
    while k < max_iter:
        if graphs is not None and k >= first_graphed and k % check_every == 0 and k + check_every <= max_iter:
            x = graphs.run(k, x)  # check_every iterations replayed from a CUDA graph
            k += check_every
            if _common.should_stop(state, k - 1, check_every, max_iter):
                break
            continue
        if k == 0:
            fx = problem(x)
            # Differentiating through the solve (backward="bptt") when f's output carries a graph:
            # then the history is a list of the iterates' own tensors (nothing copied per step).
            recording = torch.is_grad_enabled() and (fx.requires_grad or x.requires_grad)
            if recording:
                F, G = [None] * m, [None] * m
            else:
                F = torch.zeros(B, m, d, dtype=x.dtype, device=x.device)
                G = torch.zeros_like(F)
                fused = ops.use_fused(x, fx, F, G, m=m)  # the same for every iteration of the solve
                if fused:
                    # One op call per step into preallocated buffers; x_next alternates between two.
                    workspace = ops.AndersonWorkspace(x, m)
                    buffers = (torch.empty_like(x, memory_format=torch.contiguous_format),
                               torch.empty_like(x, memory_format=torch.contiguous_format))
                    x = x.contiguous()
                    graphs = _graph.maybe_graphs(cuda_graph, x, fused, caller, fused_block, buffers, check_every, m)
                    first_graphed = _graph.graph_start(m, check_every)
        elif recording or not fused:
            fx = problem(x)
        slot = k % m
        if recording:
            gram, x = reference.anderson_recorded_step(x, fx, F, G, gram, state, min(k + 1, m), slot, lam, tau)
        elif fused:
            if k == 0:
                out = buffers[0]
                if not fx.is_contiguous():
                    fx = fx.contiguous()
                x = ops.anderson_fused_step(x, fx, F, G, gram, state, workspace, out, 1, 0, lam, tau)
            else:
                x = fused_step(k, x)
        else:
            F, G, partials = ops.anderson_history(x, fx, F, G, slot, fused=fused)
            gram, x = ops.anderson_step(x, F, G, gram, partials, state, min(k + 1, m), slot, lam, tau, fused=fused)
        if _common.should_stop(state, k, check_every, max_iter):
            break
        k += 1
    return _common.finish(problem, state, "anderson")
