"""Plumbing every solver shares: flattening, calling f safely, the loop's host check, the result."""
from __future__ import annotations

import contextlib
import math
import contextvars
from typing import Callable, Optional

import torch

from .. import _checks
from ..reference import SampleState
from ..stats import SolverStats


# The public entry a solver runs under (deqfast.fixed_point, deqfast.DEQ, ...), so that its
# warnings name what the user called rather than the internal solver.
_ENTRY: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("deqfast_entry", default=None)


@contextlib.contextmanager
def entry(caller: str):
    """Solvers run inside this block report their warnings as ``caller``."""
    token = _ENTRY.set(caller)
    try:
        yield
    finally:
        _ENTRY.reset(token)


class FlatProblem:
    """f on the flattened state: (B, d) -> (B, d), checking what f returns against z0."""

    def __init__(self, caller: str, f: Callable, z0: torch.Tensor):
        _checks.check_callable(caller, "f", f)
        _checks.check_z0(caller, z0)
        self.caller = _ENTRY.get() or caller
        self.f = f
        self.z0 = z0
        self.shape = z0.shape
        self.batch = z0.shape[0]
        self.width = math.prod(z0.shape[1:])  # d; reshape(B, -1) is ambiguous for an empty batch
        x0 = z0.reshape(self.batch, self.width)
        # The solvers and fused ops work on a contiguous (B, d) state: a transposed, sliced,
        # permuted, channels_last or expanded (stride 0) z0 is copied once here, never written into.
        if not x0.is_contiguous():
            x0 = x0.contiguous()
        # An inference tensor (a warm start made under torch.inference_mode) cannot be saved for
        # backward; outside inference mode the solve starts from a normal copy.
        if x0.is_inference() and not torch.is_inference_mode_enabled():
            x0 = x0.clone()
        self.x0 = x0
        # A (B, d) state needs no reshaping on the way in and out (a few µs per call, which is
        # most of the solver's host time per iteration at small sizes).
        self.flat = z0.dim() == 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.flat:
            return _checks.call_f(self.caller, self.f, x, self.z0)
        z = x.view(self.shape) if x.is_contiguous() else x.reshape(self.shape)
        return _checks.call_f(self.caller, self.f, z, self.z0).reshape(self.batch, self.width)

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
    return k + 1 < max_iter and (k + 1) % check_every == 0 and bool(state.done.all())


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
        _checks.warn(
            f"{caller} ({solver}): {n_failed} of {stats.batch_size} samples produced NaN/Inf and were "
            f"frozen at their best finite iterate (stats.failed marks them; stats.converged is False)",
            RuntimeWarning,
        )


def resolve_check_every(check_every: Optional[int], x: torch.Tensor) -> int:
    return default_check_every(x.device) if check_every is None else check_every
