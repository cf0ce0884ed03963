"""deqfast.fixed_point: solve z* = f(z*) and differentiate through it."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch.autograd import forward_ad as _forward_ad
from torch.nn.utils import parametrize as _parametrize

from . import _checks
from . import solvers as _solvers
from .solvers import _history
from ._state import PackedState
from .backward import AdjointFunction, ExplicitF, solve_tangent
from .options import Options
from .solvers._common import measure_at
from .stats import SolverStats


def fixed_point(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    solver: str = "anderson",
    max_iter: int = 50,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    m: int = 5,
    lam: float = 1e-4,
    tau: float = 1.0,
    backward: str = "implicit",
    backward_solver: str = "fixed_point",
    backward_max_iter: int = 50,
    backward_tol: float = 1e-6,
    backward_stop_mode: Optional[str] = None,
    neumann_terms: int = 5,
    phantom_steps: int = 5,
    phantom_tau: float = 0.5,
    check_every: Optional[int] = None,
    per_sample: bool = True,
    backward_warm_start: bool = False,
    cuda_graph: bool = False,
):
    """Solve z* = f(z*) (batch dim 0, every decision per sample) and make it differentiable.

    Gradients reach every tensor f closes over that requires grad (parameters, the input x);
    memory does not grow with the solver's iterations except for ``backward="bptt"``.

    Args:
        f: z -> f(z), same shape, dtype and device as z0.
        z0: (B, ...) initial iterate, floating point, of any layout (it is never written into;
            B = 0 gives an empty result and empty stats); or a list/tuple of such tensors (one batch
            size, dtype and device), for a state of several parts: then f maps such a list/tuple
            to one of the same shapes, and z comes back as one. Stats are per sample, over all parts.
        solver: "anderson" | "fixed_point" | "broyden".
        max_iter, tol, stop_mode: at most max_iter evaluations of f; a sample converges when its
            residual (stop_mode "rel": ‖f(z) − z‖/‖f(z)‖, "abs": ‖f(z) − z‖) is below tol.
        m, lam, tau: Anderson history (also Broyden's), ridge regulariser, damping in (0, 1].
        backward: "implicit" | "neumann" | "jfb" | "phantom" | "bptt" (see the README).
        backward_solver: adjoint solver for "implicit": "fixed_point" | "anderson" | "broyden".
        backward_max_iter, backward_tol, backward_stop_mode: the adjoint solve's limits
            (backward_stop_mode None: the forward stop_mode).
        neumann_terms: "neumann" sums exactly this many terms (>= 1) of Σ_k (Jᵀ)^k g.
        phantom_steps, phantom_tau: "phantom" backprops through this many damped steps from z*.
        check_every: evaluations between host-side convergence checks (default 1 on the CPU,
            4 on accelerators); samples are frozen on the device regardless.
        per_sample: True (default): dim 0 is a batch of independent samples, each tested, frozen
            and returned at its own best iterate. False, when f couples the rows of dim 0 (graph
            nodes, a sequence, diffusion timesteps sharing one state): one convergence test over
            the whole state (‖f(z) − z‖ and ‖f(z)‖ over all of it), nothing frozen row by row,
            one best iterate; stats keep shape (B,), every row holding that one value. The
            adjoint solve of "implicit" (and "neumann"'s stats) follow the same choice.
        backward_warm_start: for backward "implicit" with solver "anderson" or "broyden": keep the
            forward solver's secant history (its m-slot buffers, until backward) and use it as an
            approximate (I − Jᵀ)⁻¹ to start and precondition the adjoint solve, which still runs to
            backward_tol (see the README).
        cuda_graph: solver "anderson" on a CUDA state: replay the check_every iterations between
            host checks from CUDA graphs captured once per solve (same result, less launch
            overhead; f must not synchronise with the host). Here the graphs are captured anew at
            every call, since the tensors f closes over are unknown; :class:`deqfast.DEQ` keeps
            them across calls. Ignored on the CPU.

    Returns:
        (z, stats): f(z*) at each sample's best iterate z* (one differentiable step) for
        implicit, neumann and jfb; the last damped step for phantom; the solver's output for
        bptt. ``stats`` is a :class:`SolverStats`; ``stats.backward`` is filled in by backward.
        For implicit, neumann and jfb its residuals are measured at that final evaluation f(z*)
        (‖f(z*) − z*‖, ‖f(z*)‖) and ``converged`` is the criterion there, so they hold for the
        rows returned together even where f couples them; for phantom and bptt they are the
        solver's, at z*.
    """
    options = Options.build(
        "deqfast.fixed_point", solver=solver, max_iter=max_iter, tol=tol, stop_mode=stop_mode, m=m,
        lam=lam, tau=tau, backward=backward, backward_solver=backward_solver,
        backward_max_iter=backward_max_iter, backward_tol=backward_tol,
        backward_stop_mode=backward_stop_mode, neumann_terms=neumann_terms,
        phantom_steps=phantom_steps, phantom_tau=phantom_tau, check_every=check_every,
        per_sample=per_sample,
        backward_warm_start=backward_warm_start,
        cuda_graph=cuda_graph,
    )
    _checks.check_callable("deqfast.fixed_point", "f", f)
    _checks.check_arguments("deqfast.fixed_point", "f", f, "a callable z -> f(z) of one argument", 1,
                            "close over the other arguments, e.g. f = lambda z: cell(z, x)")
    explicit = (lambda: ExplicitF(f)) if isinstance(f, torch.nn.Module) else None
    return solve(f, z0, options, caller="deqfast.fixed_point", explicit=explicit)


def _apply_f(caller: str, f: Callable, z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _checks.call_f(caller, f, z, like)


def _measure(stats: SolverStats, z_star: torch.Tensor, fz: torch.Tensor, options: Options) -> None:
    """The stats of the returned f(z*), measured at that evaluation (see SolverStats)."""
    measure_at(stats, z_star, fz, options.tol, options.stop_mode, options.per_sample)


def solve(f: Callable, z0: torch.Tensor, options: Options, *, caller: str,
          on_backward: Optional[Callable[[SolverStats], None]] = None,
          after_solver: Optional[Callable[[SolverStats], None]] = None,
          explicit: Optional[Callable[[], ExplicitF]] = None):
    """Solve with validated ``options``: the engine behind fixed_point, DEQ and compat.

    ``on_backward`` is called with the adjoint solve's stats when backward runs. A list/tuple
    z0 is packed into one (B, D) state and the result unpacked like it. ``explicit`` (backward
    "implicit"): a factory of f as an :class:`ExplicitF`, called once where the adjoint Function is
    used, whose tensors become its inputs so that a second derivative can reach them exactly."""
    if isinstance(z0, (list, tuple)):
        _checks.check_callable(caller, "f", f)
        layout = PackedState(caller, z0)
        packed = None if explicit is None else (lambda: explicit().packed(layout))
        z, stats = solve(layout.wrap(f), layout.pack(z0), options, caller=caller, on_backward=on_backward,
                         after_solver=after_solver, explicit=packed)
        return layout.unpack(z), stats
    _checks.check_callable(caller, "f", f)
    _checks.check_z0(caller, z0)
    user_f = f
    f = lambda z: _apply_f(caller, user_f, z, z0)  # errors about f's output name the caller
    f_star = f  # f at z*: under torch.func.jvp its value is wrapped and carries the tangents
    under_jvp = _checks.jvp_level() is not None
    if under_jvp:
        if options.backward == "bptt":
            raise RuntimeError(
                f"{caller}: torch.func.jvp through backward='bptt' is not supported (the recorded solver steps "
                f"run on plain tensors); use backward='implicit', 'neumann', 'jfb' or 'phantom', or "
                f"torch.autograd.forward_ad with backward='bptt'")
        z0 = _checks.unwrap_jvp(z0)
        f = lambda z: _checks.unwrap_jvp(f_star(z))  # the solver iterates on the values
    solver = _solvers.SOLVERS[options.solver]
    kwargs = options.solver_kwargs(options.solver)

    if options.backward == "bptt" and z0.shape[0] > 0:
        if _forward_ad_active():
            f = _bptt_refusing_dropped_tangents(f, z0, caller)
        with _solvers._common.entry(caller):
            z, stats = solver(f, z0, **kwargs)
        if torch.is_grad_enabled() and not z.requires_grad:
            # Every sample met tol at z0 (a warm start at the fixed point): the solver returned z0
            # and recorded no step, so z has no graph and backward would fail. Return the one
            # iteration it made, f(z0), recorded (within tol of z0): BPTT through that iteration.
            fz = f(z)
            if fz.requires_grad:
                z = fz
        return z, stats

    # backward_warm_start: the solver's history goes to the backward (kept only then).
    warm = options.backward_warm_start and options.backward == "implicit" and torch.is_grad_enabled()
    cached = _cached_parametrizations() if torch.is_grad_enabled() else None
    try:
        with torch.no_grad(), _solvers._common.entry(caller), \
                (_history.capture() if warm else contextlib.nullcontext()) as history:
            z_star, stats = solver(f, z0.detach(), **kwargs)
    finally:  # (also when f raises: a caller that goes on inside cached() must not read them)
        if cached is not None:
            _forget_cached_without_grad(cached)
    # z* is a constant of what follows: the pure-PyTorch steps carry a forward-mode AD tangent
    # (no_grad does not stop it), the fused ones do not; neither is z*'s.
    z_star = z_star.detach()
    if after_solver is not None:  # DEQ(compact=True): f on the whole batch from here
        after_solver(stats)

    if options.backward == "phantom":
        z = z_star
        for _ in range(options.phantom_steps):
            z = torch.lerp(z, f_star(z), options.phantom_tau)
        return z, stats

    if z0.shape[0] == 0:  # an empty batch: an empty result whose graph gives empty gradients
        return f_star(z_star), stats

    jacobian_free = options.backward == "jfb" or (options.backward == "neumann" and options.neumann_terms == 1)
    if jacobian_free or not torch.is_grad_enabled() or under_jvp:
        fz = f_star(z_star)
        if under_jvp and not jacobian_free and torch.is_grad_enabled() and _checks.unwrap_jvp(fz).requires_grad:
            raise RuntimeError(
                f"{caller}: under torch.func.jvp, backward={options.backward!r} gives z*'s tangent but no reverse-mode "
                f"graph, and f reads tensors that require grad with grad enabled; run the jvp under torch.no_grad(), "
                f"or with tensors that do not require grad (e.g. torch.func.functional_call with detached "
                f"parameters), or use torch.autograd.forward_ad, where both modes work together")
        _measure(stats, z_star, _checks.unwrap_jvp(fz) if under_jvp else fz, options)
        if not jacobian_free:
            tangent = _tangent_of_z_star(f_star, z_star, fz, options, caller)
            if tangent is not None:
                fz = _forward_ad.make_dual(_forward_ad.unpack_dual(fz).primal, tangent)
        return fz, stats

    z_leaf = z_star.detach().requires_grad_()
    first_node = _next_sequence_nr()  # f's graph: the nodes numbered from here (a second derivative checks it)
    fz = f(z_leaf)
    _measure(stats, z_star, fz, options)
    tangent = _tangent_of_z_star(f, z_star, fz, options, caller)
    if not _needs_grad_besides(fz, z_leaf):
        # Nothing f closes over requires grad (a frozen DEQ): z does not either, and no adjoint runs.
        return (fz.detach() if tangent is None else _forward_ad.make_dual(fz.detach(), tangent)), stats
    if explicit is not None and options.backward == "implicit":
        spec = explicit()
        spec.first_node = first_node
        return AdjointFunction.apply(fz, z_leaf, options, stats, on_backward, caller, history, tangent, spec,
                                     *spec.tensors), stats
    return AdjointFunction.apply(fz, z_leaf, options, stats, on_backward, caller, history, tangent), stats


_next_sequence_nr = getattr(torch._C._autograd, "_get_sequence_nr", lambda: None)


def _cached_parametrizations():
    """The keys of torch.nn.utils.parametrize's cache while ``parametrize.cached()`` is on, else None
    (a module global read: nothing else when caching is off)."""
    if not getattr(_parametrize, "_cache_enabled", 0):
        return None
    return set(_parametrize._cache)


def _forget_cached_without_grad(before) -> None:
    """Drop the parametrized tensors (weight_norm, spectral_norm, ...) that the solve itself put in
    parametrize.cached()'s cache: computed first inside the solver's no_grad, they carry no graph,
    and f(z*) (and the rest of the step) reading them would give the parametrization's parameters
    no gradient, silently. Dropped, they are computed again, with grad, at their next use."""
    cache = _parametrize._cache
    for key in [key for key in cache if key not in before]:
        tensor = cache[key]
        if tensor is None or not tensor.requires_grad:
            del cache[key]


def _forward_ad_active() -> bool:
    """Whether a torch.autograd.forward_ad.dual_level is open (cheap: a module global)."""
    return getattr(_forward_ad, "_current_level", -1) >= 0


def _has_tangent(t: torch.Tensor) -> bool:
    return _forward_ad_active() and _forward_ad.unpack_dual(t).tangent is not None


def _forward_ad_error(backward: str, caller: str) -> RuntimeError:
    return RuntimeError(
        f"{caller}: forward-mode AD (torch.autograd.forward_ad: a tangent on x or on a tensor f closes over) "
        f"is not supported by backward={backward!r} here: the solve would drop the tangent of z* (no tangent, "
        f"read as zero, or one step's). Use backward='implicit' (the tangent solved at z*, exact) or 'neumann', "
        f"backward='bptt' with grad enabled and a tensor f closes over requiring grad (the recorded solve carries "
        f"the tangent), or backward='jfb'/'phantom' (their graphs' tangents)"
    )


def _tangent_of_z_star(f: Callable, z_star: torch.Tensor, fz: torch.Tensor, options: Options, caller: str):
    """implicit/neumann under forward-mode AD: f(z*) carries the tangent ḟ of what f closes over
    (z* itself carries none); the tangent of z* solves t = J t + ḟ (:func:`solve_tangent`). None
    where fz carries no tangent (no dual level open, or nothing f reads has a tangent).

    The tangent comes without a reverse-mode graph: where ḟ has one (reverse over forward, e.g. a
    loss on a tangent differentiated in the parameters), differentiating it raises an error that
    says so instead of silently holding J and z* constant."""
    if not _forward_ad_active():
        return None
    f_dot = _forward_ad.unpack_dual(fz).tangent
    if f_dot is None:
        return None
    if _checks.jvp_level() is not None:
        f_dot = _checks.unwrap_jvp(f_dot)
    tangent = solve_tangent(f, z_star, f_dot, options, caller)
    if torch.is_grad_enabled() and f_dot.requires_grad:
        tangent = _tangent_not_differentiable(tangent, f_dot, options.backward, caller)
    return tangent


def _tangent_not_differentiable(tangent: torch.Tensor, f_dot: torch.Tensor, backward: str, caller: str) -> torch.Tensor:
    message = (
        f"{caller}: the forward-mode tangent of z* through backward={backward!r} is exact but not differentiable "
        f"in reverse mode (reverse over forward, e.g. a loss on a tangent differentiated again): it is solved "
        f"without a graph. Use backward='bptt' (a recorded solve) for that, or differentiate in reverse mode only"
    )
    inputs = [tangent.detach().requires_grad_(), f_dot]
    out = torch._C._functions.DelayedError(message, len(inputs))(*inputs)
    return out[0] if isinstance(out, tuple) else out


def _bptt_refusing_dropped_tangents(f: Callable, z0: torch.Tensor, caller: str) -> Callable:
    """bptt: the solvers carry a tangent only where they record (the condition of their `recording`:
    grad on and f's value or z0 requiring grad); elsewhere their buffers and fused ops drop it."""

    def checked(z):
        out = f(z)
        if _has_tangent(out) and not (torch.is_grad_enabled() and (out.requires_grad or z0.requires_grad)):
            raise _forward_ad_error("bptt", caller)
        return out

    return checked


def _needs_grad_besides(out: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether ``out``'s autograd graph reaches a tensor requiring grad other than ``leaf``.

    A depth-first walk of the graph f built, which stops at the first leaf (parameter, input)
    other than ``leaf``: a few nodes for a cell with parameters; the whole graph of f (no more)
    when nothing but ``leaf`` requires grad. Every graph ends in leaves (AccumulateGrad nodes)."""
    if out.grad_fn is None:
        return False
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            if variable is not leaf:
                return True
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False
