"""Jacobian regularisation (Bai, Koltun & Kolter 2021, "Stabilizing Equilibrium Models by Jacobian
Regularization"): penalising ‖J‖_F², J = ∂f/∂z at the equilibrium, keeps f contractive there, so
the forward and adjoint solves stay short as training goes on.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from . import _checks


def squared_vjp_norms(fz: torch.Tensor, z_leaf: torch.Tensor, probes: Iterable[torch.Tensor],
                      create_graph: bool) -> torch.Tensor:
    """(B,) Σ over probes v of ‖vᵀJ‖² per sample, J = ∂fz/∂z_leaf, one VJP per probe (the graph of
    fz is kept for the next one)."""
    total = torch.zeros(z_leaf.shape[0], dtype=z_leaf.dtype, device=z_leaf.device)
    for v in probes:
        vJ = torch.autograd.grad(fz, z_leaf, v, retain_graph=True, create_graph=create_graph)[0]
        total = total + vJ.reshape(vJ.shape[0], -1).square().sum(dim=1)
    return total


def jacobian_penalty(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, *, vecs: int = 1,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample Hutchinson estimate of ‖J_b‖_F² / d at z, J_b = ∂f(z)_b/∂z_b, d = z[b].numel().

    E‖vᵀJ‖² = ‖J‖_F² for v ~ N(0, I); the estimate averages ``vecs`` probes. f is called once, with
    grad, at z.detach(); each probe costs one VJP. With grad enabled the result is differentiable
    (the VJPs are built with create_graph), so ``loss + weight * penalty.mean()`` trains on it; under
    ``torch.no_grad()`` it is a plain measurement. ``penalty.mean()`` equals torchdeq's
    ``jac_reg(f(z), z)`` for the same probes.

    Args:
        f: z -> f(z), same shape and dtype as z; dim 0 is the batch (e.g. ``lambda z: cell(z, x)``).
        z: (B, ...) where to evaluate J, usually the DEQ's output.
        vecs: number of Gaussian probes (>= 1).
        generator: draws the probes (on z's device), for reproducible estimates.

    Returns:
        (B,) tensor in z's dtype.
    """
    caller = "deqfast.jacobian_penalty"
    _checks.check_callable(caller, "f", f)
    _checks.check_arguments(caller, "f", f, "a callable z -> f(z) of one argument", 1,
                            "close over the other arguments, e.g. f = lambda z: cell(z, x)")
    _checks.check_z0(caller, z, name="z")
    _checks.check_int(caller, "vecs", vecs, 1)
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_()
        fz = _checks.call_f(caller, f, z_leaf, z_leaf, like_name="z")
        probes = (torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device) for _ in range(vecs))
        total = squared_vjp_norms(fz, z_leaf, probes, create_graph)
    return total / (vecs * z[0].numel())
