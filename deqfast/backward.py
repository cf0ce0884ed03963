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

from . import _checks
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
    width = u[0].numel() if B else 0
    u_flat, last_flat = (u.reshape(B, width), last_term.reshape(B, width)) if per_sample else (u.reshape(1, -1), last_term.reshape(1, -1))
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


# An adjoint that stopped within this factor of backward_tol is a modest miss: no warning.
INEXACT_ADJOINT_FACTOR = 10.0


def _warn_inexact_adjoint(caller: str, options: Options, stats: SolverStats) -> None:
    """Warn when the implicit adjoint stopped (at backward_max_iter) with some sample's residual
    above INEXACT_ADJOINT_FACTOR x backward_tol: its gradient is then inexact. Costs one host
    synchronisation per backward (the adjoint loop already makes one every check_every steps).
    Samples that failed (NaN/Inf) are warned about by the solver; backward_tol = 0 asks for exactly
    backward_max_iter steps and is not warned about."""
    tol = options.backward_tol
    if tol <= 0:
        return
    stop_mode = options.backward_stop_mode or options.stop_mode
    criterion = stats.rel_residual if stop_mode == "rel" else stats.residual
    far = ~stats.converged & ~stats.failed & (criterion > INEXACT_ADJOINT_FACTOR * tol)
    n_far = int(far.sum())
    if not n_far:
        return
    worst = float(criterion[far].max())
    _checks.warn(
        f"{caller} backward (implicit): the adjoint solve stopped at backward_max_iter={options.backward_max_iter} "
        f"with a {stop_mode} residual up to {worst:.3g}, more than {INEXACT_ADJOINT_FACTOR:g}x backward_tol={tol:g}, "
        f"for {n_far} of {stats.batch_size} samples: their gradients are inexact. Raise backward_max_iter, use "
        f"backward_solver='anderson' (or 'broyden'), or loosen backward_tol; stats.backward has the per-sample residuals",
        RuntimeWarning,
    )


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
    def forward(ctx, fz, z_leaf, options: Options, stats: SolverStats, on_backward, caller: str = "deqfast.fixed_point"):
        ctx.save_for_backward(fz, z_leaf)
        ctx.caller = caller
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

        caller = ctx.caller

        def vjp(v):
            jtv = torch.autograd.grad(fz, z_leaf, v, retain_graph=True, allow_unused=True)[0]
            if jtv is None:
                raise RuntimeError(
                    f"{caller}: f(z) does not depend on z (e.g. it uses z.detach() or z.data, or ignores z), "
                    f"so backward={options.backward!r} has no Jacobian df/dz to solve with; make f use z "
                    f"differentiably, or use backward='jfb' if f is meant to be constant in z"
                )
            return jtv

        with torch.enable_grad(), _solvers._common.entry(f"{caller} backward"):
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
            if options.backward == "implicit":
                _warn_inexact_adjoint(caller, options, stats)
        ctx.stats.backward = stats
        if ctx.on_backward is not None:
            ctx.on_backward(stats)
        if create_graph:
            u = _not_differentiable_again(u)
        return u, None, None, None, None, None
