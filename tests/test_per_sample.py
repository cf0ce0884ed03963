"""per_sample=False: a state whose rows of dim 0 f couples (graph nodes, a sequence) is one sample.

With the default per_sample=True each row is tested and frozen on its own: in a coupled f a row
frozen early drifts off its fixed point as the rows it reads keep moving (first test: the reason
the option exists). per_sample=False tests the whole state at once; its result meets tol as
recomputed in float64, forward and in the adjoint of the implicit backward (dense oracle).
"""
import pytest
import torch

import deqfast
from conftest import solve_path

SOLVERS = {"anderson": deqfast.solvers.anderson, "fixed_point": deqfast.solvers.fixed_point_iteration,
           "broyden": deqfast.solvers.broyden}
N, D, TOL = 8, 16, 1e-4


def _coupled(dtype=torch.float64, requires_grad=False):
    """Rows 0-3 contract fast on their own, rows 4-7 slowly; every row reads the slow rows' mean,
    so the fast rows meet tol early and then their fixed point moves with the slow rows."""
    g = torch.Generator().manual_seed(0)
    c = torch.tensor([0.05] * 4 + [0.65] * 4, dtype=dtype).unsqueeze(1)
    P = torch.zeros(N, N, dtype=dtype)
    P[:, 4:] = 0.25
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    return (lambda z, x=x: torch.tanh(c * z + 0.3 * (P @ z) + x)), x


def _criterion(f, z, stop_mode, per_sample):
    fz, z = f(z).double(), z.double()  # f in the state's dtype, the norms in float64
    rows = N if per_sample else 1
    r = torch.linalg.vector_norm((fz - z).reshape(rows, -1), dim=1)
    return r if stop_mode == "abs" else r / torch.linalg.vector_norm(fz.reshape(rows, -1), dim=1), r




@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_per_sample_rows_drift_in_a_coupled_f(solver, stop_mode):
    """Why per_sample=False exists: per row, every row reports converged, yet rows frozen early
    no longer meet tol at the returned state."""
    f, _ = _coupled()
    z, stats = SOLVERS[solver](f, torch.zeros(N, D, dtype=torch.float64), tol=TOL, stop_mode=stop_mode, max_iter=100)
    assert stats.converged.all()
    crit, _ = _criterion(f, z, stop_mode, per_sample=True)
    assert crit.max() > TOL


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("stop_mode", ["rel", "abs"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_whole_state_meets_tol(solver, stop_mode, path, dtype, monkeypatch):
    solve_path(path, solver, monkeypatch)
    f, _ = _coupled(dtype)
    z, stats = SOLVERS[solver](f, torch.zeros(N, D, dtype=dtype), tol=TOL, stop_mode=stop_mode, max_iter=100,
                               per_sample=False)
    assert stats.nstep.shape == (N,) and stats.residual.shape == (N,)
    for name in ("nstep", "residual", "rel_residual", "converged", "failed"):
        values = getattr(stats, name)
        assert (values == values[0]).all(), name
    assert stats.converged.all() and not stats.failed.any()
    crit, residual = _criterion(f, z, stop_mode, per_sample=False)
    assert crit.item() < TOL
    rtol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(stats.residual[0].double(), residual[0], rtol=rtol, atol=0)


def test_per_sample_false_equals_one_row_solve():
    """per_sample=False is exactly the solve of the state viewed as one sample (1, N·D)."""
    f, _ = _coupled()
    z, stats = deqfast.solvers.anderson(f, torch.zeros(N, D, dtype=torch.float64), tol=TOL, per_sample=False)
    z1, s1 = deqfast.solvers.anderson(lambda v: f(v.reshape(N, D)).reshape(1, -1),
                                      torch.zeros(1, N * D, dtype=torch.float64), tol=TOL)
    assert torch.equal(z.reshape(1, -1), z1)
    assert torch.equal(stats.residual, s1.residual.expand(N))


@pytest.mark.parametrize("backward", ["implicit", "jfb", "neumann"])
def test_fixed_point_stats_are_measured_at_the_returned_evaluation(backward):
    """fixed_point with per_sample=True on the coupled f: stats are measured at the final f(z*),
    so the drifted rows show their true residual and converged False; per_sample=False meets tol."""
    f, x = _coupled(requires_grad=True)
    z0 = torch.zeros(N, D, dtype=torch.float64)
    z_star, _ = deqfast.solvers.fixed_point_iteration(f, z0, tol=TOL, max_iter=100)
    out, stats = deqfast.fixed_point(f, z0, solver="fixed_point", tol=TOL, max_iter=100, backward=backward)
    torch.testing.assert_close(out.detach(), f(z_star).detach(), rtol=0, atol=0)
    crit, residual = _criterion(lambda z: f(z).detach(), z_star, "rel", per_sample=True)
    torch.testing.assert_close(stats.residual.double(), residual, rtol=1e-10, atol=0)
    assert torch.equal(stats.converged, crit < TOL)
    assert not stats.converged.all()
    out, stats = deqfast.fixed_point(f, z0, solver="fixed_point", tol=TOL, max_iter=100, backward=backward,
                                     per_sample=False)
    assert stats.converged.all()


# Broyden is left out: as the adjoint solver of this problem it produces NaN before backward_tol,
# per_sample True or False alike (a Broyden matter, not one of per_sample).
@pytest.mark.parametrize("backward_solver", ["fixed_point", "anderson"])
def test_implicit_adjoint_of_a_coupled_state(backward_solver):
    """per_sample=False: the implicit gradient equals the dense float64 oracle over the whole state,
    u = (I − Jᵀ)⁻¹ w and dL/dx = (∂f/∂x)ᵀ u with J the whole-state Jacobian."""
    f, x = _coupled(requires_grad=True)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(N, D, generator=g, dtype=torch.float64)
    z, stats = deqfast.fixed_point(f, torch.zeros(N, D, dtype=torch.float64), tol=1e-12, max_iter=300,
                                   backward_solver=backward_solver, backward_tol=1e-9, backward_max_iter=300,
                                   per_sample=False)
    (grad,) = torch.autograd.grad((z * w).sum(), x)
    assert stats.backward.converged.all() and stats.backward.residual.shape == (N,)
    z_star = z.detach()
    J = torch.autograd.functional.jacobian(lambda v: f(v.reshape(N, D)).reshape(-1), z_star.reshape(-1))
    u = torch.linalg.solve(torch.eye(N * D, dtype=torch.float64) - J.T, w.reshape(-1))
    (oracle,) = torch.autograd.grad(f(z_star), x, u.reshape(N, D))
    torch.testing.assert_close(grad, oracle, rtol=1e-6, atol=1e-8)


def test_per_sample_must_be_a_bool():
    f, _ = _coupled()
    for call in (lambda: deqfast.fixed_point(f, torch.zeros(N, D, dtype=torch.float64), per_sample=1),
                 lambda: deqfast.solvers.broyden(f, torch.zeros(N, D, dtype=torch.float64), per_sample="no"),
                 lambda: deqfast.DEQ(lambda z, x: z, per_sample=None)):
        with pytest.raises(TypeError, match="per_sample must be a bool"):
            call()
