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


@pytest.mark.parametrize("cell", ["tanh", "affine"])
@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_bptt_under_detect_anomaly_raises_no_false_alarm(solver, cell):
    """Masked-out values (empty history slots, frozen samples) must not produce NaN gradients that
    torch.where then discards: detect_anomaly sees those. The gradient equals the one without it."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(5, 5, generator=g, dtype=torch.float64)
    W = (0.5 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    x = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    if cell == "tanh":
        f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    else:  # Anderson and Broyden solve it exactly: zero residuals in the history
        f = lambda z: z @ W.T + x  # noqa: E731
    kw = dict(solver=solver, backward="bptt", max_iter=30, tol=1e-8, m=5)

    def grads():
        z, stats = deqfast.fixed_point(f, torch.zeros(3, 5, dtype=torch.float64), **kw)
        return torch.autograd.grad(z.square().sum(), [W, x])

    expected = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # detect_anomaly's own "enabled" warning
        with torch.autograd.detect_anomaly():
            got = grads()
    for a, b in zip(got, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_anderson_history_is_sized_by_what_the_solve_can_fill(path, monkeypatch):
    """m = 4000 with max_iter = 3 allocates 3 slots, and decides exactly as m = 3."""
    if path == "fused" and not COMPILED:
        pytest.skip("deqfast._C is not compiled")
    if path == "reference":
        monkeypatch.setattr(ops, "use_fused", lambda *a, **k: False)
    slots = []
    real = ops.anderson_history
    monkeypatch.setattr(ops, "anderson_history", lambda x, fx, F, G, slot, fused=None: (
        slots.append(F.shape[1]) or real(x, fx, F, G, slot, fused=fused)))
    g = torch.Generator().manual_seed(6)
    c = torch.randn(2, 7, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(0.7 * z.flip(1) + c)  # noqa: E731
    z_big, s_big = deqfast.solvers.anderson(f, torch.zeros(2, 7, dtype=torch.float64), m=4000, max_iter=3, tol=0.0)
    assert slots == [3, 3, 3]
    z_small, s_small = deqfast.solvers.anderson(f, torch.zeros(2, 7, dtype=torch.float64), m=3, max_iter=3, tol=0.0)
    assert torch.equal(z_big, z_small) and torch.equal(s_big.residual, s_small.residual)
