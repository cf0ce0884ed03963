"""A side channel from a solver's host checks to a compacting f (``DEQ(cell, compact=True)``).

At each host check (every ``check_every`` evaluations, ``_common.should_stop``) the solver
publishes which samples are done; a compacting f then evaluates the cell on the other samples
only, until the next check. Nothing is published unless a :func:`track` is open around the solve.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

_TRACK: contextvars.ContextVar = contextvars.ContextVar("deqfast_active_samples", default=None)


class ActiveSet:
    """The samples still active at the last host check (``index``: None means all of them)."""

    def __init__(self):
        self.index: Optional[torch.Tensor] = None
        self.rows_evaluated = 0  # sum over f calls of the samples evaluated (benchmarks read it)

    def publish(self, done: torch.Tensor) -> None:
        active = ~done
        self.index = None if bool(active.all()) else active.nonzero().squeeze(1)


@contextlib.contextmanager
def track(active: ActiveSet):
    token = _TRACK.set(active)
    try:
        yield active
    finally:
        _TRACK.reset(token)
        active.index = None


@contextlib.contextmanager
def hidden():
    """Inside this block no set is tracked: a solve nested in the compacting f (a cell that solves
    an equilibrium of its own) publishes nothing to the enclosing solve's set."""
    token = _TRACK.set(None)
    try:
        yield
    finally:
        _TRACK.reset(token)


def tracking() -> bool:
    """Whether a set is tracked (else :func:`publish` does nothing)."""
    return _TRACK.get() is not None


def publish(done: torch.Tensor) -> None:
    active = _TRACK.get()
    if active is not None:
        active.publish(done)
