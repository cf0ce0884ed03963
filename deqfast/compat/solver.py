"""torchdeq.solver in deqfast.compat: torchdeq's solver functions on deqfast's solvers.

``anderson_solver``, ``broyden_solver``, ``fixed_point_iter`` take torchdeq 0.1.0's arguments and
return its ``(z, trajectory, info)``: z is f at the best iterate (what torchdeq returns; its Broyden
returns the best iterate itself, and so does compat's), trajectory the best-so-far states at the
``indexing`` steps, info a :class:`SolverStat` (torchdeq's dict: abs/rel lowest, traces, nstep = the
step of the lowest, relative residual ‖f(z) − z‖ / (‖f(z)‖ + 1e-9)). As torchdeq's, Broyden evaluates f
max_iter + 1 times: at x0 (not a step) and after each of max_iter updates (step k).
deqfast's solver does the iterations (fused ops, each sample frozen once it meets ``tol``); a thin
wrapper around f keeps torchdeq's bookkeeping from the evaluations it sees, so f is never called more
often than the solver calls it.

Differences from torchdeq (the README's "From torchdeq" table): a sample stops at the first
iterate that meets ``tol`` (torchdeq iterates every sample until the whole batch does); Anderson and
Broyden are deqfast's (Anderson counts its first two evaluations as candidates, though its traces
start at its third as torchdeq's; Broyden keeps at most ``LBFGS_thres`` updates and has no line search).
``indexing`` samples the best-so-far state from the wrapper as the one solve goes (no restart).
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import _checks
from .. import solvers as _solvers
from .utils import check_tau, warn_once

__all__ = ["register_solver", "get_solver", "solver_stat_from_final_step", "SolverStat",
           "anderson_solver", "broyden_solver", "fixed_point_iter", "simple_fixed_point_iter"]

_INIT = 1e8  # torchdeq's initial "lowest" residual
_EPS = 1e-9  # torchdeq's epsilon in the relative residual of its solvers


class SolverStat(dict):
    """torchdeq's solver statistics: a dict with 'abs_lowest', 'rel_lowest' (B,), 'abs_trace',
    'rel_trace' (B, N), 'nstep' (B,) and 'sradius'; missing keys are filled with -1 as in torchdeq.
    ``deqfast_stats`` holds deqfast's :class:`deqfast.SolverStats` of the solve when there was one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, default in (("abs_lowest", [-1.0]), ("rel_lowest", [-1.0]), ("abs_trace", [[-1.0]]),
                             ("rel_trace", [[-1.0]]), ("nstep", [-1.0]), ("sradius", [-1.0])):
            self[key] = self.get(key, torch.tensor(default))
        self.deqfast_stats = None

    @classmethod
    def from_final_step(cls, z, fz, nstep=0):
        if not torch.is_tensor(z):
            z = torch.cat([zi.flatten(start_dim=1) for zi in z], dim=1)
            fz = torch.cat([fi.flatten(start_dim=1) for fi in fz], dim=1)
        abs_lowest = (fz - z).flatten(start_dim=1).norm(dim=1)
        rel_lowest = abs_lowest / (fz.flatten(start_dim=1).norm(dim=1) + 1e-8)
        return cls(abs_lowest=abs_lowest, rel_lowest=rel_lowest, abs_trace=abs_lowest.unsqueeze(1),
                   rel_trace=rel_lowest.unsqueeze(1), nstep=nstep * torch.ones(z.shape[0], device=z.device))


def solver_stat_from_final_step(z, fz, nstep=0) -> SolverStat:
    """torchdeq.solver.solver_stat_from_final_step: stats of the last step (relative epsilon 1e-8)."""
    return SolverStat.from_final_step(z, fz, nstep=nstep)


def _batch_flatten(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(start_dim=1) if x.dim() >= 2 else x.view(x.nelement(), 1)


class _Tracker:
    """f on (B, d) rows, recording what torchdeq's ``update_state`` records at each evaluation:
    per mode the lowest residual and its step, f at the best iterate (under ``stop_mode``; ``broyden``:
    the iterate), traces.

    ``whole``: the state is one sample (rows are coupled): one best iterate for the whole state,
    chosen by the whole state's residual; the per-row statistics are those of that iterate."""

    def __init__(self, f: Callable, x0: torch.Tensor, stop_mode: str, whole: bool, return_final: bool,
                 broyden: bool = False, anderson: bool = False):
        B = x0.shape[0]
        # torchdeq's initial statistics are in the default dtype (float32): they stay so when no step
        # is recorded, and a step's values promote them (to float64 for a float64 state).
        full = lambda v: torch.full((B,), v, dtype=torch.get_default_dtype(), device=x0.device)
        self.f, self.stop_mode, self.whole, self.return_final = f, stop_mode, whole, return_final
        # torchdeq's Broyden: the first evaluation (at x0) is not a step; step k is the iterate after
        # k updates (evaluation k + 1), and the best iterate itself, not f there, is kept.
        self.broyden = broyden
        # torchdeq's Anderson records its traces from its third evaluation on (its first two set up the
        # history): compat's traces leave out those two too (they remain candidates for the best iterate).
        self.anderson = anderson
        self.at_x0 = None
        self.lowest = {"abs": full(_INIT), "rel": full(_INIT)}
        self.step = {"abs": torch.zeros(B, device=x0.device), "rel": torch.zeros(B, device=x0.device)}
        self.trace = {"abs": [full(_INIT)], "rel": [full(_INIT)]}
        self.total_lowest = torch.tensor(float("inf"), dtype=x0.dtype, device=x0.device)
        self.best_f = x0
        self.last_fx = x0
        self.n = 0
        self.steps = []  # torchdeq's step number of each trace column after the first
        self.positions = frozenset()  # evaluations after which the best-so-far state is sampled (indexing)
        self.samples = []  # (evaluation, best-so-far state)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fx = self.f(x)
        self._record(x, fx)
        return fx

    @_checks.eager_under_compile(recursive=False)  # torch ops only: no wrapper, no cost per call
    def _record(self, x: torch.Tensor, fx: torch.Tensor) -> None:
        """The bookkeeping of one evaluation, run eagerly under torch.compile: its Python-int count
        made dynamo recompile it at every evaluation up to its recompile limit (with a warning)."""
        self.n += 1
        self.last_fx = fx
        diff = fx - x
        values = {"abs": diff.norm(dim=1)}
        values["rel"] = values["abs"] / (fx.norm(dim=1) + _EPS)
        if self.broyden and self.n == 1:
            self.at_x0 = values  # used only if the solve stops here (see info)
            return
        step = float(self.n - 1 if self.broyden else self.n)
        cand = x if self.broyden else fx
        if self.whole:
            total = diff.norm() if self.stop_mode == "abs" else diff.norm() / (fx.norm() + _EPS)
            better = (total < self.total_lowest) | self.return_final  # a 0-dim tensor: no host sync
            self.total_lowest = torch.where(better, total, self.total_lowest)
            self.best_f = torch.where(better, cand, self.best_f)
            for mode in ("abs", "rel"):
                self.lowest[mode] = torch.where(better, values[mode], self.lowest[mode])
                self.step[mode] = torch.where(better, step, self.step[mode])
        else:
            for mode in ("abs", "rel"):
                is_lowest = values[mode] < self.lowest[mode]
                if self.return_final:
                    is_lowest = torch.ones_like(is_lowest)
                if mode == self.stop_mode:
                    self.best_f = torch.where(is_lowest.unsqueeze(1), cand, self.best_f)
                self.lowest[mode] = torch.where(is_lowest, values[mode], self.lowest[mode])
                self.step[mode] = torch.where(is_lowest, torch.full_like(self.step[mode], step), self.step[mode])
        if not (self.anderson and self.n <= 2):
            for mode in ("abs", "rel"):
                self.trace[mode].append(values[mode])
            self.steps.append(self.n)
        if self.n in self.positions:
            self.samples.append((self.n, self.best_f))

    def cut_at_stop(self, tol: float) -> None:
        """Forget what was recorded after torchdeq's stop: the first step whose largest residual (under
        stop_mode) is under tol. deqfast's solver, checking every few evaluations on an accelerator,
        may make a few more (at frozen samples): torchdeq's trace pads those columns with the lowest
        and samples no state there. One host synchronisation."""
        if not self.steps:
            return
        under = (torch.stack(self.trace[self.stop_mode][1:]).amax(dim=1) < tol).nonzero()
        if under.numel() == 0:
            return
        last = int(under[0, 0]) + 1  # trace columns kept after the first
        if last < len(self.steps):
            stop_n = self.steps[last - 1]
            for mode in ("abs", "rel"):
                del self.trace[mode][1 + last:]
            del self.steps[last:]
            self.samples = [(n, t) for n, t in self.samples if n <= stop_n]

    def info(self, max_iter: int) -> SolverStat:
        if self.broyden and self.at_x0 is not None:
            # Every sample met tol at x0 (a warm start at the fixed point): deqfast's Broyden stopped
            # at its first evaluation, where torchdeq's makes one more (update 1, step 1). The stats
            # of step 1 are then those of the returned iterate, x0.
            missing = self.step[self.stop_mode] == 0
            for mode in ("abs", "rel"):
                self.lowest[mode] = torch.where(missing, self.at_x0[mode], self.lowest[mode])
                self.step[mode] = torch.where(missing, torch.ones_like(self.step[mode]), self.step[mode])
        traces = {}
        # torchdeq's trace length: max_iter + 1 columns (its initial 1e8 and one per step, padded with
        # the lowest after an early stop); Anderson's max_iter - 1 (steps 3..max_iter), 1 if max_iter <= 2.
        length = max(1, max_iter - 1) if self.anderson else max_iter + 1
        for mode in ("abs", "rel"):
            trace = list(self.trace[mode])
            trace += [self.lowest[mode]] * max(0, length - len(trace))  # torchdeq pads after its early stop
            traces[mode] = torch.stack(trace, dim=1)
        stat = SolverStat(abs_lowest=self.lowest["abs"], rel_lowest=self.lowest["rel"], abs_trace=traces["abs"],
                          rel_trace=traces["rel"], nstep=self.step[self.stop_mode].clone())
        return stat


def _solve(kind: str, func: Callable, x0: torch.Tensor, max_iter, tol, stop_mode, indexing, return_final,
           params: dict, whole: bool = False):
    """torchdeq's (z, trajectory, info) with deqfast's ``kind`` solver underneath."""
    shape = x0.shape
    rows = _batch_flatten(x0)
    B = rows.shape[0]

    def f_rows(x):
        z = x.view(shape) if x.is_contiguous() else x.reshape(shape)
        return _batch_flatten(func(z)).reshape(B, -1)

    max_iter = int(max_iter)
    broyden = kind == "broyden"
    tracker = _Tracker(f_rows, rows, stop_mode, whole, return_final, broyden=broyden, anderson=kind == "anderson")
    # Positions count evaluations. torchdeq's Broyden evaluates f max_iter + 1 times (x0, then one per
    # update) and samples the iterate after update k when k + 1 is listed (evaluation k + 1); its
    # Anderson makes its first step at its third evaluation and samples nothing before.
    evaluations = max_iter + 1 if broyden else max_iter
    first = {"broyden": 2, "anderson": 3}.get(kind, 1)
    tracker.positions = frozenset(int(p) for p in (indexing or ()) if first <= p <= evaluations)
    # torchdeq's Anderson records nothing before its third evaluation: with max_iter <= 2 it returns x0.
    skip = max_iter <= 0 or (kind == "anderson" and max_iter <= 2)
    if not skip:
        # One solve: the states at the indexing steps are sampled from the tracker as it goes (the
        # solver's history, Anderson's and Broyden's, runs on through them, as torchdeq's).
        _run(kind, tracker, rows, evaluations, 0.0 if return_final else tol, stop_mode, params, whole)
        if not return_final and not whole:
            tracker.cut_at_stop(tol)
    info = tracker.info(max_iter)
    if skip:  # no step: torchdeq returns x0 itself (requiring grad if it does)
        return x0, [x0] if indexing else [], info
    trajectory = [t.view(shape) for _, t in tracker.samples]
    if indexing and not trajectory:
        trajectory.append(tracker.best_f.view(shape))
    return tracker.best_f.detach().view(shape), [t.detach() for t in trajectory], info


def _run(kind, tracker, start, max_iter, tol, stop_mode, params, whole):
    """One deqfast solve of at most max_iter evaluations through ``tracker``; its SolverStats."""
    if whole:
        B, d = start.shape
        f = lambda y: tracker(y.view(B, d)).reshape(1, -1)
        x0 = start.reshape(1, -1)
    else:
        f, x0 = tracker, start
    common = dict(max_iter=int(max_iter), tol=float(tol), stop_mode=stop_mode)
    if kind == "anderson":
        _, stats = _solvers.anderson(f, x0, m=int(params.get("m", 6)), lam=params.get("lam", 1e-4),
                                     tau=params.get("tau", 1.0), **common)
    elif kind == "broyden":
        m = params.get("LBFGS_thres")
        _, stats = _solvers.broyden(f, x0, m=int(m if m is not None else max(max_iter, 1)), **common)
    else:
        _, stats = _solvers.fixed_point_iteration(f, x0, tau=params.get("tau", 1.0), **common)
    return stats


_KNOWN = {
    "anderson": ("m", "lam", "tau"),
    "broyden": ("LBFGS_thres", "ls"),
    "fixed_point": ("tau",),
}


def _params(name: str, kind: str, kwargs: dict) -> tuple:
    private = kwargs.pop("_compat", {})
    unknown = set(kwargs) - set(_KNOWN[kind])
    if unknown:
        warn_once(f"deqfast.compat.solver.{name}", unknown, "keyword(s)")
    if kwargs.get("ls"):
        warn_once(f"deqfast.compat.solver.{name}", ["ls"], "Broyden line search (deqfast's Broyden has none)")
    return kwargs, private


def anderson_solver(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, m=6, lam=1e-4, tau=1.0,
                    return_final=False, **kwargs):
    """torchdeq.solver.anderson_solver on deqfast's Anderson (see the module docstring)."""
    kwargs, private = _params("anderson_solver", "anderson", kwargs)
    tau = check_tau("deqfast.compat.solver.anderson_solver", "tau", tau)
    if tau > 1:  # over-relaxation, as torchdeq takes it (deqfast's own anderson keeps tau <= 1)
        tau = _checks.OverRelaxation(tau)
    return _solve("anderson", func, x0, max_iter, tol, stop_mode, indexing, return_final,
                  dict(m=m, lam=lam, tau=tau), **private)


def broyden_solver(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, LBFGS_thres=None, ls=False,
                   return_final=False, **kwargs):
    """torchdeq.solver.broyden_solver on deqfast's Broyden (at most LBFGS_thres updates, default
    max_iter as torchdeq; no line search: ls=True warns once)."""
    kwargs["ls"] = ls
    kwargs, private = _params("broyden_solver", "broyden", kwargs)
    return _solve("broyden", func, x0, max_iter, tol, stop_mode, indexing, return_final,
                  dict(LBFGS_thres=LBFGS_thres), **private)


def fixed_point_iter(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, tau=1.0,
                     return_final=False, **kwargs):
    """torchdeq.solver.fixed_point_iter on deqfast's fixed-point iteration (see the module docstring).
    With tau != 1, as torchdeq: the iterated map is the damped one, tau f(x) + (1 - tau) x; its
    residual (tau ‖f(x) − x‖) is recorded and tested, and its value (the next iterate) is what is
    returned and sampled at the indexing steps."""
    kwargs, private = _params("fixed_point_iter", "fixed_point", kwargs)
    if tau != 1.0:
        check_tau("deqfast.compat.solver.fixed_point_iter", "tau", tau)  # tau > 1 too, as torchdeq
        f = func
        func = lambda x: tau * f(x) + (1 - tau) * x  # torchdeq's expression, bit for bit
    return _solve("fixed_point", func, x0, max_iter, tol, stop_mode, indexing, return_final, dict(tau=1.0), **private)


def simple_fixed_point_iter(func, x0, max_iter=50, tau=1.0, indexing=None, **kwargs):
    """torchdeq.solver.simple_fixed_point_iter: exactly max_iter steps ``fx = func(x, tau=tau)``,
    no monitoring; returns the last f value and final-step stats, as torchdeq."""
    kwargs.pop("_compat", None)
    if tau != 1.0:
        check_tau("deqfast.compat.solver.simple_fixed_point_iter", "tau", tau)
    indexing_list = []
    fx = x = x0
    for k in range(int(max_iter)):
        x = fx
        fx = func(x, tau=tau)
        if indexing and (k + 1) in indexing:
            indexing_list.append(fx)
    return fx, indexing_list, solver_stat_from_final_step(x, fx, max_iter)


_solvers_dict = {
    "anderson": anderson_solver,
    "broyden": broyden_solver,
    "fixed_point_iter": fixed_point_iter,
    "simple_fixed_point_iter": simple_fixed_point_iter,
}

OWN_SOLVERS = frozenset(_solvers_dict.values())


def get_solver(key):
    """torchdeq.solver.get_solver: the solver function registered under ``key``."""
    if key not in _solvers_dict:
        raise ValueError(f"deqfast.compat: solver must be one of {', '.join(map(repr, _solvers_dict))}, got {key!r}")
    return _solvers_dict[key]


def register_solver(solver_type, solver):
    """torchdeq.solver.register_solver: make ``solver`` (torchdeq's solver signature) available as
    f_solver/b_solver = ``solver_type``."""
    _solvers_dict[solver_type] = solver
