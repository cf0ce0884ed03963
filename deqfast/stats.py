"""Per-sample solver statistics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SolverStats:
    """Statistics of one fixed-point solve, one entry per sample (batch dim 0).

    Which state they describe: from a solver (``deqfast.solvers.*``), and for ``backward``
    "phantom" and "bptt", the best iterate z* the solver returns, as measured when the solver
    evaluated f there. For ``backward`` "implicit", "neumann" and "jfb", :func:`deqfast.fixed_point`
    and :class:`deqfast.DEQ` return f(z*), which they evaluate once more at the final z* of all
    samples together: residual, rel_residual and converged are measured at that evaluation
    (‖f(z*) − z*‖, ‖f(z*)‖), so they stay true when f couples the samples (a row frozen early may
    have drifted off its fixed point as the others moved; it then shows converged False). The
    norms are computed without overflow or underflow at any magnitude the dtype holds.

    With ``per_sample=False`` the whole state is one sample: every field still has shape (B,)
    and each row holds the one whole-state value (residual = ‖f(z) − z‖ over all of z).

    Attributes:
        nstep: (B,) int64, evaluations of f the sample consumed (it stops counting once frozen).
        residual: (B,) ‖f(z) − z‖₂ at the returned iterate z (inf if no finite iterate was seen).
        rel_residual: (B,) ‖f(z) − z‖₂ / ‖f(z)‖₂ at the returned iterate; from a solver, NaN where
            it could not be measured (an iterate shrunk so far that its squared norms underflow,
            all |z| below 2·sqrt(tiny) of the dtype; such a sample is not converged).
        converged: (B,) bool, the sample met ``tol`` under ``stop_mode`` (where measured, see above).
        failed: (B,) bool, f produced NaN/Inf for the sample; it was frozen at its best finite iterate.
        backward: statistics of the adjoint solve, filled in when the backward pass runs
            (``implicit``/``neumann`` modes), else None.
    """

    nstep: torch.Tensor
    residual: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor
    failed: torch.Tensor
    backward: Optional["SolverStats"] = field(default=None, repr=False)

    def __post_init__(self):
        # Statistics are measurements, never part of a graph: with backward="bptt" the residuals
        # are computed from recorded tensors, and a graph kept alive here would hold its memory.
        for name in ("nstep", "residual", "rel_residual", "converged", "failed"):
            setattr(self, name, getattr(self, name).detach())

    @property
    def batch_size(self) -> int:
        return self.nstep.shape[0]

    def summary(self) -> str:
        """One line: converged count, worst residual and mean steps (synchronises with the device).

        The worst relative residual is over the samples whose residual is finite: a failed
        sample's is NaN (measured at f(z*)) or inf, which would hide the others' worst."""
        n_conv = int(self.converged.sum())
        n_fail = int(self.failed.sum())
        measured = torch.isfinite(self.rel_residual)
        worst = float(self.rel_residual[measured].max()) if bool(measured.any()) else float("nan")
        scope = f" (of the {int(measured.sum())} finite)" if not bool(measured.all()) else ""
        text = (
            f"{n_conv}/{self.batch_size} converged, {n_fail} failed, "
            f"worst rel residual {worst:.3e}{scope}, mean nstep {self.nstep.double().mean():.1f}"
        )
        if self.backward is not None:
            text += f" | backward: {self.backward.summary()}"
        return text
