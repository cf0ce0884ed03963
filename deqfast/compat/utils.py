"""torchdeq.utils in deqfast.compat: DEQConfig, add_deq_args, mem_gc, mixed_init.

Own code (no torchdeq needed), with torchdeq 0.1.0's signatures and results; tests/test_compat_namespace.py
checks each against torchdeq on the same inputs and seeds.
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch.utils.checkpoint import checkpoint

from .. import _checks

__all__ = ["DEQConfig", "add_deq_args", "mem_gc", "mixed_init"]

_warned = set()


def warn_once(where: str, names, what: str) -> None:
    """One UserWarning per (where, name) for the life of the process: compat takes and ignores
    what torchdeq takes and ignores, and says so once instead of raising."""
    new = [n for n in sorted(names) if (where, n) not in _warned]
    if new:
        _warned.update((where, n) for n in new)
        # Attributed to the user's line (the DEQ call runs under nn.Module.__call__).
        _checks.warn(f"{where}: ignoring {what} {', '.join(map(repr, new))} (torchdeq 0.1.0 accepts and ignores "
                     f"{'it' if len(new) == 1 else 'them'}); this warning is shown once", UserWarning)


def check_tau(caller: str, name: str, value) -> float:
    """torchdeq's damping factor: any finite real > 0, over-relaxation (tau > 1) included, as torchdeq
    takes it (returned as given). tau <= 0 is refused: tau = 0 makes the damped map the identity,
    whose every point is a fixed point (torchdeq returns z0 as converged), and tau < 0 steps away
    from f(z)."""
    import math
    import numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise TypeError(f"{caller}: {name} must be a real number > 0, got {value!r}")
    if not 0.0 < value < math.inf:
        raise ValueError(f"{caller}: {name} must be a finite number > 0 (a damping factor; tau = 0 makes the "
                         f"damped map the identity, so z0 would pass as the fixed point), got {value!r}")
    return value


class DEQConfig:
    """torchdeq's configuration wrapper: ``args`` is None, a dict, an argparse.Namespace, a DEQConfig
    or any object with attributes (read with ``vars``). Unlike torchdeq, ``update`` writes into a
    copy, never into the caller's dict or namespace."""

    def __init__(self, config=None):
        if config is None:
            config = {}
        if isinstance(config, DEQConfig):
            self.config = dict(config.config)
        elif isinstance(config, dict):
            self.config = dict(config)
        elif isinstance(config, argparse.Namespace):
            self.config = dict(vars(config))
        elif isinstance(config, (str, bytes, int, float, bool, list, tuple)) or not hasattr(config, "__dict__"):
            raise TypeError(
                f"deqfast.compat.get_deq: args must be None, a dict, an argparse.Namespace, a DEQConfig or an "
                f"object with attributes (a program's configuration), got {type(config).__name__} {config!r}; "
                f"pass solver settings as keywords, e.g. get_deq(f_solver='anderson')")
        else:
            warnings.warn(f"Unrecognized config type: {type(config)}. Processed using get_attr.")
            self.config = dict(vars(config))

    def get(self, key, default=None):
        return self.config.get(key, default)

    def update(self, **kwargs):
        self.config.update(kwargs)


def add_deq_args(parser: argparse.ArgumentParser) -> None:
    """Add torchdeq's command-line arguments (names, types, defaults and help as in torchdeq 0.1.0)."""
    a = parser.add_argument
    solvers = ["anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter"]
    # Solver
    a("--f_solver", default="fixed_point_iter", type=str,
      help="forward solver to use. supported solvers: anderson, broyden, fixed_point_iter, simple_fixed_point_iter")
    a("--b_solver", default="fixed_point_iter", type=str, choices=solvers,
      help="backward solver to use. supported solvers: anderson, broyden, fixed_point_iter, simple_fixed_point_iter")
    a("--f_max_iter", type=int, default=40, help="max number of function evaluations (NFE) for the forward pass solver")
    a("--b_max_iter", type=int, default=40, help="max number of function evaluations (NFE) for the backward pass solver")
    a("--f_tol", type=float, default=1e-3, help="forward pass solver stopping criterion")
    a("--b_tol", type=float, default=1e-6, help="backward pass solver stopping criterion")
    a("--f_stop_mode", type=str, default="abs", help="forward pass fixed-point convergence stop mode")
    a("--b_stop_mode", type=str, default="abs", help="backward pass fixed-point convergence stop mode")
    a("--eval_factor", type=float, default=1.0, help="factor to scale up the f_max_iter at test for better convergence.")
    a("--eval_f_max_iter", type=int, default=0, help="directly set the f_max_iter at test.")
    # Norm
    a("--norm_type", default="weight_norm", type=str,
      help="Normalizations for DEQ, using the form of [W <- W * min(norm_clip_value, target_norm / norm)], "
           "choices=[none, weight_norm, spectral_norm]")
    a("--norm_no_scale", action="store_true", help="Remove the learnable target_norm from normalization.")
    a("--norm_clip", action="store_true", help="Clip the scale value if (target_norm / sigma) > norm_clip_value.")
    a("--norm_clip_value", default=1.0, type=float, help="Upper Bound for the (re)normalization factor.")
    a("--norm_target_norm", default=1.0, type=float, help="Pre-defined target norm when not learning the target_norm.")
    a("--sn_n_power_iters", default=1, type=int, help="Number of power iterations to estimate the spectral radius.")
    # Training
    a("--core", default="sliced", type=str, help="training container for DEQ. choices=[indexing, sliced]")
    a("--ift", action="store_true", help="use implicit differentiation.")
    a("--hook_ift", action="store_true", help="use a hook function of O(1) memory complexity for IFT.")
    a("--n_states", type=int, default=1, help="number of loss terms (uniform spaced, 1 + fixed point correction).")
    a("--indexing", type=int, nargs="+", default=[], help="index solver states for fixed point correction.")
    a("--gamma", type=float, default=0.8, help="control the strength of fixed point correction. See loss.py in torchdeq.")
    a("--grad", type=int, nargs="+", default=[1], help="steps of Phantom Grad.")
    a("--tau", type=float, default=1.0, help="damping factor for unrolled Phantom Grad")
    a("--sup_gap", type=int, default=-1, help="sampling gap along the trajectories by Phantom Grad.")
    a("--sup_loc", type=int, nargs="+", default=[], help="sampling location along the trajectories by Phantom Grad.")
    # Regularization
    a("--jac_loss_weight", type=float, default=0.0, help="jacobian regularization loss weight (default to 0)")
    a("--jac_loss_freq", type=float, default=0.0, help="the frequency of applying the jacobian regularization (default to 0)")
    a("--jac_incremental", type=int, default=0, help="if positive, increase jac_loss_weight by 0.1 after this many steps")
    # Monitoring
    a("--sradius_mode", action="store_true", help="monitor the spectral radius during validation")


# The keys add_deq_args defines: torchdeq's vocabulary, never warned about in get_deq's keywords.
_parser = argparse.ArgumentParser(add_help=False)
add_deq_args(_parser)
ARG_KEYS = frozenset(vars(_parser.parse_args([])))
del _parser


def mixed_init(z_shape, device=None) -> torch.Tensor:
    """torchdeq.utils.mixed_init: Gaussian values, each zeroed with probability 1/2 (same draws as torchdeq)."""
    z_init = torch.randn(*z_shape, device=device)
    mask = torch.zeros_like(z_init, device=device).bernoulli_(0.5)
    return z_init * mask


def mem_gc(func, in_args=None):
    """torchdeq.utils.mem_gc: ``func(*in_args)`` without storing activations; backward recomputes
    them (gradient checkpointing) and reaches ``in_args`` that require grad and func's parameters.
    Here: :func:`torch.utils.checkpoint.checkpoint` (non-reentrant), which gives the same gradients."""
    in_args = tuple(in_args) if in_args else ()
    return checkpoint(func, *in_args, use_reentrant=False)
