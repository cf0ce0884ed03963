"""States made of several tensors (e.g. multi-resolution features), packed into one (B, D) tensor.

The solvers and the backward see one state; every decision stays per sample, over all the parts
of a sample together. Packing is a concatenation and unpacking returns views, both differentiable,
so gradients reach each part.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch

from . import _checks

Parts = Union[list, tuple]


class PackedState:
    """The layout of a list/tuple state: each part's shape, and its width in the packed (B, D)."""

    def __init__(self, caller: str, parts: Parts, name: str = "z0"):
        if not parts:
            raise ValueError(f"{caller}: {name} must be a tensor or a non-empty list/tuple of tensors, got an empty {type(parts).__name__}")
        for i, part in enumerate(parts):
            if not isinstance(part, torch.Tensor):
                raise TypeError(f"{caller}: {name}[{i}] must be a torch.Tensor (a list/tuple {name} is a state of several "
                                f"tensors), got {type(part).__name__}; for an array of numbers pass a tensor, "
                                f"e.g. torch.tensor(...) or torch.as_tensor(...)")
            _checks.check_z0(caller, part, name=f"{name}[{i}]")
        first = parts[0]
        for i, part in enumerate(parts[1:], start=1):
            for what, value, expected in (("batch size", part.shape[0], first.shape[0]),
                                          ("dtype", part.dtype, first.dtype), ("device", part.device, first.device)):
                if value != expected:
                    raise ValueError(f"{caller}: {name}[{i}] must have the {what} of {name}[0], {expected}, got {value}")
        self.caller = caller
        self.container = type(parts) if type(parts) in (list, tuple) else tuple
        self.batch = first.shape[0]
        self.shapes = [part.shape for part in parts]
        self.widths = [math.prod(part.shape[1:]) for part in parts]  # also for an empty batch

    def pack(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, D): the parts flattened per sample and concatenated."""
        return torch.cat([part.reshape(self.batch, w) for part, w in zip(parts, self.widths)], dim=1)

    def unpack(self, z: torch.Tensor) -> Parts:
        """The parts of a packed (B, D) tensor, as views, in the container type of z0."""
        return self.container(part.view(shape) if part.is_contiguous() else part.reshape(shape)
                              for part, shape in zip(z.split(self.widths, dim=1), self.shapes))

    def wrap(self, f: Callable, star: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """f on packed states: f(parts) -> parts (``star``: f(*parts), torchdeq's convention),
        each part of its output checked against the input's."""

        def packed_f(z: torch.Tensor) -> torch.Tensor:
            parts = self.unpack(z)
            out = f(*parts) if star else f(parts)
            if not isinstance(out, (list, tuple)) or len(out) != len(parts):
                got = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (list, tuple)) else type(out).__name__
                raise TypeError(f"{self.caller}: f(z) must return a list/tuple of {len(parts)} tensors like z0, got {got}")
            return self.pack([_checks.f_output(self.caller, o, p, what=f"f(z)[{i}]", like_name=f"z0[{i}]")
                              for i, (o, p) in enumerate(zip(out, parts))])

        return packed_f
