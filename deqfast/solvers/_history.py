"""A side channel from a forward solve to the backward: the solver's secant history.

``backward_warm_start`` (deqfast.backward) reuses what the forward Anderson/Broyden solve learnt
about I − J near z*. The solvers' signatures and results stay as they are: the caller opens a
:func:`capture` around the solve, the solver :func:`offer` s its buffers at its end, and only then
are they kept (nothing is kept when no capture is open, i.e. without backward_warm_start).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

_REQUEST: contextvars.ContextVar = contextvars.ContextVar("deqfast_solver_history", default=None)


class History:
    """What a solver offered: ``kind`` ("anderson" | "broyden") and its tensors, or kind None."""

    def __init__(self):
        self.kind: Optional[str] = None
        self.tensors: dict = {}


@contextlib.contextmanager
def capture():
    box = History()
    token = _REQUEST.set(box)
    try:
        yield box
    finally:
        _REQUEST.reset(token)


def wanted() -> bool:
    return _REQUEST.get() is not None


def offer(kind: str, **tensors) -> None:
    """Called by a solver at its end; stores its history only when a capture is open."""
    box = _REQUEST.get()
    if box is not None:
        box.kind = kind
        box.tensors = tensors


# --- the other direction: an initial inverse-Jacobian estimate handed to a Broyden solve -------

_SEED: contextvars.ContextVar = contextvars.ContextVar("deqfast_broyden_seed", default=None)


@contextlib.contextmanager
def seed(U, V):
    """The next Broyden solve inside this block starts from H = −I + Σ_i U_i V_iᵀ (U, V: (B, k, d),
    the solve's flattened shape) instead of H = −I; its own updates go after these k terms."""
    token = _SEED.set((U, V))
    try:
        yield
    finally:
        _SEED.reset(token)


def take_seed():
    """(U, V) of an open :func:`seed` block, for the first solve that asks (a solve nested inside
    f gets None), else None."""
    pair = _SEED.get()
    if pair is not None:
        _SEED.set(None)
    return pair
