"""Plumbing every solver shares: flattening, calling f safely, the loop's host check, the result."""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from .. import _checks
from ..reference import SampleState
from ..stats import SolverStats
from . import _active


class FlatProblem:
    """f on the flattened state: (B, d) -> (B, d), checking what f returns against z0."""

    def __init__(self, caller: str, f: Callable, z0: torch.Tensor):
        _checks.check_callable(caller, "f", f)
        _checks.check_z0(caller, z0)
        self.caller = caller
        self.f = f
        self.z0 = z0
        self.shape = z0.shape
        self.batch = z0.shape[0]
        self.x0 = z0.reshape(self.batch, -1)
        # A (B, d) state needs no reshaping on the way in and out (a few µs per call, which is
        # most of the solver's host time per iteration at small sizes).
        self.flat = z0.dim() == 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.flat:
            return _checks.call_f(self.caller, self.f, x, self.z0)
        z = x.view(self.shape) if x.is_contiguous() else x.reshape(self.shape)
        return _checks.call_f(self.caller, self.f, z, self.z0).reshape(self.batch, -1)

    def unflatten(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.shape)


def validate_common(caller: str, max_iter, tol, stop_mode, check_every) -> None:
    _checks.check_int(caller, "max_iter", max_iter, 1)
    _checks.check_real(caller, "tol", tol)
    _checks.check_choice(caller, "stop_mode", stop_mode, _checks.STOP_MODES)
    _checks.check_check_every(caller, check_every)


def default_check_every(device: torch.device) -> int:
    # On the CPU a host check is free; on an accelerator each one stalls the launch queue, and
    # finished samples are frozen on the device anyway, so checking rarely changes no result.
    return 1 if device.type == "cpu" else 4


def should_stop(state: SampleState, k: int, check_every: int, max_iter: int) -> bool:
    """After evaluation k (0-based): the loop's one host synchronisation, every ``check_every``
    evaluations, none after the last one (the loop ends there anyway)."""
    if not (k + 1 < max_iter and (k + 1) % check_every == 0):
        return False
    _active.publish(state.done)  # DEQ(compact=True): evaluate only the active samples from here
    return bool(state.done.all())


def finish(problem: FlatProblem, state: SampleState, solver: str, warn: bool = True):
    stats = SolverStats(
        nstep=state.nstep,
        residual=state.residual,
        rel_residual=state.rel_residual,
        converged=state.converged,
        failed=state.failed,
    )
    if warn:
        warn_failed(problem.caller, solver, stats)
    return problem.unflatten(state.best_x), stats


def warn_failed(caller: str, solver: str, stats: SolverStats) -> None:
    n_failed = int(stats.failed.sum())
    if n_failed:
        warnings.warn(
            f"{caller} ({solver}): {n_failed} of {stats.batch_size} samples produced NaN/Inf and were "
            f"frozen at their best finite iterate (stats.failed marks them; stats.converged is False)",
            RuntimeWarning,
            stacklevel=4,
        )


def resolve_check_every(check_every: Optional[int], x: torch.Tensor) -> int:
    return default_check_every(x.device) if check_every is None else check_every
