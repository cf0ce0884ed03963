"""torchdeq.core in deqfast.compat: get_deq, reset_deq, register_deq, DEQBase, DEQIndexing, DEQSliced.

    deq = get_deq(f_solver="anderson", f_max_iter=30, ift=True)
    z_list, info = deq(func, z0)          # like torchdeq 0.1.0

The classes follow torchdeq 0.1.0's structure, keywords, defaults and return values; the solves run
on deqfast's solvers (deqfast.compat.solver) and the implicit gradient on deqfast's adjoint. A keyword
torchdeq takes and ignores (or does not know) warns once, naming it, and is ignored; from a
configuration object (``args``: argparse.Namespace, dict, ...) only torchdeq's keys are read.

Batch or not. deqfast treats dim 0 as a batch of independent samples and freezes each sample once
it converges. A state whose rows are coupled (graph nodes, diffusion timesteps, batch norm in f) must
be solved as one sample, forward and adjoint (a frozen row would go stale when the others move).
compat decides once per DEQ module, at its first solve: it calls f at z0 and at z0 with one random
half of the rows perturbed, then the other half (three f calls, a fixed generator); if f changed at
a row that was not perturbed, the rows are coupled and every solve of the module, forward and
adjoint, treats the whole state as one sample (reshaped to (1, B·d): one convergence test, nothing
frozen, one best iterate); else each row is a sample. ``per_sample=True/False`` in the configuration (a deqfast
extension) fixes the choice without the probe.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Optional

import torch
from torch import autograd, nn

from .. import _checks
from .._state import PackedState
from ..backward import AdjointFunction, _not_differentiable_again, solve_tangent
from ..functional import _forward_ad, _forward_ad_active, _tangent_not_differentiable
from ..options import Options
from ..solvers import _history
from . import solver as _solver
from .dropout import reset_dropout
from .loss import power_method
from .norm import reset_norm
from .utils import ARG_KEYS, DEQConfig, check_tau, warn_once

__all__ = ["get_deq", "reset_deq", "register_deq", "DEQSliced", "DEQIndexing", "DEQBase"]

# torchdeq 0.1.0's get_deq keywords and their defaults (DEQBase and DEQIndexing/DEQSliced).
TORCHDEQ_DEFAULTS = {
    "core": "sliced",
    "f_solver": "fixed_point_iter",
    "b_solver": "fixed_point_iter",
    "no_stat": None,
    "f_max_iter": 40,
    "b_max_iter": 40,
    "f_tol": 1e-3,
    "b_tol": 1e-6,
    "f_stop_mode": "abs",
    "b_stop_mode": "abs",
    "eval_factor": 1.0,
    "eval_f_max_iter": 0,
    "ift": False,
    "hook_ift": False,
    "grad": 1,
    "tau": 1.0,
    "sup_gap": -1,
    "sup_loc": None,
    "n_states": 1,
    "indexing": None,
}
# deqfast's own configuration keys (not torchdeq's): per_sample None (decide), True or False;
# backward_warm_start a bool (the IFT adjoint started from the forward solve's history).
EXTENSION_KEYS = ("per_sample", "backward_warm_start")
_KNOWN_CONFIG = frozenset(TORCHDEQ_DEFAULTS) | ARG_KEYS | frozenset(EXTENSION_KEYS)

# What torchdeq's solvers read from solver_kwargs (f_max_iter is the DEQ's).
SOLVER_KWARGS = ("f_max_iter", "m", "lam", "tau", "LBFGS_thres", "ls", "return_final")

_ADJOINT_SOLVERS = {"anderson": "anderson", "broyden": "broyden", "fixed_point_iter": "fixed_point",
                    "simple_fixed_point_iter": "fixed_point"}


def _in_dtype(out, like: torch.Tensor):
    """f's output (part) in the state's floating dtype. torchdeq runs an f whose output comes back in
    another floating dtype (DEQ-Flow's update under autocast with --mixed_precision): its torch.cat
    and solver buffers cast it to the state's dtype; deqfast's checks would refuse it."""
    if (isinstance(out, torch.Tensor) and out.dtype != like.dtype and out.is_floating_point()
            and like.is_floating_point()):
        return out.to(like.dtype)
    return out


class _DEQFunc:
    """torchdeq's DEQWrapper/MDEQWrapper: f on the solver's state (a tensor as given; a list/tuple
    packed into one (B, D) tensor), with torchdeq's damped call ``f(z, tau)``.

    ``speedy``: torchdeq's SpeedyMDEQWrapper (no_stat, the default with simple_fixed_point_iter) for a
    list/tuple state, which hands back f's own container: a state comes back as the container of the
    call that made it (f's tuple or list; a list from a damped call, tau != 1; z_init's own type when
    no step was made). compat still packs the state (one (B, D) tensor) and only matches the type."""

    def __init__(self, func: Callable, z_init, caller: str, speedy: bool = False):
        _checks.check_callable(caller, "func", func)
        if isinstance(z_init, torch.Tensor):
            _checks.check_z0(caller, z_init, name="z_init")
            self.layout = None
            self.f = lambda z: _checks.call_f(caller, lambda z: _in_dtype(func(z), z_init), z, z_init, like_name="z_init")
        elif isinstance(z_init, (list, tuple)) and z_init and all(isinstance(t, torch.Tensor) for t in z_init):
            self.layout = PackedState(caller, list(z_init), name="z_init")
            self.layout.container = type(z_init) if type(z_init) in (list, tuple) else list
            self.speedy = speedy
            self.init_container = self.made = self.f_container = self.layout.container

            def parts_in_dtype(*parts):
                out = func(*parts)
                if isinstance(out, (list, tuple)) and len(out) == len(z_init):
                    self.f_container = tuple if isinstance(out, tuple) else list
                    out = [_in_dtype(o, z) for o, z in zip(out, z_init)]
                return out

            self.f = self.layout.wrap(parts_in_dtype, star=True)
        else:
            raise TypeError(f"{caller}: z_init must be a tensor or a non-empty list/tuple of tensors, "
                            f"got {type(z_init).__name__}")

    def list2vec(self, z):
        if self.layout is None:
            return z
        self.packed_init = self.layout.pack(z)
        return self.packed_init

    def vec2list(self, z):
        if self.layout is None:
            return z
        parts = self.layout.unpack(z)
        if not self.speedy:
            return list(parts)  # torchdeq's MDEQWrapper.vec2list
        container = self.init_container if z is self.packed_init else self.made
        return container(parts)

    @staticmethod
    def detach(z):
        return z.detach()

    def __call__(self, z, tau=1.0):
        out = self.f(z)
        if self.layout is not None:
            self.made = self.f_container if tau == 1.0 else list
        return out if tau == 1.0 else tau * out + (1 - tau) * z


def _backward_info(stats) -> "_solver.SolverStat":
    """deqfast's adjoint SolverStats as torchdeq's dict, its last residual as a one-column trace
    (torchdeq_info; backward_writer gets _BackwardWriter's torchdeq-shaped traces)."""
    info = _solver.SolverStat(abs_lowest=stats.residual, rel_lowest=stats.rel_residual,
                              abs_trace=stats.residual.unsqueeze(1), rel_trace=stats.rel_residual.unsqueeze(1),
                              nstep=stats.nstep.to(torch.get_default_dtype()))
    info.deqfast_stats = stats
    return info


class _BackwardWriter:
    """torchdeq's backward_writer on deqfast's adjoint solve: the writer gets the SolverStat torchdeq's
    b_solver returns, its traces included, from what deqfast's adjoint evaluates.

    torchdeq solves u = g + Jᵀu with b_solver from u = 0, max_iter = b_max_iter. Its fixed-point
    iteration's step k (k = 1..b_max_iter) records ‖F(u) − u‖ at u = u_{k-1} (F(u) = g + Jᵀu; u_0 = 0,
    so step 1's is ‖g‖, free) and returns u_k. deqfast's adjoint starts at u_1 = g and measures the
    residual at each iterate it evaluates: its evaluation j is torchdeq's step j + 1, so the steps
    1..b_max_iter are step 1 (free) and its first b_max_iter − 1 evaluations; the last (the residual
    of the returned u) is left out of the traces as torchdeq leaves it out. Anderson and Broyden start
    from u = 0 in both and record as torchdeq's (from Anderson's third evaluation; Broyden's first is
    not a step). Each evaluation costs a subtraction and a norm here, and only when a writer is given:
    no extra VJP. ``info.deqfast_stats`` holds deqfast's SolverStats of the adjoint solve."""

    def __init__(self, writer, rows: int, solver_name: str, max_iter: int, stop_mode: str, warm: bool):
        self.writer, self.rows, self.max_iter, self.stop_mode = writer, rows, int(max_iter), stop_mode
        self.kind = {"anderson": "anderson", "broyden": "broyden"}.get(solver_name, "fixed_point")
        self.free_step = self.kind == "fixed_point" and not warm  # deqfast's plain adjoint starts at F(0) = g
        self.tracker = None

    def _limit(self) -> int:
        """Evaluations torchdeq's b_solver records (its steps) within b_max_iter."""
        return self.max_iter + 1 if self.kind == "broyden" else self.max_iter

    def record_evaluation(self, v, jtv, grad):
        B = self.rows
        v, jtv, grad = v.detach(), jtv.detach(), grad.detach()  # statistics, never part of a graph
        if self.tracker is None:
            g = grad.reshape(B, -1)
            self.tracker = _solver._Tracker(None, g, self.stop_mode, False, False, broyden=self.kind == "broyden",
                                            anderson=self.kind == "anderson")
            if self.free_step:
                self.tracker._record(torch.zeros_like(g), g)
        if self.tracker.n < self._limit():
            self.tracker._record(v.reshape(B, -1), (grad + jtv).reshape(B, -1))

    def __call__(self, stats):
        tracker, self.tracker = self.tracker, None
        if tracker is None:
            info = _backward_info(stats)
        else:
            info = tracker.info(self.max_iter)
            info.deqfast_stats = stats
        self.writer(info)


def _solver_name(caller, key, value):
    if not isinstance(value, str) or value not in _solver._solvers_dict:
        raise ValueError(f"{caller}: {key} must be one of {', '.join(map(repr, _solver._solvers_dict))}, got {value!r}")
    return _solver.get_solver(value)


class DEQBase(nn.Module):
    """torchdeq.core.DEQBase: configuration (``args`` and keywords; ``args`` wins, as in torchdeq),
    solver lookup, the fixed-point solve and the spectral radius. Subclass it like torchdeq's."""

    def __init__(self, args=None, f_solver="fixed_point_iter", b_solver="fixed_point_iter", no_stat=None,
                 f_max_iter=40, b_max_iter=40, f_tol=1e-3, b_tol=1e-6, f_stop_mode="abs", b_stop_mode="abs",
                 eval_factor=1.0, eval_f_max_iter=0, **kwargs):
        super().__init__()
        caller = "deqfast.compat.get_deq"
        unknown = set(kwargs) - _KNOWN_CONFIG
        if unknown:
            warn_once(caller, unknown, "keyword(s)")
        self.args = DEQConfig(args)
        self.args.update(**kwargs)
        get = self.args.get
        self.f_solver_name = get("f_solver", f_solver)
        self.b_solver_name = get("b_solver", b_solver)
        self.f_solver = _solver_name(caller, "f_solver", self.f_solver_name)
        self.b_solver = _solver_name(caller, "b_solver", self.b_solver_name)
        if no_stat is None:
            no_stat = self.f_solver_name == "simple_fixed_point_iter"
        self.no_stat = no_stat
        self.f_max_iter = get("f_max_iter", f_max_iter)
        self.b_max_iter = get("b_max_iter", b_max_iter)
        self.f_tol = get("f_tol", f_tol)
        self.b_tol = get("b_tol", b_tol)
        self.f_stop_mode = get("f_stop_mode", f_stop_mode)
        self.b_stop_mode = get("b_stop_mode", b_stop_mode)
        for key in ("f_stop_mode", "b_stop_mode"):
            _checks.check_choice(caller, key, getattr(self, key), _checks.STOP_MODES)
        _checks.check_int(caller, "f_max_iter", self.f_max_iter, 0)
        _checks.check_int(caller, "b_max_iter", self.b_max_iter, 0)  # 0: only without IFT (see _setup_grads)
        _checks.check_real(caller, "f_tol", self.f_tol)
        _checks.check_real(caller, "b_tol", self.b_tol)
        eval_f_max_iter = get("eval_f_max_iter", eval_f_max_iter)
        eval_factor = get("eval_factor", eval_factor)
        _checks.check_int(caller, "eval_f_max_iter", eval_f_max_iter, 0)
        _checks.check_real(caller, "eval_factor", eval_factor)
        self.eval_f_max_iter = eval_f_max_iter if eval_f_max_iter > 0 else int(self.f_max_iter * eval_factor)
        per_sample = get("per_sample", None)
        if per_sample not in (None, True, False):
            raise ValueError(f"{caller}: per_sample must be None (decide), True or False, got {per_sample!r}")
        # None: undecided; True: rows coupled (solve the state as one sample); False: independent rows.
        self._coupled: Optional[bool] = None if per_sample is None else not per_sample
        warm = get("backward_warm_start", False)
        if not isinstance(warm, bool):
            raise TypeError(f"{caller}: backward_warm_start must be a bool, got {type(warm).__name__} {warm!r}")
        self._warm = warm
        self._history = None  # the last training solve's history, handed to the IFT gradient (warm start)
        self.hook = None
        # The adjoint solve of the implicit gradient (deqfast's, b_solver's algorithm).
        self._b_options = Options.build(
            caller, solver="fixed_point", max_iter=1, backward="implicit",
            backward_solver=_ADJOINT_SOLVERS.get(self.b_solver_name, "fixed_point"),
            # torchdeq's Broyden evaluates b_max_iter + 1 times (its start, then one per update)
            backward_max_iter=max(int(self.b_max_iter), 1) + (self.b_solver_name == "broyden"),
            backward_tol=0.0 if self.b_solver_name == "simple_fixed_point_iter" else self.b_tol,
            backward_stop_mode=self.b_stop_mode,
            # torchdeq's b_solver defaults: Anderson's m = 6, Broyden's LBFGS_thres = max_iter (all updates)
            m=max(int(self.b_max_iter), 1) if self.b_solver_name == "broyden" else 6)

    def _sradius(self, deq_func, z_star):
        """torchdeq's: z* itself is made to require grad (in place), so the z* returned with
        sradius_mode=True requires grad (a leaf; a list state's parts are views of it), as torchdeq's."""
        with torch.enable_grad():
            z_star.requires_grad_()
            new_z_star = deq_func(z_star)
        _, sradius = power_method(new_z_star, z_star, n_iters=100)
        return sradius

    def _solver_kwargs(self, solver_kwargs) -> dict:
        solver_kwargs = dict(solver_kwargs or {})
        unknown = set(solver_kwargs) - set(SOLVER_KWARGS)
        if unknown:
            warn_once("deqfast.compat: solver_kwargs", unknown, "solver_kwargs key(s)")
            solver_kwargs = {k: v for k, v in solver_kwargs.items() if k not in unknown}
        fm = solver_kwargs.get("f_max_iter")
        if fm is not None:
            _checks.check_real("deqfast.compat: solver_kwargs", "f_max_iter", fm)
        return solver_kwargs

    def _run_solver(self, deq_func, z_init, f_max_iter, solver_kwargs, indexing=None):
        """torchdeq's ``self.f_solver(deq_func, x0=..., ...)`` under no_grad, deciding (see the module
        docstring) whether the rows are one sample."""
        kw = {k: v for k, v in solver_kwargs.items() if k != "f_max_iter"}
        if indexing is not None:
            kw["indexing"] = indexing
        own = self.f_solver in _solver.OWN_SOLVERS and self.f_solver is not _solver.simple_fixed_point_iter
        if self._coupled is None:
            self._coupled = _probe_coupling(deq_func, z_init)
        extra = dict(_compat=dict(whole=bool(self._coupled))) if own else {}
        # backward_warm_start: keep the solver's history for the IFT gradient (training only).
        # (a flag, not `produce_grad[-1] == self._ift`: dynamo evaluates that bound-method comparison
        # as False under torch.compile, and the adjoint then ran cold)
        warm = self._warm and own and torch.is_grad_enabled() and getattr(self, "_last_is_ift", False)
        with torch.no_grad(), (_history.capture() if warm else contextlib.nullcontext()) as history:
            z_star, trajectory, info = self.f_solver(deq_func, x0=z_init, max_iter=f_max_iter, tol=self.f_tol,
                                                     stop_mode=self.f_stop_mode, **kw, **extra)
        self._history = history
        return z_star, trajectory, info

    def _prepare(self, func, z_init, solver_kwargs, kwargs):
        """The start of both cores' call: warn once about keywords torchdeq ignores, pack z_init."""
        if kwargs:
            warn_once("deqfast.compat: the DEQ call", kwargs, "keyword(s)")
        deq_func = _DEQFunc(func, z_init, "deqfast.compat", speedy=bool(self.no_stat))
        return deq_func, deq_func.list2vec(z_init), self._solver_kwargs(solver_kwargs)

    def _eval(self, deq_func, z_init, solver_kwargs, sradius_mode):
        """Both cores in eval mode: [z*] (f at the best iterate -- Broyden: the iterate --, no gradient)
        and the solver's info."""
        z_star, _, info = self._run_solver(deq_func, z_init, solver_kwargs.get("f_max_iter", self.eval_f_max_iter),
                                           solver_kwargs)
        if sradius_mode:
            # A tensor of its own (compat's z* may be a view of the solver's rows): the parts of a list
            # state, views of it made after _sradius, then require grad under torch.no_grad() too.
            z_star = z_star.clone()
            info["sradius"] = self._sradius(deq_func, z_star)
        else:
            info["sradius"] = torch.zeros(1, device=z_star.device)
        return [deq_func.vec2list(z_star)], info

    def forward(self, func, z_init, solver_kwargs=None, sradius_mode=False, backward_writer=None, **kwargs):
        raise NotImplementedError


def _probe_coupling(deq_func, z) -> Optional[bool]:
    """Whether f's rows (dim 0) are coupled: f at z, and at z with one random half of the rows
    perturbed, then the other half; coupled if f changed at a row that was not perturbed. Three f
    calls, once per DEQ module. The second and third start from the RNG state the first started
    from, and the state after the first is restored at the end: an f that draws random numbers at
    every call (plain dropout) sees the same draws in the three -- its randomness is not mistaken
    for coupling -- and the RNG stream advances by one call's draws, those the solver's first call
    makes (variational dropout's masks, drawn once, exactly as there). A single row is one sample
    either way: False, without a call."""
    rows = z.reshape(z.shape[0], -1) if z.dim() >= 2 else z.reshape(-1, 1)
    B = rows.shape[0]
    if B < 2:
        return False
    g = torch.Generator().manual_seed(0)
    half = torch.zeros(B, dtype=torch.bool)
    half[torch.randperm(B, generator=g)[: B // 2]] = True
    half = half.to(z.device)
    cuda = z.device.type == "cuda"

    def rng_state():
        return torch.get_rng_state(), torch.cuda.get_rng_state(z.device) if cuda else None

    def set_rng_state(state):
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1], z.device)

    with torch.no_grad():
        before = rng_state()
        f0 = deq_func(z).reshape(B, -1)  # draws what the solver's first call would (e.g. dropout masks)
        after = rng_state()
        try:
            scale = 1e-3 * (1.0 + rows.abs().max())
            for part in (half, ~half):
                bumped = rows + scale * part.unsqueeze(1).to(rows.dtype)
                set_rng_state(before)  # the same random draws as the first call
                f1 = deq_func(bumped.view(z.shape)).reshape(B, -1)
                if bool(((f1 != f0).any(dim=1) & ~part).any()):
                    return True
        finally:
            set_rng_state(after)
    return False


class _Phantom:
    """torchdeq's phantom gradient: n_grad_step damped steps from z_pred, with grad; with sup_gap
    every sup_gap-th step, with sup_loc the listed steps and the last. A class, not torchdeq's
    closure, so that a model holding the DEQ pickles (torch.save of the whole model), as it does
    with ift."""

    def __init__(self, n_grad_step, tau, sup_gap, sup_loc):
        self.n_grad_step, self.tau, self.sup_gap, self.sup_loc = n_grad_step, tau, sup_gap, sup_loc

    def __call__(self, deq_func, z_pred, writer=None):
        n_grad_step, tau, sup_gap, sup_loc = self.n_grad_step, self.tau, self.sup_gap, self.sup_loc
        z_out = []
        for i in range(n_grad_step):
            z_pred = deq_func(z_pred, tau=tau)
            if (sup_gap > 0 and (i + 1) % sup_gap == 0) or (sup_gap <= 0 and sup_loc and (i + 1) in sup_loc):
                z_out.append(z_pred)
        if sup_gap <= 0:
            z_out.append(z_pred)
        return z_out


class _GradMixin:
    """torchdeq.grad.backward_factory and the configuration both of its cores share."""

    def _setup_grads(self, ift, hook_ift, grad, tau, sup_gap, sup_loc, n_states, indexing):
        caller = "deqfast.compat.get_deq"
        get = self.args.get
        grad = get("grad", grad)
        if isinstance(grad, int) and not isinstance(grad, bool):
            grad = [grad]
        if not isinstance(grad, (list, tuple)) or not grad or any(
                isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grad):
            raise ValueError(f"{caller}: grad must be an int >= 1 or a list of them, got {grad!r}")
        self.arg_n_states = 1 if n_states is None else n_states
        self.arg_indexing = [] if indexing is None else indexing
        n = get("n_states", self.arg_n_states)
        _checks.check_int(caller, "n_states", 1 if n is None else n, 1)
        idx = list(get("indexing", self.arg_indexing) or [])
        if any(isinstance(i, bool) or not isinstance(i, int) for i in idx) or any(b <= a for a, b in zip([0, *idx], idx)):
            raise ValueError(f"{caller}: indexing must be increasing positive steps, got {idx!r}")
        self.indexing = self._compute_f_iter(self.f_max_iter)
        if len(grad) not in (1, len(self.indexing)):
            raise ValueError(f"{caller}: grad must have 1 entry or one per sampled state ({len(self.indexing)}), got {list(grad)!r}")
        pairs = list(grad) if len(grad) == len(self.indexing) else [grad[0]] * len(self.indexing)
        tau = get("tau", tau)
        check_tau(caller, "tau", tau)  # over-relaxation (tau > 1) too, as torchdeq
        sup_gap = get("sup_gap", sup_gap)
        sup_gap = -1 if sup_gap is None else sup_gap
        sup_loc = get("sup_loc", sup_loc) or []
        self.produce_grad = [self._phantom(k, tau, sup_gap, sup_loc) for k in pairs]
        self.hook_ift = bool(get("hook_ift", hook_ift))
        if get("ift", ift) or self.hook_ift:
            if self.b_max_iter == 0:
                # torchdeq runs its b_solver for 0 steps and returns its start, u = 0: a zero gradient
                # through the state, silently. Unused without IFT, b_max_iter = 0 is taken there.
                raise ValueError(f"{caller}: b_max_iter must be >= 1 with ift=True or hook_ift=True (0 steps of the "
                                 f"adjoint solve give a zero gradient through the DEQ's state), got 0")
            if self.b_solver_name == "anderson" and self.b_max_iter <= 2:
                # torchdeq's Anderson makes its first step at its third evaluation: with b_max_iter <= 2 it
                # returns its start u = 0, a zero gradient through the state.
                raise ValueError(f"{caller}: b_max_iter must be >= 3 with b_solver='anderson' and ift=True or "
                                 f"hook_ift=True (torchdeq's Anderson returns its start u = 0 before its third "
                                 f"evaluation: a zero gradient through the DEQ's state), got {self.b_max_iter}")
            self.produce_grad[-1] = self._ift
        self._last_is_ift = self.produce_grad[-1] == self._ift
        if self._warm and (self.produce_grad[-1] != self._ift or self.f_solver_name not in ("anderson", "broyden")):
            _checks.warn(
                f"{caller}: backward_warm_start=True has no effect here: it starts the IFT gradient's adjoint "
                f"from the forward Anderson/Broyden history, and this DEQ has "
                + ("no IFT gradient (set ift=True or hook_ift=True)" if self.produce_grad[-1] != self._ift
                   else f"f_solver={self.f_solver_name!r} (use 'anderson' or 'broyden')"),
                UserWarning,
            )

    @staticmethod
    def _phantom(n_grad_step, tau, sup_gap, sup_loc):
        """torchdeq's phantom gradient (see _Phantom)."""
        return _Phantom(n_grad_step, tau, sup_gap, sup_loc)

    def _ift(self, deq_func, z_pred, writer=None):
        """torchdeq's IFT gradient: the state f(z_pred); its backward replaces the incoming g by the
        solution u = g + Jᵀu of the adjoint equation (deqfast's adjoint solve, b_solver's algorithm).
        As in torchdeq, J is taken at f(z_pred) with ift (f re-run in backward) and at z_pred with
        hook_ift (deqfast's autograd Function there instead of a hook: the same gradient). Unlike
        torchdeq 0.1.0's hook, which removes itself at its first call, it acts at every backward
        through the state: torchdeq's hook_ift also fires in an autograd.grad w.r.t. the returned
        state (jac_reg(f(z), z), as DEQ-seq computes it) and then leaves the loss the 1-step
        gradient, and a second backward gets the 1-step gradient too; compat's gives the IFT
        gradient each time, as ift does (tests/test_compat_zoo.py)."""
        z_pred = z_pred.detach()
        own = self.b_solver in _solver.OWN_SOLVERS
        on_backward = None
        if writer is not None and own:
            on_backward = _BackwardWriter(writer, z_pred.shape[0], self.b_solver_name, self.b_max_iter,
                                          self.b_stop_mode, warm=self._history is not None)
        if self.hook_ift and own:
            # Coupled rows: the adjoint solve too treats the whole state as one sample.
            shape, whole = z_pred.shape, bool(self._coupled)
            z_leaf = (z_pred.reshape(1, -1) if whole else z_pred).requires_grad_()
            with torch.enable_grad():
                fz = deq_func(z_leaf.view(shape)).reshape(z_leaf.shape)
            history, self._history = self._history, None
            tangent = self._tangent(deq_func, z_leaf.detach(), fz, shape)
            out = AdjointFunction.apply(fz, z_leaf, self._b_options, types.SimpleNamespace(backward=None), on_backward,
                                      "deqfast.compat", history, tangent)
            return [out.view(shape)]
        new_z = deq_func(z_pred)
        at = z_pred if self.hook_ift else new_z.detach()
        history, self._history = self._history, None
        tangent = None
        if _forward_ad.unpack_dual(new_z).tangent is not None if _forward_ad_active() else False:
            if not own:
                raise RuntimeError(
                    "deqfast.compat: forward-mode AD (torch.autograd.forward_ad) through the IFT gradient is supported "
                    "with deqfast's own b_solver (the tangent of z* solved as t = J t + ḟ), not with a registered "
                    f"b_solver ({self.b_solver_name!r}), whose algorithm deqfast cannot apply to the tangent")
            whole = bool(self._coupled)
            flat = at.reshape(1, -1) if whole else at
            with torch.no_grad():
                fz = deq_func(flat.view(at.shape)).reshape(flat.shape)
            tangent = self._tangent(deq_func, flat, fz, at.shape)
            tangent = None if tangent is None else tangent.view(at.shape)
        return [_IFTGrad.apply(new_z, at, deq_func, self, writer if not own else on_backward, history, tangent)]

    def _tangent(self, deq_func, z_flat, fz, shape):
        """Forward-mode AD: the tangent of z* (t = J t + ḟ, the adjoint's solver and limits), where f(z*)
        carries a tangent ḟ from what f closes over; else None."""
        if not _forward_ad_active():
            return None
        f_dot = _forward_ad.unpack_dual(fz).tangent
        if f_dot is None:
            return None
        f_flat = lambda z: deq_func(z.view(shape)).reshape(z_flat.shape)
        tangent = solve_tangent(f_flat, z_flat.detach(), f_dot.reshape(z_flat.shape), self._b_options, "deqfast.compat")
        if torch.is_grad_enabled() and f_dot.requires_grad:
            tangent = _tangent_not_differentiable(tangent, f_dot, "implicit", "deqfast.compat")
        return tangent


def _autocast_for_backward(at: torch.Tensor):
    """How _IFTGrad's backward re-runs f: under the forward's autocast state when the state is in a
    16-bit dtype (z0 = torch.zeros_like(u) for a u computed under autocast): outside autocast, where
    backward runs, f's float32 weights would meet the 16-bit z ('mat1 and mat2 must have the same
    dtype'). A float32/float64 state keeps f re-run at full precision (J in float32, as before)."""
    device = at.device.type
    if at.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return lambda: torch.autocast(device, dtype=dtype)
    return contextlib.nullcontext


class _IFTGrad(autograd.Function):
    """Identity on new_z = f(z_pred); backward solves the adjoint equation with J at ``at``."""

    @staticmethod
    def forward(ctx, new_z, at, deq_func, deq, writer, history=None, tangent=None):
        ctx.deq_func, ctx.deq, ctx.writer, ctx.history = deq_func, deq, writer, history
        ctx.tangent = tangent  # forward-mode AD: the tangent of z* (DEQBase._tangent)
        ctx.autocast = _autocast_for_backward(at)
        ctx.save_for_backward(at)
        return new_z.detach().clone()

    @staticmethod
    def jvp(ctx, *input_tangents):
        tangent, ctx.tangent = ctx.tangent, None
        return tangent

    @staticmethod
    def backward(ctx, grad):
        at, = ctx.saved_tensors
        deq = ctx.deq
        if deq.b_solver in _solver.OWN_SOLVERS:
            # deqfast's adjoint solve, as AdjointFunction runs it on the graph of f at h; coupled rows
            # (see the module docstring) are one sample here too: nothing frozen, one test.
            shape, whole = at.shape, bool(deq._coupled)
            h = (at.detach().reshape(1, -1) if whole else at.detach()).requires_grad_()
            with torch.enable_grad(), ctx.autocast():
                fh = ctx.deq_func(h.view(shape)).reshape(h.shape)
            fake = types.SimpleNamespace(saved_tensors=(fh, h), options=deq._b_options,
                                         stats=types.SimpleNamespace(backward=None), on_backward=ctx.writer,
                                         caller="deqfast.compat", history=ctx.history)
            ctx.history = None
            u = AdjointFunction.backward(fake, grad.reshape(h.shape))[0].view(shape)
        else:  # a registered b_solver, called as torchdeq calls it
            h = at.detach().requires_grad_()
            with torch.enable_grad(), ctx.autocast():
                fh = ctx.deq_func(h)
            grad_f = lambda y: autograd.grad(fh, h, y, retain_graph=True)[0] + grad
            u, _, info = deq.b_solver(grad_f, torch.zeros_like(grad), max_iter=deq.b_max_iter, tol=deq.b_tol,
                                      stop_mode=deq.b_stop_mode)
            if ctx.writer:
                ctx.writer(info)
            if torch.is_grad_enabled():  # create_graph: as deqfast's own adjoint, no silent second derivative
                u = _not_differentiable_again(u, "deqfast.compat", fh, grad)
        return u, None, None, None, None, None, None


class DEQIndexing(_GradMixin, DEQBase):
    """torchdeq.core.DEQIndexing: one solve of f_max_iter steps whose best-so-far states at the
    sampled steps (n_states or indexing) each get a gradient: compat's solver wrapper samples them
    as the one solve goes (torchdeq's trajectory for fixed-point iteration and Broyden). A sample
    whose step comes after the batch converged is not returned, as in torchdeq."""

    def __init__(self, args=None, ift=False, hook_ift=False, grad=1, tau=1.0, sup_gap=-1, sup_loc=None,
                 n_states=1, indexing=None, **kwargs):
        super().__init__(args=args, **kwargs)
        self._setup_grads(ift, hook_ift, grad, tau, sup_gap, sup_loc, n_states, indexing)

    def _compute_f_iter(self, f_max_iter):
        n = self.args.get("n_states", self.arg_n_states) or 1
        if n > 1:
            n_states = max(min(f_max_iter, n), 1)
            delta = int(f_max_iter // n_states)
            if f_max_iter % n_states == 0:
                return [(k + 1) * delta for k in range(n_states)]
            return [f_max_iter - (n_states - k - 1) * delta for k in range(n_states)]
        return [*(self.args.get("indexing", self.arg_indexing) or []), f_max_iter]

    def forward(self, func, z_init, solver_kwargs=None, sradius_mode=False, backward_writer=None, **kwargs):
        """(z_out, info) as torchdeq: in training the sampled states with their gradients, in eval
        [z*] (f at the best iterate; Broyden: the iterate; no gradient); info is torchdeq's SolverStat dict."""
        deq_func, z_init, solver_kwargs = self._prepare(func, z_init, solver_kwargs, kwargs)
        if self.training:
            fm = solver_kwargs.get("f_max_iter")
            indexing = self._compute_f_iter(fm) if type(fm) in (int, float) else self.indexing
            _, trajectory, info = self._run_solver(deq_func, z_init, solver_kwargs.get("f_max_iter", self.f_max_iter),
                                                   solver_kwargs, indexing=indexing)
            z_out = []
            for z_pred, produce_grad in zip(trajectory, self.produce_grad):
                z_out += produce_grad(deq_func, z_pred.detach(), writer=backward_writer)
            z_out = [deq_func.vec2list(each) for each in z_out]
            return z_out, info
        return self._eval(deq_func, z_init, solver_kwargs, sradius_mode)


class DEQSliced(_GradMixin, DEQBase):
    """torchdeq.core.DEQSliced (get_deq's default core): the solve is sliced into n_states (or the
    indexing gaps) pieces; each piece's result gets its gradient and the next piece starts from it."""

    def __init__(self, args=None, ift=False, hook_ift=False, grad=1, tau=1.0, sup_gap=-1, sup_loc=None,
                 n_states=1, indexing=None, **kwargs):
        super().__init__(args, **kwargs)
        self._setup_grads(ift, hook_ift, grad, tau, sup_gap, sup_loc, n_states, indexing)

    def _compute_f_iter(self, f_max_iter):
        n = self.args.get("n_states", self.arg_n_states) or 1
        if n > 1:
            return [int(f_max_iter // n) for _ in range(n)]
        bounds = [0, *(self.args.get("indexing", self.arg_indexing) or []), f_max_iter]
        return [b - a for a, b in zip(bounds, bounds[1:])]

    def forward(self, func, z_star, solver_kwargs=None, sradius_mode=False, backward_writer=None, **kwargs):
        """(z_out, info) as torchdeq: in training one state per slice with its gradient, in eval [z*]
        (f at the best iterate; Broyden: the iterate; no gradient); info is torchdeq's SolverStat dict (the
        last solve's)."""
        deq_func, z_star, solver_kwargs = self._prepare(func, z_star, solver_kwargs, kwargs)
        if self.training:
            fm = solver_kwargs.get("f_max_iter")
            indexing = self._compute_f_iter(fm) if type(fm) in (int, float) else self.indexing
            z_out = []
            for f_max_iter, produce_grad in zip(indexing, self.produce_grad):
                # A slice of torchdeq's np.diff can be negative (indexing past f_max_iter): no step, as there.
                z_star, _, info = self._run_solver(deq_func, z_star, int(f_max_iter), solver_kwargs)
                z_star = z_star.detach()
                z_out += produce_grad(deq_func, z_star, writer=backward_writer)
                z_star = z_out[-1]
            z_out = [deq_func.vec2list(each) for each in z_out]
            return z_out, info
        return self._eval(deq_func, z_star, solver_kwargs, sradius_mode)


_core = {"indexing": DEQIndexing, "sliced": DEQSliced}


def register_deq(deq_type, core):
    """torchdeq.core.register_deq: make ``core`` (a DEQBase subclass) available as core=deq_type."""
    _core[deq_type] = core


def get_deq(args=None, **kwargs):
    """torchdeq's ``get_deq``: a DEQSliced (core='sliced', the default) or DEQIndexing built from
    ``args`` (a program's configuration: only torchdeq's keys are read) and keywords (which win)."""
    caller = "deqfast.compat.get_deq"
    config = DEQConfig(args)
    unknown = set(kwargs) - _KNOWN_CONFIG
    if unknown:
        warn_once(caller, unknown, "keyword(s)")
    config.update(**{k: v for k, v in kwargs.items() if k not in unknown})
    core = config.get("core", "sliced")
    if core not in _core:
        raise ValueError(f"{caller}: core must be one of {', '.join(map(repr, _core))}, got {core!r}")
    return _core[core](config)


def reset_deq(model):
    """torchdeq.core.reset_deq: recompute the normalised weights and forget the dropout masks
    (usually before each training iteration)."""
    reset_norm(model)
    reset_dropout(model)


# Kept from the single-module compat: torchdeq's info keys from deqfast's SolverStats.
def torchdeq_info(stats) -> dict:
    return dict(_backward_info(stats))


def spectral_radius(f: Callable, z: torch.Tensor, n_iters: int = 100) -> torch.Tensor:
    """Per-sample estimate of the spectral radius of J = ∂f/∂z at z by the power method on Jᵀ."""
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_()
        return power_method(f(z_leaf), z_leaf, n_iters)[1]
