"""Variational dropout for equilibrium models: one mask per forward pass, shared by every f call.

Ordinary dropout draws a new mask at each call of f, so f changes from one solver iteration to the
next: there is no fixed point to converge to, and the implicit gradient (which assumes one f)
does not hold. Variational dropout (Gal & Ghahramani 2016; used by Bai et al.'s DEQs) draws the
mask at the first call after a reset and reuses it until the next reset.
"""
from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import Optional, Sequence

import torch
from torch import nn


class VariationalDropout(nn.Module):
    """Dropout with a mask kept fixed across the solver's calls of f until :func:`reset_dropout`.

    In training mode, multiplies x by a mask of zeros (probability ``p``) and 1/(1 − p), drawn on
    x's device and dtype at the first call after a reset; in eval mode, or with p = 0, the identity.
    :class:`deqfast.DEQ` resets the masks of its cell's VariationalDropout modules at every forward
    in training mode; with :func:`deqfast.fixed_point`, call :func:`reset_dropout` once per step.

    Args:
        p: probability of zeroing an element, in [0, 1).
        shared_dims: dims of x along which one mask value is shared (size 1 in the mask), e.g.
            (2, 3) for channel dropout of (B, C, H, W) features, (1,) for the same feature mask on
            every token of (B, L, D). The batch dim 0 is never shared: each sample has its own mask.
    """

    def __init__(self, p: float = 0.5, shared_dims: Sequence[int] = ()):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
            raise ValueError(f"deqfast.VariationalDropout: p must be a probability in [0, 1), got {p!r}")
        dims = tuple(shared_dims)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise ValueError(f"deqfast.VariationalDropout: shared_dims must be dims >= 1 (dim 0 is the batch), got {shared_dims!r}")
        self.p = float(p)
        self.shared_dims = dims
        self.mask: Optional[torch.Tensor] = None

    def reset(self) -> None:
        """Forget the mask: the next call in training mode draws a new one."""
        self.mask = None

    def _draw(self, x: torch.Tensor) -> torch.Tensor:
        if any(d >= x.dim() for d in self.shared_dims):
            raise ValueError(f"deqfast.VariationalDropout: shared_dims {self.shared_dims} do not fit an input of "
                             f"{x.dim()} dims, shape {tuple(x.shape)}")
        shape = [1 if d in self.shared_dims else n for d, n in enumerate(x.shape)]
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p)
        return keep / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        users = _USERS.get()
        if users is not None:  # inside a DEQ's forward: that layer resets this mask at its next one
            users[id(self)] = self
        if self.mask is None:
            self.mask = self._draw(x)
        expected = [1 if d in self.shared_dims else n for d, n in enumerate(x.shape)]
        if list(self.mask.shape) != expected:
            raise ValueError(
                f"deqfast.VariationalDropout: input of shape {tuple(x.shape)} does not match the mask drawn for "
                f"shape {tuple(self.mask.shape)}; call deqfast.reset_dropout(model) before each new batch"
            )
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}" + (f", shared_dims={self.shared_dims}" if self.shared_dims else "")


# The VariationalDropout modules called during a DEQ's forward (by id), for that layer to reset:
# its cell may be a plain callable (a lambda around a module), whose modules it cannot list.
_USERS: contextvars.ContextVar = contextvars.ContextVar("deqfast_dropout_users", default=None)


@contextlib.contextmanager
def record_users(users: dict):
    """Inside this block the VariationalDropout modules that apply a mask are added to ``users``."""
    token = _USERS.set(users)
    try:
        yield users
    finally:
        _USERS.reset(token)


def reset_dropout(module: nn.Module) -> None:
    """Reset the mask of every :class:`VariationalDropout` in ``module`` (and itself)."""
    for m in module.modules():
        if isinstance(m, VariationalDropout):
            m.reset()
