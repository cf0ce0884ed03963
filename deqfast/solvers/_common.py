"""Plumbing every solver shares: flattening, calling f safely, the loop's host check, the result."""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import math
from typing import Callable, Optional

import torch

from .. import _checks
from ..reference import SampleState, accumulation_dtype
from ..stats import SolverStats
from . import _active


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
    """f on the flattened state: (B, d) -> (B, d), checking what f returns against z0.

    ``per_sample=False`` flattens the whole state into one row (1, B·d): every per-sample
    mechanism of the solvers (convergence test, freezing, best iterate) then acts on the whole
    state at once, as a state whose rows f couples needs.

    Range: the solver's norms and Gram entries are sums of squares in the accumulation dtype,
    which overflow for float32 values above ~1e19 (float64 ~1e154) and underflow to 0 below
    ~1e-19 (~1e-154). f is evaluated at z0 once here (the solvers' first evaluation); a row whose
    max(|z0|, |f(z0)|) lies outside a safe range (:func:`_safe_exponents`) is solved as the
    exactly rescaled problem x' = s x, f'(x') = s f(x'/s) with s a power of two, which maps the
    iterates of every solver exactly (they are scale-equivariant; Anderson's ridge is relative).
    The solver's stats are divided by s again in :func:`finish`. Under stop_mode "rel" each row
    gets its own s (so a row's result does not depend on the others); under "abs" the criterion
    ‖g‖ < tol needs one s for the batch (``tol_for`` returns tol·s). Deciding costs one host sync
    per solve; in range (the normal case) nothing else changes.
    """

    def __init__(self, caller: str, f: Callable, z0: torch.Tensor, per_sample: bool = True,
                 stop_mode: str = "rel"):
        _checks.check_callable(caller, "f", f)
        if _ENTRY.get() is None:  # a user's f; inside fixed_point/DEQ/backward f is deqfast's own wrapper
            _checks.check_arguments(caller, "f", f, "a callable z -> f(z) of one argument", 1,
                                    "close over the other arguments, e.g. f = lambda z: cell(z, x)")
        _checks.check_z0(caller, z0)
        per_sample = check_per_sample(caller, per_sample)
        self.caller = _ENTRY.get() or caller
        self.f = f
        self.z0 = z0
        self.shape = z0.shape
        self.batch = z0.shape[0]
        self.per_sample = per_sample
        self.rows = self.batch if per_sample or self.batch == 0 else 1
        # d per row; reshape(B, -1) is ambiguous for an empty batch
        self.width = z0.numel() // self.rows if self.rows else math.prod(z0.shape[1:])
        x0 = z0.reshape(self.rows, self.width)
        # The solvers and fused ops work on a contiguous (rows, d) state: a transposed, sliced,
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
        self.flat = z0.dim() == 2 and per_sample
        self.scale = None  # (rows, 1) powers of two in z0's dtype, or None: no rescaling
        self.abs_scale = 1.0
        fx0 = self._call(self.x0)
        self._choose_scale(fx0, stop_mode)
        self._first = fx0 if self.scale is None else fx0 * self.scale

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if self.flat:
            return _checks.call_f(self.caller, self.f, x, self.z0)
        z = x.view(self.shape) if x.is_contiguous() else x.reshape(self.shape)
        return _checks.call_f(self.caller, self.f, z, self.z0).reshape(self.rows, self.width)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._first is not None and x is self.x0:  # the solvers' first evaluation, made in __init__
            fx, self._first = self._first, None
            return fx
        self._first = None
        if self.scale is None:
            return self._call(x)
        return self._call(x / self.scale) * self.scale

    def _choose_scale(self, fx0: torch.Tensor, stop_mode: str) -> None:
        x0 = self.x0
        if x0.numel() == 0:
            return
        acc = accumulation_dtype(x0.dtype)
        lo, hi = _safe_exponents(acc, x0.shape[1])
        with torch.no_grad():
            # max(|z0|, |f(z0)|) of each row, exactly (the upcast to acc is exact), in few ops: this
            # runs once per solve, where a small problem's time is mostly the ops' host cost.
            amax = torch.linalg.vector_norm(torch.cat((x0, fx0), 1), math.inf, dim=1, dtype=acc)
            # frexp's exponent e (amax in [2^(e-1), 2^e)) is <= lo iff amax < 2^lo, and > hi iff
            # amax >= 2^hi; NaN compares False, inf and 0 are kept out: a finite positive amax outside.
            outside = ((amax < 2.0 ** lo) & (amax > 0)) | ((amax >= 2.0 ** hi) & (amax < math.inf))
            if not bool(outside.any()):  # the one host sync of the decision
                return
            exponent = torch.frexp(amax).exponent.to(acc)
            # The state's dtype must hold s exactly: exponents within its normal range.
            limit = float(math.floor(math.log2(torch.finfo(x0.dtype).max)) - 1)
            if stop_mode == "abs":  # one s for the batch: tol·s is one number
                e_max = float(torch.where(torch.isfinite(amax) & (amax > 0), exponent, -math.inf).max())
                # Too large: bring the largest row just inside the range, so that the smaller rows
                # keep as much headroom below as possible; all too small: bring it to ~1.
                k = hi - e_max if e_max > hi else -e_max
                k = max(-limit, min(limit, k))
                self.abs_scale = 2.0 ** k
                shift = torch.full_like(exponent, k)
            else:
                shift = torch.where(outside, -exponent, 0.0).clamp(-limit, limit)
            self.scale = torch.exp2(shift).to(x0.dtype).unsqueeze(1)
        self.x0 = x0 * self.scale

    def tol_for(self, tol: float, stop_mode: str) -> float:
        """The tolerance of the (rescaled) problem the solver sees."""
        return tol * self.abs_scale if stop_mode == "abs" else tol

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.scale is None else x / self.scale

    def unflatten(self, x: torch.Tensor) -> torch.Tensor:
        return self.unscale(x).reshape(self.shape)


def _safe_exponents(acc: torch.dtype, d: int):
    """(lo, hi): rows whose largest |value| lies in [2^lo, 2^hi) are solved unscaled.

    hi: d squares of values up to 2^hi, with a margin of 2^8 on the values (residuals f − x,
    Anderson's extrapolation, Gram sums), stay finite. lo: the residual at the dtype's relative
    precision (2^-nmant of the values), with the same margin, squares to a normal number.
    """
    info = torch.finfo(acc)
    max_exp = math.log2(info.max)
    min_exp = math.log2(info.tiny)
    mant = -math.log2(info.eps)
    hi = math.floor((max_exp - 1 - 16 - math.log2(max(d, 1))) / 2)
    lo = math.ceil(min_exp / 2 + mant + 8)
    return lo, hi


def check_per_sample(caller: str, per_sample) -> bool:
    return _checks.check_bool(caller, "per_sample", per_sample, "True: dim 0 is a batch of independent samples; "
                                                                  "False: the whole state is one sample")


def row_norms(v: torch.Tensor) -> torch.Tensor:
    """‖v_i‖₂ of each row of v (R, d), in the accumulation dtype, without overflow or underflow:
    each row is multiplied by a power of two near 1/max|v_i| first (exactly) and the norm by its
    inverse after. For the stats measured once per solve (not per iteration)."""
    acc = accumulation_dtype(v.dtype)
    v = v.detach().to(acc)
    if v.shape[1] == 0:  # rows of no element (a (B, 0) state, as the solvers take): norm 0
        return v.new_zeros(v.shape[0])
    amax = v.abs().amax(dim=1, keepdim=True)
    limit = math.floor(math.log2(torch.finfo(acc).max)) - 1
    exponent = torch.frexp(amax).exponent.clamp(-limit, limit)
    usable = torch.isfinite(amax) & (amax > 0)
    scale = torch.where(usable, torch.ldexp(torch.ones_like(amax), -exponent), torch.ones_like(amax))
    return torch.linalg.vector_norm(v * scale, dim=1) / scale.squeeze(1)


def measure_at(stats: SolverStats, z: torch.Tensor, fz: torch.Tensor, tol: float, stop_mode: str,
               per_sample: bool) -> None:
    """Replace ``stats``' residuals by those measured at an evaluation fz = f(z) of the returned
    iterate z (in place), and ``converged`` by the criterion there; no host synchronisation."""
    B = z.shape[0]
    rows = B if per_sample else 1
    z, fz = z.detach().reshape(rows, -1), fz.detach().reshape(rows, -1)
    residual = row_norms(fz - z)
    f_norm = row_norms(fz)
    rel = residual / f_norm.clamp_min(torch.finfo(f_norm.dtype).tiny)
    finite = torch.isfinite(residual) & torch.isfinite(f_norm)
    converged = finite & ((rel if stop_mode == "rel" else residual) < tol)
    if not per_sample:
        residual, rel, converged = residual.expand(B), rel.expand(B), converged.expand(B)
    stats.residual = residual.clone()
    stats.rel_residual = rel.clone()
    stats.converged = converged & ~stats.failed


def validate_common(caller: str, max_iter, tol, stop_mode, check_every):
    """(max_iter, tol, check_every) checked, as Python numbers."""
    max_iter = _checks.check_int(caller, "max_iter", max_iter, 1)
    tol = _checks.check_real(caller, "tol", tol)
    _checks.check_choice(caller, "stop_mode", stop_mode, _checks.STOP_MODES)
    return max_iter, tol, _checks.check_check_every(caller, check_every)


def default_check_every(device: torch.device) -> int:
    # On the CPU a host check is free; on an accelerator each one stalls the launch queue, and
    # finished samples are frozen on the device anyway, so checking rarely changes no result.
    return 1 if device.type == "cpu" else 4


def should_stop(state: SampleState, k: int, check_every: int, max_iter: int) -> bool:
    """After evaluation k (0-based): the loop's one host synchronisation, every ``check_every``
    evaluations, none after the last one (the loop ends there anyway)."""
    if not (k + 1 < max_iter and (k + 1) % check_every == 0):
        return False
    done = state.done  # one op (converged | failed), used twice
    _active.publish(done)  # DEQ(compact=True): evaluate only the active samples from here
    return bool(done.all())


class HostDone:
    """Per-sample done flags (uint8, B) that a fused CPU step writes at every step (converged or
    failed, now or before: the values of ``state.done`` after that step), read by the host check
    straight from their memory: no op per check (``state.done`` and ``.all()`` cost two op
    dispatches, a few µs, at every iteration of a CPU solve, where check_every = 1). CPU tensors
    only (the memory is read synchronously after the op has returned); the tensor must outlive this
    object's use (the solve's workspace holds it)."""

    __slots__ = ("tensor", "_bytes")

    def __init__(self, flags: torch.Tensor):
        assert flags.device.type == "cpu" and flags.dtype == torch.uint8 and flags.is_contiguous()
        self.tensor = flags
        self._bytes = (ctypes.c_char * flags.numel()).from_address(flags.data_ptr())

    def should_stop(self, k: int, check_every: int, max_iter: int) -> bool:
        """As :func:`should_stop` (the same checks, the same publication) from these flags."""
        if not (k + 1 < max_iter and (k + 1) % check_every == 0):
            return False
        if _active.tracking():
            _active.publish(self.tensor.bool())
        return b"\0" not in self._bytes.raw


def finish(problem: FlatProblem, state: SampleState, solver: str, warn: bool = True):
    residual = state.residual
    if problem.scale is not None:
        residual = residual / problem.scale.squeeze(1).to(residual.dtype)
    rel_residual, converged = state.rel_residual, state.converged
    # One host sync: the failed samples (warned about) and the zero relative residuals (checked below).
    n_failed, n_zero = (int(n) for n in torch.stack((state.failed.sum(), (rel_residual == 0).sum())).tolist())
    if n_zero:  # rare: an exact solve, or squared norms that underflowed
        rel_residual, converged = _unmeasured_rel(state, solver)
    stats = SolverStats(
        nstep=state.nstep,
        residual=residual,
        rel_residual=rel_residual,
        converged=converged,
        failed=state.failed,
    )
    if not problem.per_sample:
        stats = broadcast_stats(stats, problem.batch)
    if warn and n_failed:
        warn_failed(problem.caller, solver, stats)
    return problem.unflatten(state.best_x), stats


def _unmeasured_rel(state: SampleState, solver: str):
    """(rel_residual, converged) with the relative residuals that were not measured marked NaN (and
    under stop_mode "rel" not converged).

    The trackers measure ‖f(x) − x‖ / ‖f(x)‖ from sums of squares. An iterate whose every element lies
    below 2·sqrt(tiny) in magnitude (float32 ~2.2e-19, float64 ~3e-154: a state shrinking toward a
    fixed point at 0, f(z) = 0.5 z, far below the range z0 was in) has squares that are not normal
    numbers: both sums can underflow to 0, and the ratio, read as 0/tiny = 0, would claim an exact
    solve whatever the truth (1 for f(z) = 0.5 z). A zero relative residual at such an iterate is not
    a measurement: NaN, not converged. An iterate that is exactly 0 keeps its 0 (a fixed point at 0
    with f(0) = 0, as :func:`measure_at` reports it). ``tiny`` is that of the dtype the solver squares
    in: the accumulation dtype, the state's for Broyden (its squares of half states are half).
    """
    x = state.best_x.detach()
    squares = x.dtype if solver == "broyden" else accumulation_dtype(x.dtype)
    limit = 2.0 * math.sqrt(torch.finfo(squares).tiny)
    amax = x.abs().amax(dim=1).to(accumulation_dtype(x.dtype)) if x.shape[1] else x.new_zeros(x.shape[0])
    unmeasured = (state.rel_residual == 0) & (amax > 0) & (amax < limit)
    rel = torch.where(unmeasured, float("nan"), state.rel_residual)
    converged = state.converged & ~unmeasured if state.rel else state.converged
    return rel, converged


def broadcast_stats(stats: SolverStats, batch: int) -> SolverStats:
    """The stats of a whole-state (per_sample=False) solve, (1,) each, as (B,) copies."""
    return SolverStats(**{name: getattr(stats, name).expand(batch).clone()
                          for name in ("nstep", "residual", "rel_residual", "converged", "failed")})


def warn_failed(caller: str, solver: str, stats: SolverStats) -> None:
    n_failed = int(stats.failed.sum())  # a second sync, only when some sample failed
    if n_failed:
        _checks.warn(
            f"{caller} ({solver}): {n_failed} of {stats.batch_size} samples produced NaN/Inf and were "
            f"frozen at their best finite iterate (stats.failed marks them; stats.converged is False)",
            RuntimeWarning,
        )


def resolve_check_every(check_every: Optional[int], x: torch.Tensor) -> int:
    return default_check_every(x.device) if check_every is None else check_every
