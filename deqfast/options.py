"""The keywords shared by :func:`deqfast.fixed_point` and :class:`deqfast.DEQ`, validated once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from . import _checks
from .solvers._common import check_per_sample


@dataclass(frozen=True)
class Options:
    solver: str = "anderson"
    max_iter: int = 50
    tol: float = 1e-4
    stop_mode: str = "rel"
    m: int = 5
    lam: float = 1e-4
    tau: float = 1.0
    backward: str = "implicit"
    backward_solver: str = "fixed_point"
    backward_max_iter: int = 50
    backward_tol: float = 1e-6
    backward_stop_mode: Optional[str] = None  # None: the forward stop_mode
    neumann_terms: int = 5
    phantom_steps: int = 5
    phantom_tau: float = 0.5
    check_every: Optional[int] = None
    per_sample: bool = True
    backward_warm_start: bool = False
    cuda_graph: bool = False  # the Anderson forward solve replayed from CUDA graphs (solvers.anderson)

    @classmethod
    def build(cls, caller: str, **kwargs) -> "Options":
        key = _build_key(cls, caller, kwargs)
        built = _BUILT.get(key) if key is not None else None
        if built is not None:  # these keywords, of these exact types and values, validated before
            return built
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(
                f"{caller}: unknown keyword(s) {', '.join(map(repr, unknown))}; valid keywords are {', '.join(names)}"
            )
        options = cls(**kwargs).validate(caller)
        if key is not None:
            if len(_BUILT) >= 256:
                _BUILT.clear()
            _BUILT[key] = options
        return options

    def validate(self, caller: str) -> "Options":
        """These options checked, as a copy whose numbers and flags are Python int/float/bool
        (numpy's scalars, Fraction, numpy's bool accepted)."""
        c = _checks
        c.check_choice(caller, "solver", self.solver, c.SOLVERS)
        c.check_choice(caller, "stop_mode", self.stop_mode, c.STOP_MODES)
        c.check_choice(caller, "backward", self.backward, c.BACKWARDS)
        c.check_choice(caller, "backward_solver", self.backward_solver, c.BACKWARD_SOLVERS)
        if self.backward_stop_mode is not None:
            c.check_choice(caller, "backward_stop_mode", self.backward_stop_mode, c.STOP_MODES)
        options = dataclasses.replace(
            self,
            max_iter=c.check_int(caller, "max_iter", self.max_iter, 1),
            tol=c.check_real(caller, "tol", self.tol),
            m=c.check_int(caller, "m", self.m, 1),
            lam=c.check_positive(caller, "lam", self.lam),  # lam = 0: a singular Gram has no defined weights
            tau=c.check_damping(caller, "tau", self.tau),
            backward_max_iter=c.check_int(caller, "backward_max_iter", self.backward_max_iter, 1),
            backward_tol=c.check_real(caller, "backward_tol", self.backward_tol),
            neumann_terms=c.check_int(caller, "neumann_terms", self.neumann_terms, 1),
            phantom_steps=c.check_int(caller, "phantom_steps", self.phantom_steps, 1),
            phantom_tau=c.check_damping(caller, "phantom_tau", self.phantom_tau),
            check_every=c.check_check_every(caller, self.check_every),
            per_sample=check_per_sample(caller, self.per_sample),
            backward_warm_start=c.check_bool(caller, "backward_warm_start", self.backward_warm_start),
            cuda_graph=c.check_bool(caller, "cuda_graph", self.cuda_graph),
        )
        if options.backward_warm_start and options.backward != "implicit":
            raise ValueError(f"{caller}: backward_warm_start=True needs backward='implicit' (it starts the adjoint "
                             f"solve), got backward={options.backward!r}")
        if options.backward_warm_start and options.solver == "fixed_point":
            raise ValueError(f"{caller}: backward_warm_start=True needs solver='anderson' or 'broyden' (their history "
                             f"approximates I - J), got solver='fixed_point'")
        if options.cuda_graph and options.solver != "anderson":
            raise ValueError(f"{caller}: cuda_graph=True is implemented for solver='anderson' only, got solver={options.solver!r}")
        return options

    def solver_kwargs(self, solver: str, *, backward: bool = False) -> dict:
        """The keywords ``solver`` takes, for the forward solve or (backward=True) the adjoint solve."""
        if backward:
            common = dict(max_iter=self.backward_max_iter, tol=self.backward_tol,
                          stop_mode=self.backward_stop_mode or self.stop_mode, check_every=self.check_every,
                          per_sample=self.per_sample)
        else:
            common = dict(max_iter=self.max_iter, tol=self.tol, stop_mode=self.stop_mode,
                          check_every=self.check_every, per_sample=self.per_sample)
        # The adjoint solve is undamped: its plain iteration is then exactly the Neumann series.
        tau = 1.0 if backward else self.tau
        if solver == "anderson":
            common.update(m=self.m, lam=self.lam, tau=tau)
            if not backward and self.cuda_graph:
                common.update(cuda_graph=True)
        elif solver == "fixed_point":
            common.update(tau=tau)
        elif solver == "broyden":
            common.update(m=self.m)
        return common


# Options.build's results (frozen, so shared) by their keywords: deqfast.fixed_point builds its
# options at every call, and validating them is ~15 µs of a small solve's host time.
_BUILT: dict = {}
_PLAIN_TYPES = (int, float, str, bool, type(None))


def _build_key(cls, caller: str, kwargs: dict):
    """A key that equals another only for the same keywords with values of the same exact types
    (True is not 1, numpy's scalars are not cached) and the same values (floats by their hex
    form: -0.0 is not 0.0); None where a value is of another type (read and validated each time)."""
    items = []
    for name, value in kwargs.items():
        kind = type(value)
        if kind not in _PLAIN_TYPES:
            return None
        items.append((name, kind, value.hex() if kind is float else value))
    return cls, caller, tuple(items)
