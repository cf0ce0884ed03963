"""Backward modes: the autograd Function for the adjoint (implicit / Neumann) and the others.

With g the gradient arriving at z* and J = ∂f/∂z at z*:

* implicit — solve u = g + Jᵀu, then pass u through the one differentiable f step;
* neumann  — u = Σ_{k<K} (Jᵀ)^k g, K = neumann_terms (K = 1 is JFB);
* jfb      — u = g;
* phantom  — backprop through ``phantom_steps`` damped steps z ← (1 − τ) z + τ f(z) from z*;
* bptt     — backprop through the solver's own iterations.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import solvers as _solvers
from .solvers.fixed_point import adjoint_iteration
from .options import Options
from .solvers._common import broadcast_stats, row_norms
from .stats import SolverStats


def neumann_series(vjp: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor, terms: int):
    """u = Σ_{k<terms} (Jᵀ)^k g with ``vjp(v) = Jᵀ v``; terms − 1 VJPs. g: (B, ...)."""
    u = g.clone()
    v = g
    for _ in range(terms - 1):
        v = vjp(v)
        u.add_(v)
    return u, v


def _neumann_stats(u: torch.Tensor, last_term: torch.Tensor, terms: int, tol: float, stop_mode: str,
                   per_sample: bool = True) -> SolverStats:
    B = u.shape[0]
    rows = B if per_sample else 1
    u_flat, last_flat = u.reshape(rows, -1), last_term.reshape(rows, -1)
    # The last term added is the step, hence the residual, of the equivalent adjoint iteration.
    residual = row_norms(last_flat)
    u_norm = row_norms(u_flat)
    rel = residual / u_norm.clamp_min(torch.finfo(residual.dtype).tiny)
    finite = torch.isfinite(residual) & torch.isfinite(u_norm)
    crit = rel if stop_mode == "rel" else residual
    stats = SolverStats(
        nstep=torch.full((rows,), terms, dtype=torch.int64, device=u.device),
        residual=residual,
        rel_residual=rel,
        converged=finite & (crit < tol),
        failed=~finite,
    )
    return stats if per_sample else broadcast_stats(stats, B)


_TWICE = (
    "deqfast: the implicit/neumann gradient is differentiable once; a second derivative through it "
    "(create_graph=True, then differentiating the gradient) is not implemented. backward='jfb', "
    "'phantom' and 'bptt' are plain autograd graphs and support it"
)


def _not_differentiable_again(u: torch.Tensor) -> torch.Tensor:
    """u, as a tensor whose differentiation raises _TWICE (torch's once_differentiable mechanism).

    Always, not only when the incoming gradient requires grad as once_differentiable has it: u
    depends on the parameters through J and z*, which no graph here records, so a second
    derivative that held u constant would be silently wrong."""
    u = u.detach().requires_grad_()
    return torch._C._functions.DelayedError(_TWICE, 1)(u)


class AdjointFunction(torch.autograd.Function):
    """Identity on f(z*) in forward; in backward replaces the incoming g by the adjoint u.

    Inputs: ``fz`` = f(z*) computed with grad from the leaf ``z_leaf`` = z*.detach(). Its graph
    reaches x and every parameter f closes over, so returning u as the gradient of ``fz`` lets
    autograd carry uᵀ ∂f/∂θ to all of them (no hooks, DDP-safe). The VJPs Jᵀv reuse that same
    graph (retain_graph=True): f is never re-run in backward.
    """

    @staticmethod
    def forward(ctx, fz, z_leaf, options: Options, stats: SolverStats, on_backward):
        ctx.save_for_backward(fz, z_leaf)
        ctx.options = options
        ctx.stats = stats
        ctx.on_backward = on_backward
        return fz.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        create_graph = torch.is_grad_enabled()
        fz, z_leaf = ctx.saved_tensors
        options: Options = ctx.options
        grad = grad.detach()

        def vjp(v):
            return torch.autograd.grad(fz, z_leaf, v, retain_graph=True)[0]

        with torch.enable_grad():
            if options.backward == "neumann":
                u, last = neumann_series(vjp, grad, options.neumann_terms)
                stats = _neumann_stats(u, last, options.neumann_terms, options.backward_tol,
                                       options.backward_stop_mode or options.stop_mode, options.per_sample)
            else:
                kwargs = options.solver_kwargs(options.backward_solver, backward=True)
                with torch.no_grad():
                    if options.backward_solver == "fixed_point":
                        del kwargs["tau"]
                        u, stats = adjoint_iteration(vjp, grad, **kwargs)
                    else:
                        solver = _solvers.SOLVERS[options.backward_solver]
                        u, stats = solver(lambda v: grad + vjp(v), torch.zeros_like(grad), **kwargs)
        ctx.stats.backward = stats
        if ctx.on_backward is not None:
            ctx.on_backward(stats)
        if create_graph:
            u = _not_differentiable_again(u)
        return u, None, None, None, None
