"""Anderson acceleration (type II) with ring buffers and an incrementally updated Gram matrix."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _checks
from .. import ops, reference
from ..reference import SampleState, accumulation_dtype
from . import _common, _graph, _history

_compiler = getattr(torch, "compiler", None)
_is_compiling = getattr(_compiler, "is_compiling", None) or (lambda: False)  # torch < 2.3: never


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
    cuda_graph: bool = False,
):
    """Solve z = f(z) by Anderson acceleration; batch dim 0, every decision per sample.

    Each step mixes the last ``m`` f-values: x_next = τ Σ α_j f(x_j) + (1 − τ) Σ α_j x_j with
    α = argmin ‖Σ α_j g_j‖² + λ Σ α_j² ‖g_j‖² subject to Σ α_j = 1 (g_j = f(x_j) − x_j). History lives in ring buffers F, G of shape (B, m, d); each step adds one Gram row
    and does one fixed-shape (m×m) solve per sample with no host synchronisation. With the fused ops a
    step is one op call (deqfast::anderson_fused_step) on scratch buffers allocated once per solve.

    Args:
        f, z0, max_iter, tol, stop_mode, tau, check_every, per_sample: as :func:`fixed_point_iteration`.
        m: history length (>= 1; m = 1 is damped fixed-point iteration); min(m, max_iter) slots
            are allocated, all a solve can fill.
        lam: ridge regulariser (> 0); each weight is penalised relative to its residual's squared norm.
        cuda_graph: on a CUDA state with the fused ops, replay the ``check_every`` iterations
            between host checks (f and the step) from CUDA graphs captured during this solve: the
            same bits as the eager solve, less launch overhead. f must then be capturable (no host
            synchronisation inside it; else a RuntimeError says so and names cuda_graph=False).
            The graphs live for this solve (f's inputs are unknown here); :class:`deqfast.DEQ`
            keeps them across calls. Ignored (the eager solve) on the CPU and wherever the fused
            ops are not used.

    Returns:
        (z, stats): each sample's best iterate (shape of z0) and its :class:`SolverStats`.
    """
    caller = "deqfast.solvers.anderson"
    max_iter, tol, check_every = _common.validate_common(caller, max_iter, tol, stop_mode, check_every)
    m = _checks.check_int(caller, "m", m, 1)
    lam = _checks.check_positive(caller, "lam", lam)  # lam = 0: a singular Gram has no defined weights
    tau = _checks.check_damping(caller, "tau", tau)
    cuda_graph = _checks.check_bool(caller, "cuda_graph", cuda_graph)
    kept = _graph.take() if cuda_graph else None  # DEQ's graphs of earlier solves (before f runs)
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
    workspace = graphs = x_in = x_out = None
    first_graphed = 0  # the first iteration replayed from a graph (set with graphs)
    one_call = False  # the fused path through anderson_fused_step (one op call per step)
    host_done = None  # on the CPU: the step's done flags, read by the host check without an op

    def fused_step(k: int, x: torch.Tensor) -> torch.Tensor:
        """Iteration k on the fused path: f, then one op call (x_next a new tensor; under a CUDA
        graph it comes from the graph's memory pool)."""
        fx = problem(x)
        return ops.anderson_fused_step(x, fx.contiguous(), F, G, gram, state, workspace, min(k + 1, m), k % m, lam, tau)

    def fused_block(k0: int) -> None:
        """Iterations k0 .. k0 + check_every - 1 from x_in, the last iterate into x_out (one graph)."""
        x = x_in
        for k in range(k0, k0 + check_every):
            x = fused_step(k, x)
        x_out.copy_(x)

    k = 0
    while k < max_iter:
        if graphs is not None and k >= first_graphed and k % check_every == 0 and k + check_every <= max_iter:
            x = graphs.run(k, x)  # check_every iterations replayed from a CUDA graph
            k += check_every
            evaluated = k
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
                one_call = fused and not _is_compiling()  # traced by dynamo: the two ops, as before
                if one_call:
                    x = x.contiguous()
                    if cuda_graph and _graph.supported(x):
                        # The rescaled problem's f reads this solve's scale: its graphs cannot be kept.
                        graphs = kept if kept is not None and problem.scale is None else _graph.BlockGraphs()
                        signature = (tuple(x.shape), x.dtype, x.device, m, check_every, lam, tau, state.tol, stop_mode)
                        buffers, reused = graphs.prepare(caller, signature, x, check_every, m,
                                                         lambda: _GraphBuffers(x, m, state, F, G, gram))
                        if reused:
                            buffers.reset(x)
                        F, G, gram, state, workspace = buffers.F, buffers.G, buffers.gram, buffers.state, buffers.workspace
                        x_in, x_out = graphs.x_in, graphs.x_out
                        graphs.block = fused_block
                        first_graphed = _graph.graph_start(m, check_every)
                    else:
                        # One op call per step; its scratch buffers are allocated once per solve.
                        workspace = ops.AndersonWorkspace(x, m)
                        flags = workspace.flags.view(-1)[B:]  # flags (B, 2): improved, then done, as bytes
                        # (not under torch.func.jvp: its wrapped tensors have no storage to read)
                        if x.device.type == "cpu" and not _checks.in_func_transform(flags):
                            host_done = _common.HostDone(flags)
        else:
            fx = problem(x)
        slot = k % m
        if recording:
            gram, x = reference.anderson_recorded_step(x, fx, F, G, gram, state, min(k + 1, m), slot, lam, tau)
        elif one_call:
            x = ops.anderson_fused_step(x, fx.contiguous(), F, G, gram, state, workspace, min(k + 1, m), slot, lam, tau)
        else:
            F, G, partials = ops.anderson_history(x, fx, F, G, slot, fused=fused)
            gram, x = ops.anderson_step(x, F, G, gram, partials, state, min(k + 1, m), slot, lam, tau, fused=fused)
        evaluated = k + 1
        if host_done is not None:
            if host_done.should_stop(k, check_every, max_iter):
                break
        elif _common.should_stop(state, k, check_every, max_iter):
            break
        k += 1
    if graphs is not None and graphs is kept:
        # The buffers stay with the graphs for the next solve: what is returned must not alias them.
        state = state.clone()
        if _history.wanted():
            F, G = F.clone(), G.clone()
    if not recording:  # for backward_warm_start (kept only when asked; see solvers/_history.py)
        _history.offer("anderson", F=F, G=G, filled=min(evaluated, m), newest=(evaluated - 1) % m)
    return _common.finish(problem, state, "anderson")


class _GraphBuffers:
    """The tensors the captured blocks read and write besides x_in, x_out: the history F, G, the
    Gram, the per-sample state and the fused step's workspace (the solve's own, at its start)."""

    def __init__(self, x: torch.Tensor, m: int, state: SampleState, F, G, gram):
        self.F, self.G, self.gram, self.state = F, G, gram, state
        self.workspace = ops.AndersonWorkspace(x, m)

    def reset(self, x0: torch.Tensor) -> None:
        """In place, as a new solve from x0 would allocate them (the graphs keep their addresses)."""
        self.F.zero_()
        self.G.zero_()
        self.gram.zero_()
        self.state.reset(x0)
