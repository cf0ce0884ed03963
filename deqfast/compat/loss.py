"""torchdeq.loss in deqfast.compat: fp_correction, register_weight_func, jac_reg, power_method.

Own code with torchdeq 0.1.0's signatures, defaults and results (same draws for the same seed).
deqfast's own Jacobian penalty, per sample and from f: :func:`deqfast.jacobian_penalty`.
"""
from __future__ import annotations

import torch

from .. import _checks
from ..regularization import squared_vjp_norms

__all__ = ["fp_correction", "register_weight_func", "jac_reg", "power_method"]


def _linear(n, k, gamma=0.9, bias=0.0, **kwargs):
    return 1 - (n - k - 1) / n * gamma + bias


def _exp(n, k, gamma=0.8, **kwargs):
    return gamma ** (n - k - 1)


def _const(n, k, c=1.0, **kwargs):
    # torchdeq 0.1.0 returns c * torch.ones(n).cuda() here (a vector, on a GPU): the weight of a term is c.
    return c


_weight_func_dict = {"exp": _exp, "linear": _linear, "const": _const}


def register_weight_func(name, func):
    """torchdeq.loss.register_weight_func: ``func(n, k, **kwargs)`` -> the weight of term k of n."""
    if not callable(func):
        raise TypeError(f"deqfast.compat.register_weight_func: func must be callable, got {type(func).__name__}")
    _weight_func_dict[name] = func


def fp_correction(crit, args, weight_func="exp", return_loss_values=False, **kwargs):
    """torchdeq.loss.fp_correction: Σ_i w(n, i) · crit(*args_i) over the sampled states, where each
    entry of ``args`` is a list (one per state) or a single value used for every state; weights
    'exp' (gamma=0.8: gamma^(n-i-1)), 'linear' (gamma=0.9, bias=0), 'const' (c=1) or registered.
    ``return_loss_values``: also the list of each term's unweighted loss as a float."""
    if weight_func not in _weight_func_dict:
        raise ValueError(f"deqfast.compat.fp_correction: weight_func must be one of "
                         f"{', '.join(map(repr, _weight_func_dict))}, got {weight_func!r}")
    weight = _weight_func_dict[weight_func]
    args = [each if type(each) in (list, tuple) else [each] for each in args]
    n = max(len(each) for each in args)
    loss, values = 0.0, []
    for i in range(n):
        i_loss = crit(*[each[i % len(each)] for each in args])
        loss += weight(n, i, **kwargs) * i_loss
        if return_loss_values:
            values.append(i_loss.item())
    return (loss, values) if return_loss_values else loss


def jac_reg(f0: torch.Tensor, z0: torch.Tensor, vecs: int = 1, create_graph: bool = True) -> torch.Tensor:
    """torchdeq.loss.jac_reg: Hutchinson estimate of ‖∂f0/∂z0‖_F² / z0.numel() (a 0-dim tensor),
    with ``vecs`` Gaussian probes drawn as torchdeq draws them. ``f0`` = f(z0) with z0 in its graph."""
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
