"""deqfast.DEQ: a drop-in equilibrium layer around a cell f(z, x) -> z."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .dropout import VariationalDropout, reset_dropout
from .solvers import _active
from .functional import solve
from .options import Options
from .stats import SolverStats


class DEQ(nn.Module):
    """z* = cell(z*, x), differentiated implicitly (or as ``backward`` says).

    Args:
        cell: module or callable (z, x) -> z with z of the shape of z0 (by default that of x);
            for a state of several tensors, z0 is a list/tuple and cell maps one to one like it.
        compact: evaluate the cell only on the samples still active (not yet converged) at the
            solver's last host check (every ``check_every`` evaluations): it gathers their rows of
            z and x (a tensor with the batch on dim 0), calls the cell and scatters the result. Only
            for cells whose samples are independent (no batch statistics); same result as
            compact=False to the tolerance. Not for backward="bptt" (ignored there).
        **keywords: those of :func:`deqfast.fixed_point` (solver, max_iter, tol, backward, ...).

    In training mode each forward first resets the masks of the cell's
    :class:`deqfast.VariationalDropout` modules, so every f call of one forward shares a mask.

    Attributes:
        stats: :class:`SolverStats` of the last forward solve (``stats.backward`` after backward).

    Example:
        >>> layer = deqfast.DEQ(cell, solver="anderson", max_iter=30, backward="implicit")
        >>> z = layer(x)            # (B, ...) like x
    """

    def __init__(self, cell, *, compact: bool = False, **keywords):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"deqfast.DEQ: cell must be callable (z, x) -> z, got {type(cell).__name__}")
        if not isinstance(compact, bool):
            raise TypeError(f"deqfast.DEQ: compact must be a bool, got {type(compact).__name__} {compact!r}")
        self.cell = cell
        self.compact = compact
        self.options = Options.build("deqfast.DEQ", **keywords)
        if compact and not self.options.per_sample:
            raise ValueError("deqfast.DEQ: compact=True gathers the samples still active, which needs per_sample=True "
                             "(independent samples); got per_sample=False (one coupled state)")
        if compact and self.options.cuda_graph:
            raise ValueError("deqfast.DEQ: compact=True changes the shapes f sees as samples finish, which a captured "
                             "CUDA graph cannot replay; use compact=True or cuda_graph=True, got both")
        self.stats: Optional[SolverStats] = None
        self.rows_evaluated: Optional[int] = None  # compact=True: cell rows evaluated by the last solve

    def forward(self, x, z0=None):
        if z0 is None:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"deqfast.DEQ: x must be a torch.Tensor when z0 is not given, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"deqfast.DEQ: x must be floating point when z0 is not given (z0 = zeros_like(x)), got {x.dtype}")
            z0 = torch.zeros_like(x)
        if self.training and isinstance(self.cell, nn.Module):
            reset_dropout(self.cell)  # one variational-dropout mask per forward, fixed during the solve
        if self.compact and self.options.backward != "bptt":
            return self._compact_forward(x, z0)
        z, self.stats = solve(lambda z: self.cell(z, x), z0, self.options, caller="deqfast.DEQ")
        return z

    def _compact_forward(self, x, z0):
        """The solve with the cell evaluated on the samples still active at the last host check.

        Each call gathers those samples' rows of z and x, calls the cell on them and scatters the
        result; a finished sample (frozen by the solver, its f-value unused) gets its own z back.
        f at z* (the differentiable step) and the backward use the whole batch."""
        caller = "deqfast.DEQ (compact=True)"
        B = (z0[0] if isinstance(z0, (list, tuple)) and z0 else z0).shape[0]
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != B:
            got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{caller}: x must be a tensor with the batch ({B} samples) on dim 0, to be gathered "
                            f"with the active samples; got {got}. Use compact=False for other inputs")
        if self.training and isinstance(self.cell, nn.Module) and any(
                isinstance(mod, VariationalDropout) and mod.p > 0 for mod in self.cell.modules()):
            raise ValueError(f"{caller}: a VariationalDropout in the cell keeps one mask per sample of the whole "
                             f"batch, which compaction cannot gather; use compact=False in training")
        active = _active.ActiveSet()
        evaluated = [0]
        solving = [True]

        def f(z):
            index = active.index if solving[0] else None
            if index is None:
                evaluated[0] += B
                return self.cell(z, x)
            evaluated[0] += int(index.numel())
            if isinstance(z, (list, tuple)):
                out = self.cell(type(z)(part.index_select(0, index) for part in z), x.index_select(0, index))
                return type(z)(part.index_copy(0, index, o) for part, o in zip(z, out))
            return z.index_copy(0, index, self.cell(z.index_select(0, index), x.index_select(0, index)))

        def solver_done(_stats):
            solving[0] = False

        with _active.track(active):
            z, self.stats = solve(f, z0, self.options, caller="deqfast.DEQ", after_solver=solver_done)
        self.rows_evaluated = evaluated[0]
        return z

    def extra_repr(self) -> str:
        o = self.options
        return f"solver={o.solver!r}, max_iter={o.max_iter}, tol={o.tol}, backward={o.backward!r}"
