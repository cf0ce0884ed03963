"""Small programs researchers write with deqfast's native API (deqfast.DEQ, deqfast.fixed_point),
each checked against an independent float64 oracle: plain fixed-point iteration to convergence,
and the implicit gradient from a dense Jacobian solve over the whole state (rows coupled or not).

Each test names the class of program it stands for; those marked "fails without the fix" found a
bug (a silent wrong answer or a crash) that deqfast now handles.
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import deqfast


# --- oracles -----------------------------------------------------------------------------------

def fixed_point_oracle(f, z0, tol=1e-13, max_iter=5000):
    """z* = f(z*) by plain iteration in float64 (no grad), to ‖f(z) − z‖ <= tol (1 + ‖f(z)‖)."""
    z = z0.detach().double()
    with torch.no_grad():
        for _ in range(max_iter):
            fz = f(z)
            if (fz - z).norm() <= tol * (1 + fz.norm()):
                return fz
            z = fz
    raise AssertionError("the oracle's fixed-point iteration did not converge")


def implicit_gradients(f, z_star, loss, inputs):
    """d loss(z*) / d inputs with z* = f(z*): u = (I − J)⁻ᵀ ∂loss/∂z (J dense, over the whole
    state), then uᵀ ∂f/∂inputs at z*."""
    z = z_star.detach()
    n = z.numel()
    J = torch.autograd.functional.jacobian(lambda v: f(v).reshape(-1), z).reshape(n, n)
    zz = z.clone().requires_grad_()
    g = torch.autograd.grad(loss(zz), zz)[0].reshape(-1)
    u = torch.linalg.solve((torch.eye(n, dtype=J.dtype) - J).T, g)
    out = torch.autograd.grad(f(z), inputs, u.reshape(z.shape), allow_unused=True)
    return [torch.zeros_like(p) if o is None else o for o, p in zip(out, inputs)]


def weighted_loss(z):
    """A loss whose gradient differs for every element (a plain sum would hide permutations)."""
    return (z * torch.linspace(-1, 1, z.numel(), dtype=z.dtype).reshape(z.shape)).sum()


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# --- Anderson under bptt: a residual that is exactly 0 ------------------------------------------

def test_anderson_bptt_gradient_is_finite_when_a_residual_reaches_exactly_zero():
    """A state of one element per sample (z0 of shape (B,), or (B, 1)) in float32: Anderson lands
    some samples on their fixed point exactly (a residual of 0.0), and its mixing weights for
    them are unusable (the Jacobi scaling of a zero Gram diagonal overflows the weights' sum to
    inf). The solver falls back to a plain step there, but the masked division's derivative,
    0 · inf, was NaN, and backward="bptt" gave NaN gradients to x and a for every such sample
    (fails without the fix). The oracle: z = a cos z + x has dz/dx = 1 / (1 + a sin z)."""
    x = torch.tensor([1.5409961, -0.2934289, -2.1787894, 0.5684313, -1.0845224], requires_grad=True)
    a = torch.tensor(0.7, requires_grad=True)
    for shape in [(5,), (5, 1)]:
        x.grad = a.grad = None
        xs = x.view(shape)
        z, stats = deqfast.fixed_point(lambda z: a * torch.cos(z) + xs, torch.zeros(shape), solver="anderson",
                                       backward="bptt", tol=1e-7, max_iter=50)
        z.sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(a.grad), (shape, x.grad, a.grad)
        z64 = fixed_point_oracle(lambda z: 0.7 * torch.cos(z) + x.detach().double(), torch.zeros(5))
        dx = 1 / (1 + 0.7 * torch.sin(z64))
        # BPTT through a converged solve approaches the implicit gradient (float32 iterates)
        assert rel_err(x.grad, dx) < 1e-4, shape
        assert rel_err(a.grad, (torch.cos(z64) * dx).sum()) < 1e-4, shape
