"""torchdeq.dropout in deqfast.compat: VariationalDropout, VariationalDropout1d/2d/3d,
VariationalDropToken1d/2d/3d, reset_dropout.

Own code adapting :class:`deqfast.VariationalDropout` (these classes are subclasses of it, so
deqfast.DEQ and deqfast.reset_dropout reset them too) to torchdeq 0.1.0's constructors
(``dropout=0.5, token_first=True``) and mask shapes: a mask drawn at the first training-mode call
after a reset, kept until the next reset, expanded to the input. On the CPU the mask is drawn exactly
as torchdeq draws it (same values for the same seed); on another device it is drawn there (torchdeq
0.1.0 draws it on the CPU, which then fails against a GPU input). Own code, not a call into torchdeq:
a drop-in must run where torchdeq is not installed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..dropout import VariationalDropout as _DeqfastVariationalDropout

__all__ = ["VariationalDropout", "VariationalDropout1d", "VariationalDropout2d", "VariationalDropout3d",
           "VariationalDropToken1d", "VariationalDropToken2d", "VariationalDropToken3d", "reset_dropout"]


class _VariationalDropoutNd(_DeqfastVariationalDropout):
    """Base: ``dropout`` in [0, 1]; ``_mask_shape(x)`` gives the mask's shape (1 = shared)."""

    def __init__(self, dropout=0.5, token_first=True):
        nn.Module.__init__(self)
        if dropout < 0 or dropout > 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout}")
        self.dropout = dropout
        self.p = float(dropout)
        self.token_first = token_first
        self.shared_dims = ()
        self.mask = None

    def _mask_shape(self, x):
        return tuple(x.shape)

    def reset_mask(self, x):
        shape = self._mask_shape(x)
        if x.device.type == "cpu":  # torchdeq's draw, value for value
            m = torch.zeros(*shape).bernoulli_(1 - self.dropout)
        else:
            m = torch.zeros(*shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.dropout)
        self.mask = m.requires_grad_(False) / (1 - self.dropout)

    def forward(self, x):
        if not self.training or self.dropout == 0.0:
            return x
        if self.mask is None:
            self.reset_mask(x)
        return self.mask.expand_as(x) * x

    def extra_repr(self):
        return f"dropout={self.dropout}"


class VariationalDropout(_VariationalDropoutNd):
    """One mask value per element of the input (torchdeq.VariationalDropout(dropout=0.5))."""

    def __init__(self, dropout=0.5):
        super().__init__(dropout)


def _feature_dropout(n_dims, doc):
    class _Cls(_VariationalDropoutNd):
        __doc__ = doc

        def _mask_shape(self, x):
            B, D = (x.shape[0], x.shape[-1]) if self.token_first else (x.shape[0], x.shape[1])
            return (B, *([1] * n_dims), D) if self.token_first else (B, D, *([1] * n_dims))
    return _Cls


def _token_dropout(n_dims, doc):
    class _Cls(_VariationalDropoutNd):
        __doc__ = doc

        def _mask_shape(self, x):
            return (*x.shape[:1 + n_dims], 1) if self.token_first else (x.shape[0], 1, *x.shape[2:2 + n_dims])
    return _Cls


VariationalDropout1d = _feature_dropout(1, "Feature dropout of (B, L, D) (token_first) or (B, D, L): one mask per (sample, feature).")
VariationalDropout2d = _feature_dropout(2, "Feature dropout of (B, H, W, D) (token_first) or (B, D, H, W): one mask per (sample, feature).")
VariationalDropout3d = _feature_dropout(3, "Feature dropout of (B, T, H, W, D) (token_first) or (B, D, T, H, W): one mask per (sample, feature).")
VariationalDropToken1d = _token_dropout(1, "Token dropout of (B, L, D) (token_first) or (B, D, L): one mask per (sample, token).")
VariationalDropToken2d = _token_dropout(2, "Token dropout of (B, H, W, D) (token_first) or (B, D, H, W): one mask per (sample, position).")
VariationalDropToken3d = _token_dropout(3, "Token dropout of (B, T, H, W, D) (token_first) or (B, D, T, H, W): one mask per (sample, position).")
for _name in ("VariationalDropout1d", "VariationalDropout2d", "VariationalDropout3d",
              "VariationalDropToken1d", "VariationalDropToken2d", "VariationalDropToken3d"):
    globals()[_name].__name__ = globals()[_name].__qualname__ = _name
del _name


def reset_dropout(model):
    """torchdeq.reset_dropout: forget the mask of every variational dropout in ``model`` (compat's
    and deqfast's), so the next training-mode forward draws new ones."""
    for module in model.modules():
        if isinstance(module, _DeqfastVariationalDropout):
            module.mask = None
