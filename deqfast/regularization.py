"""Jacobian regularisation (Bai, Koltun & Kolter 2021, "Stabilizing Equilibrium Models by Jacobian
Regularization"): penalising ‖J‖_F², J = ∂f/∂z at the equilibrium, keeps f contractive there, so
the forward and adjoint solves stay short as training goes on.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch

from . import _checks


def squared_vjp_norms(fz: torch.Tensor, z_leaf: torch.Tensor, probes: Iterable[torch.Tensor],
                      create_graph: bool, caller: Optional[str] = None) -> torch.Tensor:
    """(B,) Σ over probes v of ‖vᵀJ‖² per sample, J = ∂fz/∂z_leaf, one VJP per probe (the graph of
    fz is kept for the next one). With ``caller``, an fz whose graph does not reach z_leaf raises
    an error that says so (else autograd's own)."""
    if caller is not None and not fz.requires_grad:
        raise RuntimeError(_NOT_DEPENDING.format(caller=caller))
    B, width = z_leaf.shape[0], math.prod(z_leaf.shape[1:])  # reshape(B, -1) is ambiguous for B = 0
    total = torch.zeros(B, dtype=z_leaf.dtype, device=z_leaf.device)
    for v in probes:
        vJ = torch.autograd.grad(fz, z_leaf, v, retain_graph=True, create_graph=create_graph,
                                 allow_unused=caller is not None)[0]
        if vJ is None:
            raise RuntimeError(_NOT_DEPENDING.format(caller=caller))
        total = total + vJ.reshape(B, width).square().sum(dim=1)
    return total


_NOT_DEPENDING = ("{caller}: f(z) does not depend on z (e.g. it uses z.detach() or z.data, or ignores z), so "
                  "it has no Jacobian df/dz to penalise; make f use z differentiably")


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
    create_graph = torch.is_grad_enabled()  # False under no_grad and inference_mode: a measurement
    # Under inference_mode autograd records nothing: the VJPs run outside it, on a normal copy of
    # an inference tensor z.
    with torch.inference_mode(False), torch.enable_grad():
        z_leaf = z.detach()
        if z_leaf.is_inference():
            z_leaf = z_leaf.clone()
        z_leaf.requires_grad_()
        fz = _checks.call_f(caller, f, z_leaf, z_leaf, like_name="z")
        probes = (torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device) for _ in range(vecs))
        total = squared_vjp_norms(fz, z_leaf, probes, create_graph, caller=caller)
    return total / (vecs * max(math.prod(z.shape[1:]), 1))  # no element per sample: ‖J‖² = 0, penalty 0
