"""Reliability fixes (issue 9): constants in the state's dtype, no anomaly from masked values,
history sized by what a solve can fill, nothing run for nothing, an inexact adjoint made visible."""
import warnings

import pytest
import torch

import deqfast
from deqfast import ops, reference

COMPILED = deqfast.extension_info()["compiled"]


@pytest.mark.parametrize("default", [torch.float16, torch.float32, torch.float64])
def test_ridge_is_built_in_the_state_accumulation_dtype(default):
    """λ = 1e-8 must reach a float64 solve as the float64 1e-8, whatever torch's default dtype
    (under float16 it rounds to 0, under float32 to 9.99999993922529e-09)."""
    lam = 1e-8
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        reference._weight_constants.cache_clear()
        filled, ridge, fallback = reference._weight_constants(4, 3, 1, lam, torch.float64, torch.device("cpu"))
    finally:
        torch.set_default_dtype(previous)
        reference._weight_constants.cache_clear()
    assert ridge.dtype == torch.float64 and fallback.dtype == torch.float64
    assert ridge.diagonal(dim1=1, dim2=2)[0].tolist() == [lam, lam, lam, 1.0]


@pytest.mark.skipif(not COMPILED, reason="deqfast._C is not compiled")
@pytest.mark.parametrize("default", [torch.float16, torch.float32])
def test_fused_equals_reference_in_float64_with_a_small_ridge(default, monkeypatch):
    g = torch.Generator().manual_seed(3)
    B, d = 4, 40
    W = torch.randn(d, d, generator=g, dtype=torch.float64)
    W = 0.95 * W / torch.linalg.matrix_norm(W, 2)
    c = torch.randn(B, d, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + c)  # noqa: E731
    kw = dict(m=6, lam=1e-8, tol=0.0, max_iter=12)
    z_fused, _ = deqfast.solvers.anderson(f, torch.zeros(B, d, dtype=torch.float64), **kw)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        reference._weight_constants.cache_clear()
        monkeypatch.setattr(ops, "use_fused", lambda *a, **k: False)
        z_ref, _ = deqfast.solvers.anderson(f, torch.zeros(B, d, dtype=torch.float64), **kw)
    finally:
        torch.set_default_dtype(previous)
        reference._weight_constants.cache_clear()
    torch.testing.assert_close(z_ref, z_fused, rtol=0, atol=1e-13)
