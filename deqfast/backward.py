"""Backward modes: the autograd Function for the adjoint (implicit / Neumann) and the others.

With g the gradient arriving at z* and J = ∂f/∂z at z*:

* implicit — solve u = g + Jᵀu, then pass u through the one differentiable f step;
* neumann  — u = Σ_{k<K} (Jᵀ)^k g, K = neumann_terms (K = 1 is JFB);
* jfb      — u = g;
* phantom  — backprop through ``phantom_steps`` damped steps z ← (1 − τ) z + τ f(z) from z*;
* bptt     — backprop through the solver's own iterations.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from . import _checks, ops
from . import solvers as _solvers
from .solvers import _common, _history
from .solvers.fixed_point import adjoint_iteration
from .options import Options
from .reference import SampleState, accumulation_dtype
from .solvers._common import broadcast_stats, row_norms
from .solvers.broyden import _row_sum  # per-sample sums in an order set by d alone
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


def _warn_failed_neumann(caller: str, stats: SolverStats) -> None:
    """The Neumann series is no solver (nothing freezes or warns in it): warn, as the adjoint
    solvers do, when it produced NaN/Inf for some samples (one host synchronisation)."""
    n_failed = int(stats.failed.sum())
    if n_failed:
        _checks.warn(
            f"{caller} backward (neumann): the Neumann series produced NaN/Inf for {n_failed} of {stats.batch_size} "
            f"samples: their gradients are not finite; stats.backward.failed marks them",
            RuntimeWarning,
        )


# An adjoint that stopped within this factor of backward_tol is a modest miss: no warning.
INEXACT_ADJOINT_FACTOR = 10.0


def _warn_inexact_adjoint(caller: str, options: Options, stats: SolverStats, dtype: torch.dtype = torch.float32,
                          what: str = "adjoint") -> None:
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
    max_iter, names = options.backward_max_iter, ("backward_max_iter", "backward_solver", "backward_tol", "stats.backward")
    if caller == "deqfast.compat":  # the user set torchdeq's keywords (compat's Broyden adjoint: b_max_iter + 1 evaluations)
        max_iter -= options.backward_solver == "broyden"
        names = ("b_max_iter", "b_solver", "b_tol", "the backward_writer's info")
    eps = torch.finfo(dtype).eps
    precision = ""
    if stop_mode == "rel" and tol < eps:
        # a relative residual below the state's rounding is met, if ever, only by an exact fixed point
        precision = (f" ({names[2]}={tol:g} is below the rounding of the {str(dtype).replace('torch.', '')} "
                     f"state, {eps:.2g}: a tolerance above it, e.g. {_reachable_tol(eps):g}, is what it can meet)")
    _checks.warn(
        (f"{caller} backward (implicit): the adjoint solve" if what == "adjoint" else f"{caller}: the {what} solve (implicit)")
        + f" stopped at {names[0]}={max_iter} "
        f"with {'an' if stop_mode == 'abs' else 'a'} {stop_mode} residual up to {worst:.3g}, more than {INEXACT_ADJOINT_FACTOR:g}x {names[2]}={tol:g}, "
        f"for {n_far} of {stats.batch_size} samples: their {'gradients' if what == 'adjoint' else what + 's'} are inexact. Raise {names[0]}, use "
        f"{names[1]}='anderson' (or 'broyden'), or loosen {names[2]}{precision}"
        + (f"; {names[3]} has the per-sample residuals" if what == "adjoint" else ""),
        RuntimeWarning,
    )


def _reachable_tol(eps: float) -> float:
    """The power of ten just above a dtype's rounding eps: 1e-2 for bfloat16, 1e-3 for float16,
    1e-6 for float32, 1e-15 for float64 (the README's advice for the 16-bit types)."""
    return 10.0 ** math.ceil(math.log10(eps))


_TWICE = (
    "deqfast: a second derivative through backward={backward!r} (create_graph=True, then differentiating the "
    "gradient, e.g. a gradient penalty) is {reason}. It is exact for backward='implicit' where deqfast knows "
    "every tensor f differentiates through: deqfast.DEQ with an nn.Module cell (its parameters and x) or a plain "
    "cell whose only such tensor is x, and fixed_point with an nn.Module f (its parameters). Not supported: "
    "backward='neumann', f reading other tensors that require grad (or computed before its call), third "
    "derivatives. backward='jfb', 'phantom' and 'bptt' are plain autograd graphs and support it"
)
_TWICE_COMPAT = (
    "deqfast.compat: the IFT gradient (ift=True or hook_ift=True) is differentiable once; a second "
    "derivative through it (create_graph=True, then differentiating the gradient, e.g. a loss on "
    "d output / d input) is not implemented: torchdeq's f is a closure whose tensors deqfast cannot "
    "re-evaluate (deqfast.DEQ with an nn.Module cell and backward='implicit' supports it exactly). Without ift "
    "and hook_ift (torchdeq's default), grad=k "
    "(torchdeq's phantom gradient, as deq-zoo's INR configs use) is a plain autograd graph and supports it. "
    "(torchdeq 0.1.0 runs this case but holds the adjoint constant: its second derivative is not exact)"
)


def _twice_message(caller: str, backward: str, reason) -> str:
    if caller.startswith("deqfast.compat"):
        return _TWICE_COMPAT
    return _TWICE.format(backward=backward, reason=reason or "not implemented for backward={!r}".format(backward))


def _not_differentiable_again(u: torch.Tensor, caller: str, *depends_on: torch.Tensor, reason=None,
                              backward: str = "neumann") -> torch.Tensor:
    """u, as a tensor whose differentiation raises _TWICE (_TWICE_COMPAT under deqfast.compat), torch's
    once_differentiable mechanism.

    Always, not only when the incoming gradient requires grad as once_differentiable has it: u
    depends on the parameters through J and z*, which no graph here records, so a second
    derivative that held u constant would be silently wrong. The error node takes ``depends_on``
    (f(z*), whose graph reaches x and every parameter, and the incoming gradient) as inputs too:
    autograd runs only the nodes on a path to the tensors asked for, and an error node on a
    detached u alone was skipped by ``torch.autograd.grad(..., inputs=params)``, which then
    returned the second derivative without u's part (found: 4.67 where the exact value is 8.09)."""
    inputs = [u.detach().requires_grad_()] + [t for t in depends_on if t is not None and t.requires_grad]
    message = _twice_message(caller, backward, reason)
    out = torch._C._functions.DelayedError(message, len(inputs))(*inputs)
    return out[0] if isinstance(out, tuple) else out


def _pop_history(ctx):
    """ctx.history, removed from ctx: the solve frees its buffers once the preconditioner is built."""
    history, ctx.history = ctx.history, None
    return history


# --- second derivatives through backward="implicit" ---------------------------------------------
#
# The gradient a parameter θ gets is ∂f/∂θᵀ u, u = (I − Jᵀ)⁻¹ g, all at z*(θ). Differentiating it
# again needs (1) u as a differentiable function of g, z* and θ, and (2) z* itself as one of θ. Both
# are implicit functions, whose derivatives are solves with J or Jᵀ; the graph f builds in forward
# (at a detached z*, the one f evaluation of the first-order path) has neither. So under
# create_graph=True the backward re-evaluates f at z* once more, as a function of explicit tensors:
#   z  = _FixedPoint(z*; θ)           value z*, VJP ζ̄ ↦ ∂f/∂θᵀ (I − Jᵀ)⁻¹ ζ̄ (implicit_vjp again);
#   f_c = f(z, θ') with θ' = aliases of θ (so ∂/∂θ' is the partial at fixed z; z reaches θ itself);
#   v  = _AdjointValue(g + Jᵀv*)      value v* (the adjoint solve), VJP v̄ ↦ w = (I − J)⁻¹ v̄ into
#                                     g + Jᵀv*: g gets w, (z, θ') get ∂(wᵀJᵀv*) (Jᵀv* one differentiable VJP);
#   ∂L/∂θ = autograd.grad(f_c, θ', v, create_graph=True).
# Returned through the AdjointFunction's θ inputs, this is the first-order gradient (same value) with
# a graph whose derivative is exact. It needs the tensors f differentiates through as inputs of the
# forward's Function: deqfast.DEQ passes its cell's parameters and x (:class:`ExplicitF`).


class ExplicitF:
    """f(z) as a function of z and of the tensors it differentiates through (``tensors``): the
    parameters (requiring grad) of an nn.Module f or cell, and x's tensors requiring grad, called with
    those tensors replaced (torch.func.functional_call)."""

    def __init__(self, fn, x=None, has_x: bool = False):
        self.fn = fn
        self.has_x = has_x
        module = fn if isinstance(fn, torch.nn.Module) else None
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad] if module is not None else []
        self.names = [n for n, _ in named]
        self.x = x
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        self.x_slots = [i for i, t in enumerate(xs) if has_x and isinstance(t, torch.Tensor) and t.requires_grad]
        self.tensors = [p for _, p in named] + [xs[i] for i in self.x_slots]
        self.layout = None  # a PackedState: f maps packed (B, D) states
        self.first_node = None  # the autograd sequence number at which f's call at z* began, if known

    def packed(self, layout) -> "ExplicitF":
        out = object.__new__(ExplicitF)
        out.__dict__.update(self.__dict__)
        out.layout = layout
        return out

    def __call__(self, z: torch.Tensor, tensors) -> torch.Tensor:
        if self.layout is not None:
            inner = object.__new__(ExplicitF)
            inner.__dict__.update(self.__dict__)
            inner.layout = None
            return self.layout.wrap(lambda parts: inner(parts, tensors))(z)
        n = len(self.names)
        args = (z,)
        if self.has_x:
            x = self.x
            if self.x_slots:
                xs = list(x) if isinstance(x, (list, tuple)) else [x]
                for slot, t in zip(self.x_slots, tensors[n:]):
                    xs[slot] = t
                x = type(x)(xs) if isinstance(x, (list, tuple)) else xs[0]
            args = (z, x)
        if self.module is None:
            return self.fn(*args)
        return torch.func.functional_call(self.module, dict(zip(self.names, tensors[:n])), args, strict=False)


def _twice_unsupported(explicit, fz: torch.Tensor, z_leaf: torch.Tensor):
    """None where a second derivative through implicit is exact (see above), else why not (for _TWICE).

    f's forward graph is walked once (only under create_graph=True): every tensor requiring grad it
    reaches besides z* must be one of ``explicit.tensors`` (a leaf parameter, or x where it is the
    output of an earlier computation: the walk stops there), and every other node it passes must have
    been made during f's call (a tensor computed before it from the parameters, e.g. a cached weight,
    would be held constant by the re-evaluation with the parameters replaced)."""
    if explicit is None:
        return "not implemented here: f is a closure, whose tensors deqfast cannot re-evaluate f with"
    known = {id(t) for t in explicit.tensors}
    stops = {t.grad_fn for t in explicit.tensors if t.grad_fn is not None}
    first = explicit.first_node
    seen, stack = set(), [fz.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            if variable is not z_leaf and id(variable) not in known:
                shape = tuple(variable.shape)
                return (f"not implemented here: f reads a tensor requiring grad (shape {shape}) that is neither a "
                        f"parameter of the module nor x")
            continue
        if first is not None and node._sequence_nr() < first:
            return (f"not implemented here: f reads a tensor requiring grad computed before its call "
                    f"({node.name()}), neither a parameter of the module nor x")
        stack.extend(next_node for next_node, _ in node.next_functions)
    return None


def implicit_vjp(cotangent: torch.Tensor, z_star: torch.Tensor, explicit: ExplicitF, options: Options, caller: str,
                 create_graph: bool):
    """(∂f/∂θᵀ (I − Jᵀ)⁻¹ c for θ in explicit.tensors (None where unused), the adjoint solve's stats), at
    the fixed point z*: the VJP of z*(θ). With create_graph, a graph exact to second order (see above)."""
    theta = explicit.tensors
    with torch.enable_grad():
        z = _FixedPoint.apply(z_star, explicit, options, caller, *theta) if create_graph else \
            z_star.detach().requires_grad_()
        aliases = [t.view_as(t) for t in theta]
        fz = explicit(z, aliases)

        def vjp(v):
            jtv = torch.autograd.grad(fz, z, v, retain_graph=True, allow_unused=True)[0]
            return torch.zeros_like(v) if jtv is None else jtv

        v, stats = solve_adjoint(vjp, cotangent.detach(), options, None, caller)
        if create_graph:
            jtv = torch.autograd.grad(fz, z, v, create_graph=True, allow_unused=True)[0]
            y = cotangent if jtv is None else cotangent + jtv
            if y.requires_grad:
                v = _AdjointValue.apply(y, v, _TransposedSolve(fz, z, options, caller))
        grads = torch.autograd.grad(fz, aliases, v, create_graph=create_graph, allow_unused=True)
    return grads, stats


class _TransposedSolve:
    """w = (I − J)⁻¹ v̄, i.e. w = v̄ + J w, with J w from the graph of f_c by the double-VJP trick."""

    def __init__(self, fz, z, options: Options, caller: str):
        self.fz, self.z, self.options, self.caller = fz, z, options, caller

    def __call__(self, v_bar: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            lam = torch.zeros_like(self.z, requires_grad=True)
            jt_lam = torch.autograd.grad(self.fz, self.z, lam, create_graph=True, allow_unused=True)[0]

            def jvp(w):
                if jt_lam is None or not jt_lam.requires_grad:
                    return torch.zeros_like(w)
                jw = torch.autograd.grad(jt_lam, lam, w, retain_graph=True, allow_unused=True)[0]
                return torch.zeros_like(w) if jw is None else jw

            w, _ = solve_adjoint(jvp, v_bar.detach(), self.options, None, self.caller + " (second order)")
        return w


class _AdjointValue(torch.autograd.Function):
    """Value v* (the solved adjoint); backward replaces v̄ by (I − J)⁻¹ v̄ on y = g + Jᵀv*."""

    @staticmethod
    def forward(ctx, y, v, transposed_solve):
        ctx.transposed_solve = transposed_solve
        return v.detach().clone()

    @staticmethod
    def backward(ctx, v_bar):
        w = ctx.transposed_solve(v_bar)
        if torch.is_grad_enabled():  # a third derivative
            w = _not_differentiable_again(w, "deqfast", v_bar, reason="exact to second order only: a third "
                                          "derivative is not implemented", backward="implicit")
        return w, None, None


class _FixedPoint(torch.autograd.Function):
    """z* as a function of the tensors f differentiates through: value z*, VJP ζ̄ ↦ ∂f/∂θᵀ (I − Jᵀ)⁻¹ ζ̄."""

    @staticmethod
    def forward(ctx, z_star, explicit, options, caller, *theta):
        ctx.explicit, ctx.options, ctx.caller = explicit, options, caller
        ctx.save_for_backward(z_star)
        return z_star.detach().clone()

    @staticmethod
    def backward(ctx, z_bar):
        z_star, = ctx.saved_tensors
        grads, _ = implicit_vjp(z_bar, z_star, ctx.explicit, ctx.options, ctx.caller,
                                create_graph=torch.is_grad_enabled())
        return (None, None, None, None) + tuple(grads)


def solve_adjoint(vjp: Callable[[torch.Tensor], torch.Tensor], grad: torch.Tensor, options: Options, history,
                  caller: str):
    """u = g + Jᵀu (``implicit``: ``backward_solver`` to ``backward_tol``, warm-started from the forward's
    ``history`` where given) or u = Σ_{k<K} (Jᵀ)^k g (``neumann``), with ``vjp(v) = Jᵀv``. Returns (u, stats)."""
    with _solvers._common.entry(f"{caller} backward"):
        if options.backward == "neumann":
            u, last = neumann_series(vjp, grad, options.neumann_terms)
            stats = _neumann_stats(u, last, options.neumann_terms, options.backward_tol,
                                   options.backward_stop_mode or options.stop_mode, options.per_sample)
            _warn_failed_neumann(caller, stats)
        else:
            kwargs = options.solver_kwargs(options.backward_solver, backward=True)
            with torch.no_grad():
                precondition = warm_preconditioner(history, grad, options.lam)
                history = None
                if precondition is not None and options.backward_solver == "fixed_point":
                    del kwargs["tau"]
                    u, stats = warm_adjoint_iteration(vjp, grad, precondition, **kwargs)
                elif precondition is not None and options.backward_solver == "anderson":
                    del kwargs["tau"]
                    u, stats = warm_adjoint_anderson(vjp, grad, precondition, **kwargs)
                elif options.backward_solver == "fixed_point":
                    del kwargs["tau"]
                    u, stats = adjoint_iteration(vjp, grad, **kwargs)
                else:
                    solver = _solvers.SOLVERS[options.backward_solver]
                    rows = grad.shape[0] if options.per_sample else 1
                    u0 = torch.zeros_like(grad) if precondition is None else \
                        precondition(grad.reshape(rows, -1)).reshape(grad.shape)
                    # Broyden warm-started: H starts at −M (from the forward's history), not −I.
                    seeded = precondition is not None and options.backward_solver == "broyden"
                    with _history.seed(*precondition.broyden_seed(grad.dtype)) if seeded else contextlib.nullcontext():
                        u, stats = solver(lambda v: grad + vjp(v), u0, **kwargs)
    if options.backward == "implicit":
        _warn_inexact_adjoint(caller, options, stats, grad.dtype)
    # A non-finite g fails its sample's solve; the solvers' failure warning synchronised already.
    if bool(stats.failed.any()):
        u = _keep_non_finite(u, grad, options.per_sample)
    return u, stats


def solve_tangent(f: Callable[[torch.Tensor], torch.Tensor], z_star: torch.Tensor, f_dot: torch.Tensor,
                  options: Options, caller: str) -> torch.Tensor:
    """Forward-mode AD through the fixed point: the tangent t of z* = f(z*) solves t = J t + ḟ,
    with ḟ the tangent of f(z*) from the tangents of what f closes over (x, parameters) and J = ∂f/∂z.

    ``implicit``: the map t ↦ J t + ḟ, which is the tangent of one forward-mode evaluation of f at
    the dual (z*, t) (the closed-over tensors carry their own tangents, which add ḟ), solved by
    ``backward_solver`` to ``backward_tol`` (at most ``backward_max_iter`` evaluations, from t = ḟ,
    the first iterate from 0). ``neumann``: t = Σ_{k<K} J^k ḟ, K = neumann_terms (K − 1 evaluations).
    f runs under no_grad (no reverse graph is recorded). Returns the tangent (shape of z*)."""
    from torch.autograd import forward_ad

    def tangent_map(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = f(forward_ad.make_dual(z_star, t.view_as(z_star) if t.shape != z_star.shape else t))
        tangent = forward_ad.unpack_dual(out).tangent
        tangent = _checks.unwrap_jvp(tangent) if under_jvp else tangent
        # f's value may carry no tangent where nothing it reads has one (J t = 0 and ḟ = 0 there)
        return torch.zeros_like(z_star) if tangent is None else tangent

    f_dot = f_dot.detach()
    under_jvp = _checks.jvp_level() is not None
    name = "forward-mode tangent"
    with torch.no_grad(), _solvers._common.entry(f"{caller} {name}"):
        if options.backward == "neumann":
            t = f_dot
            last = f_dot
            for _ in range(options.neumann_terms - 1):
                t_next = tangent_map(t)
                last, t = t_next - t, t_next
            stats = _neumann_stats(t, last, options.neumann_terms, options.backward_tol,
                                   options.backward_stop_mode or options.stop_mode, options.per_sample)
            _warn_failed_neumann(f"{caller} ({name})", stats)
            return t
        kwargs = options.solver_kwargs(options.backward_solver, backward=True)
        t, stats = _solvers.SOLVERS[options.backward_solver](tangent_map, f_dot, **kwargs)
    _warn_inexact_adjoint(f"{caller} ({name})", options, stats, f_dot.dtype, what="tangent")
    return t


class AdjointFunction(torch.autograd.Function):
    """Identity on f(z*) in forward; in backward replaces the incoming g by the adjoint u.

    Inputs: ``fz`` = f(z*) computed with grad from the leaf ``z_leaf`` = z*.detach(). Its graph
    reaches x and every parameter f closes over, so returning u as the gradient of ``fz`` lets
    autograd carry uᵀ ∂f/∂θ to all of them (no hooks, DDP-safe). The VJPs Jᵀv reuse that same
    graph (retain_graph=True): f is never re-run in backward.

    Forward-mode AD: ``tangent`` (z*'s, from :func:`solve_tangent`) is what :meth:`jvp` returns.
    ``explicit`` (an :class:`ExplicitF`) and its tensors ``theta`` (inputs, whose first-order gradient
    is None: they reach them through f's graph): under create_graph=True the backward returns their
    gradients built for exact second derivatives instead (:func:`implicit_vjp`), f's graph unused.
    """

    @staticmethod
    def forward(ctx, fz, z_leaf, options: Options, stats: SolverStats, on_backward, caller: str = "deqfast.fixed_point",
                history=None, tangent=None, explicit=None, *theta):
        ctx.save_for_backward(fz, z_leaf)
        # explicit: f as a function of z and the tensors it differentiates through (``theta``, inputs
        # here so that a second-order gradient can reach them; their first-order gradient is None)
        ctx.explicit = explicit
        ctx.tangent = tangent  # forward-mode AD: z*'s tangent, solved by solve_tangent
        ctx.caller = caller
        ctx.options = options
        ctx.stats = stats
        ctx.on_backward = on_backward
        ctx.history = history  # the forward solver's history (backward_warm_start), else None
        return fz.detach().clone()

    @staticmethod
    def jvp(ctx, *input_tangents):
        """Forward-mode AD: the tangent of z*, solved before apply (:func:`solve_tangent`)."""
        if ctx.tangent is None:  # pragma: no cover - solve() always solves it where fz has a tangent
            raise RuntimeError(f"{ctx.caller}: internal error: a forward-mode tangent reached the adjoint "
                               f"Function without the tangent of z* solved")
        tangent, ctx.tangent = ctx.tangent, None
        return tangent

    @staticmethod
    def backward(ctx, grad):
        options: Options = ctx.options
        if _checks.in_func_transform(grad):
            raise RuntimeError(
                f"{ctx.caller}: backward={options.backward!r} cannot run under batched gradients "
                f"(torch.autograd.grad(..., is_grads_batched=True), torch.autograd.functional.jacobian(..., "
                f"vectorize=True), a vmap over the backward): its adjoint solver works on plain tensors. Compute "
                f"one gradient at a time (is_grads_batched=False, vectorize=False), or use backward='jfb', "
                f"'phantom' or 'bptt' (plain autograd graphs)"
            )
        create_graph = torch.is_grad_enabled()
        fz, z_leaf = ctx.saved_tensors
        grad_in, grad = grad, grad.detach()

        caller = ctx.caller
        # deqfast.compat's backward_writer records each evaluation (v, Jᵀv) for torchdeq's traces.
        record = getattr(ctx.on_backward, "record_evaluation", None)

        def vjp(v):
            jtv = torch.autograd.grad(fz, z_leaf, v, retain_graph=True, allow_unused=True)[0]
            if jtv is None:
                raise RuntimeError(
                    f"{caller}: f(z) does not depend on z (e.g. it uses z.detach() or z.data, or ignores z), "
                    f"so backward={options.backward!r} has no Jacobian df/dz to solve with; make f use z "
                    f"differentiably, or use backward='jfb' if f is meant to be constant in z"
                )
            if record is not None:
                record(v, jtv, grad)
            return jtv

        explicit = getattr(ctx, "explicit", None)
        n_theta = len(explicit.tensors) if explicit is not None else 0
        if create_graph and options.backward == "implicit":
            unsupported = _twice_unsupported(explicit, fz, z_leaf)
            if unsupported is None:
                # Exact second derivatives: the gradient built from differentiable pieces (implicit_vjp).
                ctx.history = None
                grads, stats = implicit_vjp(grad_in, z_leaf.detach(), explicit, options, caller, create_graph=True)
                ctx.stats.backward = stats
                if ctx.on_backward is not None:
                    ctx.on_backward(stats)
                return (None,) * 9 + tuple(grads)
        else:
            unsupported = None

        with torch.enable_grad():
            u, stats = solve_adjoint(vjp, grad, options, _pop_history(ctx), caller)
        ctx.stats.backward = stats
        if ctx.on_backward is not None:
            ctx.on_backward(stats)
        if create_graph:
            u = _not_differentiable_again(u, caller, fz, grad_in, reason=unsupported, backward=options.backward)
        return (u,) + (None,) * (8 + n_theta)


def _keep_non_finite(u: torch.Tensor, grad: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """u, except that a sample whose incoming gradient holds Inf/NaN gets that gradient itself.

    The Anderson and Broyden adjoint solvers freeze a sample that produces NaN/Inf at its best
    finite iterate (u0 = 0 at worst): an overflowed incoming gradient then came out as a finite
    parameter gradient, silently, and AMP's GradScaler, which skips a step and lowers its scale
    only when it finds Inf/NaN in the gradients, applied the step (the fixed-point adjoint and the
    Neumann series propagated the non-finite values; so does autograd through any explicit layer).
    Called only when some sample's adjoint failed, which a non-finite g always makes it do."""
    rows = grad.shape[0] if per_sample else 1
    finite = torch.isfinite(grad.reshape(rows, -1)).all(dim=1)
    return torch.where(finite.view((rows,) + (1,) * (grad.dim() - 1)), u, grad)


# --- backward_warm_start -------------------------------------------------------------------------
#
# The forward Anderson/Broyden solve leaves secant pairs of g(z) = f(z) − z near z*: steps s and
# residual changes Δg ≈ (J − I) s, i.e. y = −Δg ≈ A s with A = I − J. The adjoint solves Aᵀu = g.
# From the pairs, H ≈ A⁻¹ (H y = s); M = Hᵀ ≈ A⁻ᵀ starts the adjoint at u₀ = M g and preconditions
# its steps u ← u + M r, r = g + Jᵀu − u (one VJP each). Preconditioned, the iteration matrix
# I − M Aᵀ = (I − A H)ᵀ has the eigenvalues of I − H A, which H removes on the span of the forward's
# steps: where those hold J's slow modes (eigenvalues near 1; the same for J and Jᵀ) the adjoint
# converges faster. It stops on the same residual ‖g + Jᵀu − u‖ and tolerance as the plain adjoint,
# so the gradient is as exact; a sample whose best residual stops improving takes plain steps from there.
# With backward_solver="anderson" the preconditioned steps are Anderson-mixed (warm_adjoint_anderson).
# With "broyden" the adjoint's Broyden starts at u₀ = M g with H = −M instead of −I (SHINE's refine).


class LowRankPreconditioner:
    """M = I + Σ_i P_i Q_iᵀ per sample, P and Q (B, k, d): M r = r + Σ_i P_i (Q_i · r).

    The per-sample dot products run over d in an order set by d alone (_row_sum) and the sum over
    the k terms by torch.bmm, which does not split it: a sample's M r does not depend on the batch."""

    def __init__(self, P: torch.Tensor, Q: torch.Tensor, acc: torch.dtype):
        self.P, self.Q, self.acc = P, Q, acc
        self._fused = None  # (U, V) = (−P, Q) for deqfast::broyden_direction, decided at the first call

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        if self._fused is None:
            k = self.P.shape[1]
            U, V = (-self.P).contiguous(), self.Q.contiguous()
            usable = U.dtype == V.dtype == r.dtype and ops.use_fused(r, U, V, m=k)
            self._fused = (U, V) if usable else False
        if self._fused:
            # M r = r + Σ P_i (Q_i · r) = −(−I + Σ (−P_i) Q_iᵀ) r: Broyden's fused product (no (B, k, d)
            # temporary; per-sample sums in an order set by d alone).
            U, V = self._fused
            return -ops.broyden_direction(U, V, r, U.shape[1])
        coef = _row_sum(self.Q * r.unsqueeze(1), self.acc).unsqueeze(1).to(self.P.dtype)  # (B, 1, k)
        return r + torch.bmm(coef, self.P).squeeze(1).to(r.dtype)

    def broyden_seed(self, dtype: torch.dtype):
        """(U, V) with −M = −I + Σ_i U_i V_iᵀ: the initial H of a Broyden solve of the adjoint's
        g(u) = g + Jᵀu − u, whose Jacobian is −(I − Jᵀ): H ≈ its inverse −(I − Jᵀ)⁻¹ ≈ −M (SHINE's "refine")."""
        return (-self.P).to(dtype).contiguous(), self.Q.to(dtype).contiguous()


# A secant pair whose ‖y‖ is below this many roundings of ‖f‖ is not used (warm_preconditioner).
_PAIR_ROUNDING = 16.0


def warm_preconditioner(history, like: torch.Tensor, lam: float):
    """M ≈ (I − Jᵀ)⁻¹ from the forward solver's history (a :class:`LowRankPreconditioner`, r (B, d)
    -> M r), or None (no history)."""
    if history is None or history.kind is None:
        return None
    t = history.tensors
    acc = accumulation_dtype(like.dtype)
    if history.kind == "broyden":
        # Broyden's H_b = −I + Σ u_i v_iᵀ ≈ (J − I)⁻¹ = −A⁻¹, so M = −H_bᵀ: M r = r − Σ v_i (u_i · r).
        U, V = t["U"], t["V"]
        if U.shape[1] == 0:
            return None
        return LowRankPreconditioner(-V, U, acc)
    # Anderson: slots hold f(x_j) and g_j; pairs against the newest slot r: s_j = x_j − x_r,
    # y_j = −(g_j − g_r). H = I + (S − Y)(YᵀY)⁻¹Yᵀ (the least change from I with H Y = S), so
    # M = Hᵀ: M r = r + Y (YᵀY)⁻¹ (S − Y)ᵀ r, with a Jacobi-scaled ridge λ on YᵀY; as I + P Qᵀ:
    # Q = S − Y (s_j − y_j = f(x_j) − f(x_r)) and P = Y (YᵀY + ridge)⁻ᵀ.
    F, G, n, newest = t["F"], t["G"], t["filled"], t["newest"]
    others = [j for j in range(n) if j != newest]
    if not others:
        return None
    index = torch.tensor(others, device=F.device)
    D = F.index_select(1, index) - F[:, newest].unsqueeze(1)
    Y = G[:, newest].unsqueeze(1) - G.index_select(1, index)
    # YᵀY from Y itself, not from the solver's Gram of the g_j (y_i·y_j = g_r·g_r − g_r·g_i − ...
    # cancels catastrophically when y is small against g), one row per pass.
    gram = torch.stack([_row_sum(Y[:, i].unsqueeze(1) * Y, acc) for i in range(len(others))], dim=1)  # (B, k, k)
    diag = gram.diagonal(dim1=1, dim2=2)
    # A pair carries information only if y_j stands well above the rounding of f (in s_j − y_j =
    # f(x_j) − f(x_r), whose error is about eps·‖f‖): else (s − y)/‖y‖ is noise of size up to 1 and
    # M would be I plus a random rank-1 term (seen in bfloat16 near convergence). Such pairs are dropped.
    f_sq = _row_sum(F[:, newest] * F[:, newest], acc)
    floor = (_PAIR_ROUNDING * torch.finfo(F.dtype).eps) ** 2 * f_sq
    usable = (diag > torch.finfo(acc).tiny) & (diag > floor.unsqueeze(1))
    inv_sqrt = torch.where(usable, diag.clamp_min(torch.finfo(acc).tiny).rsqrt(), 0.0)
    scaled = gram * (inv_sqrt.unsqueeze(2) * inv_sqrt.unsqueeze(1))
    k = len(others)
    eye = torch.eye(k, dtype=acc, device=F.device)
    system = scaled + eye * torch.where(usable, max(lam, 1e-8), 1.0).unsqueeze(1)
    inverse, info = torch.linalg.inv_ex(system)
    inverse = inverse * (inv_sqrt.unsqueeze(2) * inv_sqrt.unsqueeze(1))  # (YᵀY + ridge)⁻¹, unscaled
    ok = (info == 0) & torch.isfinite(inverse).flatten(1).all(dim=1)
    inverse = torch.where(ok.view(-1, 1, 1), inverse, torch.zeros_like(inverse))  # M = I for a bad sample
    # P_j = Σ_i inverse_ij Y_i: M r = r + Σ_i Y_i Σ_j inverse_ij (D_j · r). A sum over k: bmm.
    P = torch.bmm(inverse.transpose(1, 2), Y.to(acc))
    return LowRankPreconditioner(P, D, acc)


def _warm_problem(caller, vjp, g, precondition, tol, stop_mode, check_every, per_sample):
    """The warm-started adjoint's flat problem from u₀ = M g, with g flattened (and rescaled along
    with u), its SampleState and check_every. The problem's first VJP, at u₀, is the loop's first;
    vjp and M are linear, so a power-of-two rescaling of the range (FlatProblem) scales g with u."""
    rows = g.shape[0] if per_sample else 1
    g_flat = g.contiguous().reshape(rows, -1)
    problem = _common.FlatProblem(caller, vjp, precondition(g_flat).reshape(g.shape), per_sample, stop_mode)
    if problem.scale is not None:
        g_flat = g_flat * problem.scale
    state = SampleState(problem.x0, problem.tol_for(tol, stop_mode), stop_mode)
    return problem, g_flat, state, _common.resolve_check_every(check_every, problem.x0)


def warm_adjoint_iteration(vjp, g: torch.Tensor, precondition, *, max_iter: int, tol: float, stop_mode: str,
                           check_every=None, per_sample: bool = True):
    """Solve u = g + Jᵀu from u₀ = M g by u ← u + M (g + Jᵀu − u), per sample (see above).

    Stats as :func:`adjoint_iteration`'s: nstep counts VJPs, the residual is ‖g + Jᵀu − u‖ at the
    returned (best) u. A sample whose best residual does not improve at a step takes plain steps
    u ← g + Jᵀu from there on. With per_sample=False the whole state is one row, as in
    the forward solve whose history M comes from."""
    problem, g_flat, state, check_every = _warm_problem("deqfast backward (implicit, warm-started adjoint)", vjp, g,
                                                        precondition, tol, stop_mode, check_every, per_sample)
    u = problem.x0
    plain = torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
    fused = None
    for k in range(max_iter):
        jtu = problem(u)
        if fused is None:
            fused = ops.use_fused(u, jtu, g_flat)
        best = (state.rel_residual if state.rel else state.residual).clone()
        # h = g + Jᵀu, recorded in the state at u (residual ‖h − u‖), frozen samples at their best:
        # the plain adjoint's step, one fused op.
        h = ops.fixed_point_step(u, jtu, g_flat, state, 1.0, fused=fused)
        # A sample whose best residual did not improve at this step takes plain steps from here.
        plain = plain | ~((state.rel_residual if state.rel else state.residual) < best)
        u = torch.where(plain.unsqueeze(1) | state.done.unsqueeze(1), h, u + precondition(h - u))
        if _common.should_stop(state, k, check_every, max_iter):
            break
    return _common.finish(problem, state, "fixed_point")


def warm_adjoint_anderson(vjp, g: torch.Tensor, precondition, *, max_iter: int, tol: float, stop_mode: str,
                          m: int, lam: float, check_every=None, per_sample: bool = True):
    """Solve u = g + Jᵀu by Anderson acceleration of the preconditioned map u ↦ u + M r,
    r = g + Jᵀu − u, from u₀ = M g (one VJP per step).

    The history holds the preconditioned steps p = M r (the map's residuals) and the mixing weights
    minimise ‖Σ α_j p_j‖ (type-II Anderson on the map, with the ridge of :func:`anderson`), but every
    decision -- best iterate, convergence, the stats -- is taken on the true residual ‖r‖ (relative:
    ‖r‖ / ‖g + Jᵀu‖), as in the plain adjoint: the same tolerance means the same gradient. A sample
    whose best ‖r‖ has not improved for max(2m, 8) steps drops M (p = r: plain Anderson on the
    adjoint) from there on, so a poor M costs steps, never the answer."""
    # state: every decision, on the true residual
    problem, g_flat, state, check_every = _warm_problem("deqfast backward (implicit, warm-started Anderson adjoint)",
                                                        vjp, g, precondition, tol, stop_mode, check_every, per_sample)
    u, acc = problem.x0, state.residual.dtype
    B, d = u.shape
    m = min(m, max_iter)
    F = torch.zeros(B, m, d, dtype=u.dtype, device=u.device)
    G = torch.zeros_like(F)
    gram = torch.zeros(B, m, m, dtype=acc, device=u.device)
    # The Anderson step's own bookkeeping (on p): tolerance 0, so it never finishes a sample.
    mixing = SampleState(u, 0.0, "abs")
    patience = max(2 * m, 8)
    plain = torch.zeros(B, dtype=torch.bool, device=u.device)
    stalled = torch.zeros(B, dtype=torch.int64, device=u.device)
    fused = workspace = None
    for k in range(max_iter):
        h = g_flat + problem(u)
        r = h - u
        best = state.rel_residual if state.rel else state.residual
        done = state.update(u, _row_sum(r * r, acc), _row_sum(h * h, acc))
        improved = (state.rel_residual if state.rel else state.residual) < best
        stalled = torch.where(improved, 0, stalled + 1)
        plain = plain | (stalled >= patience)
        fu = u + torch.where(plain.unsqueeze(1), r, precondition(r))  # the map's value u + p
        if fused is None:
            fused = ops.use_fused(u, fu, F, G, m=m)
            workspace = ops.AndersonWorkspace(u, m) if fused else None
        slot, n_filled = k % m, min(k + 1, m)
        if fused:
            u_next = ops.anderson_fused_step(u.contiguous(), fu.contiguous(), F, G, gram, mixing, workspace, n_filled,
                                             slot, lam, 1.0)
        else:
            _, _, partials = ops.anderson_history(u, fu, F, G, slot, fused=False)
            gram, u_next = ops.anderson_step(u, F, G, gram, partials, mixing, n_filled, slot, lam, 1.0, fused=False)
        u = torch.where(done.unsqueeze(1), state.best_x, u_next)
        if _common.should_stop(state, k, check_every, max_iter):
            break
    return _common.finish(problem, state, "anderson")
