"""Stats are true of the returned state at any magnitude the dtype holds.

The solvers' norms and Gram entries are sums of squares: unscaled, float32 states of magnitude
~1e-20 underflowed them (converged with rel_residual 0 after one step) and states above ~1e19
(float64 ~1e154) overflowed them (reported failed though f is finite). The problem is now solved
exactly rescaled by a power of two when z0, f(z0) lie outside the safe range; these tests check
the stats against a float64 oracle recomputed from the returned state, and (magnitudes that are
powers of two) that the solve is bitwise the unit-magnitude solve times the magnitude.
"""
import math
import warnings

import pytest
import torch

import deqfast
from conftest import solve_path

SOLVERS = {"anderson": deqfast.solvers.anderson, "fixed_point": deqfast.solvers.fixed_point_iteration,
           "broyden": deqfast.solvers.broyden}
MAGNITUDES = [(torch.float32, m) for m in (1e-20, 1e-30, 1e19, 1e30)] + [(torch.float64, m) for m in (1e-160, 1e160)]
B, D = 4, 24




def _unit_map(dtype):
    """h(z) = tanh(z A + b) with ‖A‖₂ = 0.6, per sample; values of magnitude ~1."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    A = (0.6 * A / torch.linalg.matrix_norm(A, 2)).to(dtype)
    b = (2 * torch.randn(B, D, generator=g, dtype=torch.float64)).to(dtype)
    return lambda z: torch.tanh(z @ A + b)


def _norm64(v: torch.Tensor, mag: float) -> torch.Tensor:
    """Per-row 2-norm of v in float64 without overflow/underflow (v divided by a power of two near mag)."""
    k = math.frexp(mag)[1]
    return torch.linalg.vector_norm(v.double() * 2.0 ** -k, dim=1) * 2.0 ** k


def _oracle(f, z, mag):
    fz = f(z)
    residual = _norm64(fz - z, mag)
    return residual, residual / _norm64(fz, mag)


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("dtype, mag", MAGNITUDES)
def test_stats_true_at_any_magnitude(dtype, mag, solver, path, stop_mode, monkeypatch):
    solve_path(path, solver, monkeypatch)
    h = _unit_map(dtype)
    f = lambda z: mag * h(z / mag)
    tol = 1e-5 if stop_mode == "rel" else 1e-5 * mag
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        z, stats = SOLVERS[solver](f, torch.zeros(B, D, dtype=dtype), max_iter=60, tol=tol, stop_mode=stop_mode)
    assert not records, [str(r.message) for r in records]
    assert not stats.failed.any()
    assert stats.converged.all()
    assert (stats.nstep > 2).all()  # no false convergence after a step or two
    residual, rel = _oracle(f, z, mag)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(stats.residual.double(), residual, rtol=rtol, atol=0)
    torch.testing.assert_close(stats.rel_residual.double(), rel, rtol=rtol, atol=0)
    criterion = rel if stop_mode == "rel" else residual
    assert (criterion < tol).all()
    # The same solve as at magnitude 1, scaled (values within the dtype's rounding).
    z_unit, _ = SOLVERS[solver](h, torch.zeros(B, D, dtype=dtype), max_iter=60, tol=tol / (1 if stop_mode == "rel" else mag),
                                stop_mode=stop_mode)
    torch.testing.assert_close((z.double() / mag), z_unit.double(), rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("dtype, k", [(torch.float32, k) for k in (-100, -66, 64, 100)] + [(torch.float64, k) for k in (-532, 532)])
def test_power_of_two_magnitude_is_the_unit_solve_exactly(dtype, k, solver, path, stop_mode, monkeypatch):
    """f(z) = 2^k h(z / 2^k): every iterate, and the stats, are exactly 2^k times those of h's solve."""
    solve_path(path, solver, monkeypatch)
    h = _unit_map(dtype)
    mag = 2.0 ** k
    tol = 1e-5 if stop_mode == "rel" else 1e-5
    z_unit, s_unit = SOLVERS[solver](h, torch.zeros(B, D, dtype=dtype), max_iter=40, tol=tol, stop_mode=stop_mode)
    z, s = SOLVERS[solver](lambda z: mag * h(z / mag), torch.zeros(B, D, dtype=dtype), max_iter=40,
                           tol=tol * (mag if stop_mode == "abs" else 1), stop_mode=stop_mode)
    assert torch.equal(z, z_unit * mag)
    assert torch.equal(s.residual, s_unit.residual * mag)
    assert torch.equal(s.rel_residual, s_unit.rel_residual)
    assert torch.equal(s.nstep, s_unit.nstep) and torch.equal(s.converged, s_unit.converged)


def test_mixed_magnitudes_rel_mode_each_row_its_own_scale():
    """stop_mode "rel": a row of magnitude 1e30 next to rows of 1e-25 and 1 (float32): every row
    converges with true stats, and each row's result is that of the row solved alone."""
    h = _unit_map(torch.float32)
    mags = torch.tensor([1e30, 1e-25, 1.0, 1e10]).unsqueeze(1)
    f = lambda z: mags * h(z / mags)
    z, stats = deqfast.solvers.anderson(f, torch.zeros(B, D), max_iter=60, tol=1e-5)
    assert stats.converged.all() and not stats.failed.any()
    fz = f(z)
    residual = torch.linalg.vector_norm((fz - z).double(), dim=1)
    torch.testing.assert_close(stats.residual.double(), residual, rtol=1e-4, atol=0)
    for i in range(B):
        hi = lambda zz: mags[i] * h(torch.cat([torch.zeros(i, D), zz / mags[i], torch.zeros(B - i - 1, D)]))[i:i + 1]
        z_alone, _ = deqfast.solvers.anderson(hi, torch.zeros(1, D), max_iter=60, tol=1e-5)
        torch.testing.assert_close(z_alone[0].double(), z[i].double(), rtol=1e-5, atol=0)


def test_adjoint_of_a_tiny_gradient():
    """A float32 loss scaled by 1e-30: the adjoint solve is rescaled too, so the gradient is 1e-30
    times the unscaled one (unscaled, the adjoint's norms underflow and it stops at once)."""
    g = torch.Generator().manual_seed(1)
    W = (0.9 * torch.randn(D, D, generator=g) / D ** 0.5)
    x = torch.randn(B, D, generator=g, requires_grad=True)
    w = torch.randn(B, D, generator=g)
    kw = dict(max_iter=80, tol=1e-6, backward_tol=1e-6, backward_max_iter=200)
    grads = []
    for scale in (1.0, 1e-30):
        z, stats = deqfast.fixed_point(lambda z: torch.tanh(z @ W + x), torch.zeros(B, D), **kw)
        (gx,) = torch.autograd.grad(scale * (z * w).sum(), x)
        assert stats.backward.converged.all() and (stats.backward.nstep > 3).all()
        grads.append(gx.double() / scale)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backward", ["implicit", "bptt"])
def test_summary_worst_residual_is_not_hidden_by_a_failed_sample(backward):
    """A sample whose f goes NaN fails; its residual is NaN (measured at f(z*), implicit) or inf
    (bptt). summary()'s worst relative residual is the others' worst, not NaN."""
    torch.manual_seed(3)
    W = 0.5 * torch.randn(4, 4, dtype=torch.float64) / 2
    bad = torch.tensor([[0.0], [0.0], [float("nan")]], dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + 1.0) + bad * z
    z0 = torch.zeros(3, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, stats = deqfast.fixed_point(f, z0, backward=backward, max_iter=5, tol=1e-30)
    assert stats.failed.tolist() == [False, False, True]
    worst = float(stats.rel_residual[:2].max())
    assert math.isfinite(worst) and worst > 0
    assert f"worst rel residual {worst:.3e}" in stats.summary(), stats.summary()


@pytest.mark.parametrize("backward", ["neumann", "implicit"])
def test_adjoint_nan_for_some_samples_is_warned(backward):
    """An incoming gradient with NaN in one sample: the adjoint (the Neumann series, or the implicit
    adjoint solve) goes NaN there; both warn and mark it in stats.backward.failed."""
    torch.manual_seed(4)
    W = (0.3 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
    f = lambda z: torch.tanh(z @ W.T + 1.0)
    z, stats = deqfast.fixed_point(f, torch.zeros(3, 4, dtype=torch.float64), backward=backward, tol=1e-12)
    c = torch.ones(3, 4, dtype=torch.float64)
    c[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        (z * c).sum().backward()
    assert stats.backward.failed.tolist() == [False, False, True]


# ---------------------------------------------------------------------------------------------
# Iterates that shrink far below z0's range during the solve (toward a fixed point at 0).
# ---------------------------------------------------------------------------------------------

def _shrink_oracle(z, f):
    """(‖f(z) − z‖ / ‖f(z)‖ per row in float64, exactly: rows scaled by a power of two first)."""
    z64 = z.double().reshape(z.shape[0], -1)
    f64 = f(z).double().reshape(z.shape[0], -1)
    scale = torch.ldexp(torch.ones(z.shape[0], 1, dtype=torch.float64),
                        -torch.frexp(f64.abs().amax(dim=1, keepdim=True)).exponent)
    return torch.linalg.vector_norm((f64 - z64) * scale, dim=1) / torch.linalg.vector_norm(f64 * scale, dim=1)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_underflowing_iterates_are_not_reported_converged(solver, path, dtype, monkeypatch):
    """f(z) = 0.5 z from z0 = 1: the iterates shrink until their squares underflow (float32 ~1e-23,
    float64 ~1e-162); the relative residual there is 1, never below tol. The solvers alone report it
    not measured (NaN, not converged) instead of 0 and converged; an iterate that reaches exactly 0,
    the fixed point, is an exact solve (Broyden's secant step finds it): rel 0, converged, as
    fixed_point's own measurement says too. No sample is reported converged with a wrong rel."""
    solve_path(path, solver, monkeypatch)
    f = lambda z: 0.5 * z  # noqa: E731
    z0 = torch.ones(3, 5, dtype=dtype)
    z, stats = SOLVERS[solver](f, z0, max_iter=2000, tol=1e-4)
    exact = (z == 0).all(dim=1)
    truth = _shrink_oracle(z, f)
    assert torch.equal(stats.converged, exact), (stats, z)
    assert torch.equal(stats.rel_residual[exact], torch.zeros(int(exact.sum()), dtype=dtype))
    assert stats.rel_residual[~exact].isnan().all()
    assert (truth[~exact] == 1).all()
    if solver != "broyden":
        assert not exact.any()  # they shrink by halves: the squares underflow long before 0
    # fixed_point measures again at the returned iterate: the same verdict
    _, measured = deqfast.fixed_point(f, z0, solver=solver, max_iter=2000, tol=1e-4)
    assert torch.equal(measured.converged, stats.converged)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_exact_and_zero_fixed_points_stay_converged(solver):
    """rel 0 where it is measured: z0 = 0 with f(0) = 0 (an exact fixed point at 0, e.g. a zero input),
    and an exact solve at a normal magnitude; the check costs nothing else."""
    z, stats = SOLVERS[solver](lambda z: torch.tanh(z), torch.zeros(2, 4), max_iter=10, tol=1e-6)
    assert stats.converged.all() and (stats.rel_residual == 0).all() and (stats.nstep == 1).all()
    b = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    z, stats = SOLVERS[solver](lambda z: b + 0 * z, torch.zeros(1, 3, dtype=torch.float64), max_iter=10, tol=1e-6)
    assert stats.converged.all() and (stats.rel_residual == 0).all() and torch.equal(z, b)


def test_per_sample_false_underflow_is_reported_for_every_row():
    z, stats = deqfast.solvers.anderson(lambda z: 0.5 * z, torch.ones(3, 4), max_iter=500, tol=1e-4, per_sample=False)
    assert not stats.converged.any() and stats.rel_residual.isnan().all() and stats.rel_residual.shape == (3,)
