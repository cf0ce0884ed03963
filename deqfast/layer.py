"""deqfast.DEQ: a drop-in equilibrium layer around a cell f(z, x) -> z."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .dropout import reset_dropout
from .functional import solve
from .options import Options
from .stats import SolverStats


class DEQ(nn.Module):
    """z* = cell(z*, x), differentiated implicitly (or as ``backward`` says).

    Args:
        cell: module or callable (z, x) -> z with z of the shape of z0 (by default that of x);
            for a state of several tensors, z0 is a list/tuple and cell maps one to one like it.
        **keywords: those of :func:`deqfast.fixed_point` (solver, max_iter, tol, backward, ...).

    In training mode each forward first resets the masks of the cell's
    :class:`deqfast.VariationalDropout` modules, so every f call of one forward shares a mask.

    Attributes:
        stats: :class:`SolverStats` of the last forward solve (``stats.backward`` after backward).

    Example:
        >>> layer = deqfast.DEQ(cell, solver="anderson", max_iter=30, backward="implicit")
        >>> z = layer(x)            # (B, ...) like x
    """

    def __init__(self, cell, **keywords):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"deqfast.DEQ: cell must be callable (z, x) -> z, got {type(cell).__name__}")
        self.cell = cell
        self.options = Options.build("deqfast.DEQ", **keywords)
        self.stats: Optional[SolverStats] = None

    def forward(self, x, z0=None):
        if z0 is None:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"deqfast.DEQ: x must be a torch.Tensor when z0 is not given, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"deqfast.DEQ: x must be floating point when z0 is not given (z0 = zeros_like(x)), got {x.dtype}")
            z0 = torch.zeros_like(x)
        if self.training and isinstance(self.cell, nn.Module):
            reset_dropout(self.cell)  # one variational-dropout mask per forward, fixed during the solve
        z, self.stats = solve(lambda z: self.cell(z, x), z0, self.options, caller="deqfast.DEQ")
        return z

    def extra_repr(self) -> str:
        o = self.options
        return f"solver={o.solver!r}, max_iter={o.max_iter}, tol={o.tol}, backward={o.backward!r}"
