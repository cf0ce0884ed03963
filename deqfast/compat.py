"""torchdeq drop-in: ``from deqfast.compat import get_deq`` in place of ``from torchdeq import get_deq``.

    deq = get_deq(f_solver="anderson", f_max_iter=30, ift=True)
    z_list, info = deq(func, z0)          # like torchdeq 0.1.0

Keywords take torchdeq 0.1.0's meaning and defaults. A keyword passed to ``get_deq`` that torchdeq
does not know is an error; from a config object (``args``: argparse.Namespace or dict, usually the
program's whole configuration) only torchdeq's keys are read. Several sampled states (n_states,
indexing) work with the sliced core, the default. torchdeq features deqfast does not implement
(sup_gap, sup_loc; several states with core='indexing'; line search) raise a clear error rather
than being ignored.
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Union

import torch
from torch import nn

from . import _checks
from . import solvers as _solvers
from ._state import PackedState
from .functional import solve
from .options import Options
from .regularization import squared_vjp_norms
from .stats import SolverStats

# torchdeq 0.1.0's get_deq keywords and their defaults (DEQBase and DEQIndexing/DEQSliced).
TORCHDEQ_DEFAULTS = {
    "core": "sliced",
    "f_solver": "fixed_point_iter",
    "b_solver": "fixed_point_iter",
    "no_stat": None,
    "f_max_iter": 40,
    "b_max_iter": 40,
    "f_tol": 1e-3,
    "b_tol": 1e-6,
    "f_stop_mode": "abs",
    "b_stop_mode": "abs",
    "eval_factor": 1.0,
    "eval_f_max_iter": 0,
    "ift": False,
    "hook_ift": False,
    "grad": 1,
    "tau": 1.0,
    "sup_gap": -1,
    "sup_loc": None,
    "n_states": 1,
    "indexing": None,
}

_SOLVER_NAMES = {
    "anderson": "anderson",
    "broyden": "broyden",
    "fixed_point_iter": "fixed_point",
    "simple_fixed_point_iter": "fixed_point",
}

# torchdeq's solver keywords a call may pass in solver_kwargs, and their torchdeq defaults.
_SOLVER_KWARGS = {"f_max_iter": None, "m": 6, "lam": 1e-4, "tau": 1.0, "LBFGS_thres": None, "ls": False}


def _config_dict(args) -> dict:
    if args is None:
        return {}
    if isinstance(args, dict):
        return dict(args)
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, DEQCompat):
        return dict(args.config)
    if isinstance(args, (str, bytes)) or not hasattr(args, "__dict__"):
        raise TypeError(
            f"deqfast.compat.get_deq: args must be None, a dict, an argparse.Namespace or an object with the "
            f"options as attributes, got {type(args).__name__} {args!r}; pass single options as keywords, "
            f"e.g. get_deq(f_solver='anderson')"
        )
    return dict(vars(args))


class DEQCompat(nn.Module):
    """torchdeq-style DEQ module: ``deq(func, z_init) -> (z_list, info)``.

    ``func`` maps z to f(z) (z a tensor, or a list/tuple of tensors when ``z_init`` is one, as
    torchdeq's multi-resolution states). ``z_list`` holds one tensor (or list): f at the solver's
    best iterate, carrying the gradient the configuration asks for in training mode (one per
    sampled state with n_states/indexing), found in ``eval_f_max_iter`` iterations and without
    gradient in eval mode. ``info`` is a dict with torchdeq's keys
    ``abs_lowest``, ``rel_lowest``, ``nstep``, ``abs_trace``, ``rel_trace`` (only the final value:
    deqfast keeps no per-iteration trace), ``sradius``; ``info["stats"]`` is deqfast's
    :class:`SolverStats`.
    """

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        c = config
        for key in ("f_solver", "b_solver"):
            if c[key] not in _SOLVER_NAMES:
                raise ValueError(
                    f"deqfast.compat.get_deq: {key} must be one of {', '.join(map(repr, _SOLVER_NAMES))}, got {c[key]!r}"
                )
        if c["core"] not in ("sliced", "indexing"):
            raise ValueError(f"deqfast.compat.get_deq: core must be 'sliced' or 'indexing', got {c['core']!r}")
        for key in ("f_stop_mode", "b_stop_mode"):
            if c[key] not in ("abs", "rel"):
                raise ValueError(f"deqfast.compat.get_deq: {key} must be 'abs' or 'rel', got {c[key]!r}")
        caller = "deqfast.compat.get_deq"
        _checks.check_int(caller, "f_max_iter", c["f_max_iter"], 1)
        _checks.check_int(caller, "b_max_iter", c["b_max_iter"], 1)
        _checks.check_int(caller, "eval_f_max_iter", c["eval_f_max_iter"], 0)
        _checks.check_real(caller, "f_tol", c["f_tol"])
        _checks.check_real(caller, "b_tol", c["b_tol"])
        _checks.check_real(caller, "eval_factor", c["eval_factor"])
        _checks.check_damping(caller, "tau", c["tau"])
        grads = list(c["grad"]) if isinstance(c["grad"], (list, tuple)) else [c["grad"]]
        if not grads or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grads):
            raise ValueError(f"deqfast.compat.get_deq: grad must be an int >= 1 or a list of them, got {c['grad']!r}")
        n_states = 1 if c["n_states"] is None else c["n_states"]
        _checks.check_int(caller, "n_states", n_states, 1)
        indexing = list(c["indexing"] or [])
        unsupported = {
            "sup_gap": c["sup_gap"] not in (None, -1) and c["sup_gap"] > 0,
            "sup_loc": bool(c["sup_loc"]),
            # torchdeq's 'indexing' core samples states inside one solve; deqfast keeps no trajectory.
            "n_states": c["core"] == "indexing" and n_states > 1,
            "indexing": c["core"] == "indexing" and bool(indexing),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(
                f"deqfast.compat.get_deq: {', '.join(bad)} (phantom states sampled along a phantom trajectory, or "
                f"several states of one solve with core='indexing') is not supported; got "
                f"{', '.join(f'{k}={c[k]!r}' for k in bad)} (core={c['core']!r}; core='sliced' takes n_states and indexing)"
            )
        self.n_states = n_states
        self.indexing = indexing
        self.grads = grads
        self._segments(c["f_max_iter"])  # checks indexing and the grad list against f_max_iter
        self.ift = bool(c["ift"] or c["hook_ift"])
        self.f_max_iter = c["f_max_iter"]
        self.eval_f_max_iter = c["eval_f_max_iter"] if c["eval_f_max_iter"] > 0 else max(1, int(c["f_max_iter"] * c["eval_factor"]))

    def _segments(self, f_max_iter: int):
        """Iterations of each solve of the sliced core, and each segment's phantom steps: torchdeq's
        DEQSliced (n_states equal slices, f_max_iter // n_states each; or the gaps of indexing)."""
        caller = "deqfast.compat.get_deq"
        if self.n_states > 1:
            segments = [f_max_iter // self.n_states] * self.n_states
            if segments[0] < 1:
                raise ValueError(f"{caller}: n_states must be <= f_max_iter, got n_states={self.n_states}, f_max_iter={f_max_iter}")
        else:
            bounds = [0, *self.indexing, f_max_iter]
            segments = [b - a for a, b in zip(bounds, bounds[1:])]
            if any(n < 1 for n in segments):
                raise ValueError(f"{caller}: indexing must increase strictly within (0, f_max_iter={f_max_iter}), "
                                 f"got {self.indexing!r}")
        if len(self.grads) not in (1, len(segments)):
            raise ValueError(f"{caller}: grad must have 1 entry or one per sampled state ({len(segments)}), got {self.grads!r}")
        grads = self.grads * len(segments) if len(self.grads) == 1 else self.grads
        return list(zip(segments, grads))

    def _options(self, solver_kwargs: dict, training: bool, max_iter: Optional[int] = None, grad: Optional[int] = None,
                 ift: Optional[bool] = None) -> Options:
        """The options of one solve; ``max_iter``, ``grad`` and ``ift`` override the configuration's
        (one segment of the sliced core)."""
        c = self.config
        unknown = sorted(set(solver_kwargs) - set(_SOLVER_KWARGS))
        if unknown:
            raise TypeError(
                f"deqfast.compat: unknown solver_kwargs {', '.join(map(repr, unknown))}; "
                f"supported: {', '.join(_SOLVER_KWARGS)}"
            )
        kw = {**_SOLVER_KWARGS, **solver_kwargs}
        caller = "deqfast.compat: solver_kwargs"
        if kw["f_max_iter"] is not None:
            _checks.check_int(caller, "f_max_iter", kw["f_max_iter"], 1)
        _checks.check_int(caller, "m", kw["m"], 1)
        _checks.check_real(caller, "lam", kw["lam"])
        _checks.check_damping(caller, "tau", kw["tau"])
        if kw["LBFGS_thres"] is not None:
            _checks.check_int(caller, "LBFGS_thres", kw["LBFGS_thres"], 1)
        if kw["ls"]:
            raise NotImplementedError("deqfast.compat: Broyden line search (ls=True) is not supported, got ls=True")
        f_solver = _SOLVER_NAMES[c["f_solver"]]
        if max_iter is None:
            max_iter = kw["f_max_iter"] if kw["f_max_iter"] is not None else (self.f_max_iter if training else self.eval_f_max_iter)
        grad = self.grads[-1] if grad is None else grad
        ift = self.ift if ift is None else ift
        m = kw["m"]
        if f_solver == "broyden":
            m = kw["LBFGS_thres"] if kw["LBFGS_thres"] is not None else int(max_iter)
        if ift:
            backward, steps, phantom_tau = "implicit", 1, 1.0
        elif grad == 1 and c["tau"] == 1.0:
            backward, steps, phantom_tau = "jfb", 1, 1.0
        else:
            backward, steps, phantom_tau = "phantom", grad, c["tau"]
        return Options.build(
            "deqfast.compat.get_deq",
            solver=f_solver,
            max_iter=int(max_iter),
            tol=0.0 if c["f_solver"] == "simple_fixed_point_iter" else c["f_tol"],
            stop_mode=c["f_stop_mode"],
            m=int(m),
            lam=kw["lam"],
            tau=kw["tau"],
            backward=backward,
            backward_solver=_SOLVER_NAMES[c["b_solver"]],
            backward_max_iter=c["b_max_iter"],
            backward_tol=0.0 if c["b_solver"] == "simple_fixed_point_iter" else c["b_tol"],
            backward_stop_mode=c["b_stop_mode"],
            phantom_steps=steps,
            phantom_tau=phantom_tau,
        )

    def forward(self, func: Callable, z_init, solver_kwargs: Optional[dict] = None,
                sradius_mode: bool = False, backward_writer: Optional[Callable] = None, **kwargs):
        if kwargs:
            raise TypeError(f"deqfast.compat: unknown keyword(s) {', '.join(map(repr, sorted(kwargs)))} in the DEQ call")
        solver_kwargs = dict(solver_kwargs or {})
        options = self._options(solver_kwargs, self.training)
        f, z0, unpack = _pack(func, z_init)
        if self.training:
            # The sliced core: one solve per sampled state, each from the previous state (detached)
            # and with its own gradient; IFT (ift=True) for the last one only. One segment by default.
            on_backward = None if backward_writer is None else (lambda b: backward_writer(torchdeq_info(b)))
            segments = self._segments(options.max_iter)
            z, z_out = z0, []
            for i, (iters, grad) in enumerate(segments):
                last = i == len(segments) - 1
                seg = self._options(solver_kwargs, True, max_iter=iters, grad=grad, ift=self.ift and last)
                z, stats = solve(f, z.detach(), seg, caller="deqfast.compat", on_backward=on_backward if last else None)
                z_out.append(unpack(z))
            return z_out, torchdeq_info(stats)
        else:
            with torch.no_grad():
                z_star, stats = _solvers.SOLVERS[options.solver](f, z0, **options.solver_kwargs(options.solver))
                z = f(z_star)  # like torchdeq (and training mode): f at the best iterate
        info = torchdeq_info(stats)
        if not self.training:
            info["sradius"] = spectral_radius(f, z_star) if sradius_mode else torch.zeros(1, device=z.device)
        return [unpack(z)], info


def torchdeq_info(stats: SolverStats) -> dict:
    """deqfast stats as torchdeq's SolverStat keys (traces hold the final value only)."""
    return {
        "abs_lowest": stats.residual,
        "rel_lowest": stats.rel_residual,
        "abs_trace": stats.residual.unsqueeze(1),
        "rel_trace": stats.rel_residual.unsqueeze(1),
        "nstep": stats.nstep.to(torch.get_default_dtype()),
        "sradius": torch.zeros(1, device=stats.residual.device),
        "stats": stats,
    }


def spectral_radius(f: Callable, z: torch.Tensor, n_iters: int = 100) -> torch.Tensor:
    """Per-sample estimate of the spectral radius of J = ∂f/∂z at z by the power method on Jᵀ."""
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_()
        return power_method(f(z_leaf), z_leaf, n_iters)[1]


def jac_reg(f0: torch.Tensor, z0: torch.Tensor, vecs: int = 1, create_graph: bool = True) -> torch.Tensor:
    """torchdeq.loss.jac_reg: Hutchinson estimate of ‖∂f0/∂z0‖_F² / z0.numel() (a 0-dim tensor),
    with ``vecs`` Gaussian probes drawn as torchdeq draws them. ``f0`` = f(z0) with z0 in its graph.
    deqfast's own, per sample and from f: :func:`deqfast.jacobian_penalty`."""
    _checks.check_int("deqfast.compat.jac_reg", "vecs", vecs, 1)
    probes = (torch.randn(*z0.shape).to(z0) for _ in range(vecs))
    return squared_vjp_norms(f0, z0, probes, create_graph).sum() / vecs / z0.numel()


def power_method(f0: torch.Tensor, z0: torch.Tensor, n_iters: int = 100):
    """torchdeq.loss.power_method: (eigenvector, |eigenvalue|) per sample of the largest-magnitude
    eigenvalue of J = ∂f0/∂z0, by ``n_iters`` power iterations on Jᵀ (VJPs through f0's graph)."""
    _checks.check_int("deqfast.compat.power_method", "n_iters", n_iters, 1)
    v = torch.randn_like(z0)
    B = v.shape[0]
    for i in range(n_iters):
        w = torch.autograd.grad(f0, z0, v, retain_graph=i < n_iters - 1)[0]
        value = (w * v).reshape(B, -1).sum(1) / (v * v).reshape(B, -1).sum(1)
        norm = w.reshape(B, -1).norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)  # J = 0: no NaN
        v = (w.reshape(B, -1) / norm).reshape_as(z0)
    return v, value.abs()


def _pack(func: Callable, z_init):
    """(f, z0, unpack) on one (B, D) tensor for torchdeq's multi-tensor state: z_init a list/tuple
    of tensors, func(*tensors) -> tensors; unpack gives a list, as torchdeq does."""
    if isinstance(z_init, torch.Tensor):
        return func, z_init, lambda z: z
    if not isinstance(z_init, (list, tuple)) or not z_init or not all(isinstance(t, torch.Tensor) for t in z_init):
        raise TypeError(f"deqfast.compat: z_init must be a tensor or a non-empty list/tuple of tensors, got {type(z_init).__name__}")
    layout = PackedState("deqfast.compat", list(z_init), name="z_init")
    return layout.wrap(func, star=True), layout.pack(z_init), layout.unpack


def get_deq(args: Union[None, dict, argparse.Namespace] = None, **kwargs) -> DEQCompat:
    """torchdeq's ``get_deq`` with deqfast underneath: same keywords, defaults and return shape."""
    unknown = sorted(set(kwargs) - set(TORCHDEQ_DEFAULTS))
    if unknown:
        raise TypeError(
            f"deqfast.compat.get_deq: unknown keyword(s) {', '.join(map(repr, unknown))}; "
            f"torchdeq's are {', '.join(TORCHDEQ_DEFAULTS)}"
        )
    from_args = {k: v for k, v in _config_dict(args).items() if k in TORCHDEQ_DEFAULTS}
    config = {**TORCHDEQ_DEFAULTS, **from_args, **kwargs}
    return DEQCompat(config)
