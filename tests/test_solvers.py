"""Solvers against scipy.optimize.fixed_point and torchdeq 0.1.0, and per-sample behaviour."""
import numpy as np
import pytest
import torch

import deqfast
from conftest import ConvCell, TanhCell, solver_fn

SOLVERS = ["anderson", "fixed_point", "broyden"]
F64 = torch.float64


def _counting(f):
    calls = [0]

    def wrapped(z):
        calls[0] += 1
        return f(z)

    return wrapped, calls


def _tanh_problem(B=6, d=32, contraction=0.8, seed=0, scale=2.0):
    cell = TanhCell(d=d, contraction=contraction, seed=seed)
    x = scale * torch.randn(B, d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return (lambda z: cell(z, x)), torch.zeros(B, d, dtype=F64)


# --- scipy.optimize.fixed_point's own example problems -------------------------------------------

def _scipy_sqrt_problem():
    """scipy.optimize.fixed_point's docstring example: x = sqrt(c1 / (x + c2))."""
    from scipy import optimize
    c1, c2 = np.array([10.0, 12.0]), np.array([3.0, 5.0])
    expected = optimize.fixed_point(lambda x: np.sqrt(c1 / (x + c2)), [1.2, 1.3], xtol=1e-14)
    t1, t2 = torch.tensor(c1, dtype=F64), torch.tensor(c2, dtype=F64)
    return expected, t1, t2


@pytest.mark.parametrize("solver", SOLVERS)
def test_scipy_docstring_example_as_batch(solver):
    """Two independent scalar problems as a batch of 2 samples with d = 1."""
    expected, c1, c2 = _scipy_sqrt_problem()
    f = lambda z: torch.sqrt(c1.view(2, 1) / (z + c2.view(2, 1)))
    z, stats = solver_fn(solver)(f, torch.tensor([[1.2], [1.3]], dtype=F64), tol=1e-13, max_iter=200)
    np.testing.assert_allclose(z.squeeze(1).numpy(), expected, rtol=0, atol=1e-11)
    assert stats.converged.all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_scipy_docstring_example_as_vector(solver):
    """The same system as one sample with d = 2, as scipy treats it."""
    expected, c1, c2 = _scipy_sqrt_problem()
    f = lambda z: torch.sqrt(c1 / (z + c2))
    z, stats = solver_fn(solver)(f, torch.tensor([[1.2, 1.3]], dtype=F64), tol=1e-13, max_iter=200)
    np.testing.assert_allclose(z[0].numpy(), expected, rtol=0, atol=1e-11)


@pytest.mark.parametrize("solver", SOLVERS)
def test_scipy_cos_problem(solver):
    from scipy import optimize
    starts = np.array([0.1, 0.5, 1.0, -0.7])
    expected = optimize.fixed_point(np.cos, starts, xtol=1e-14)
    z, stats = solver_fn(solver)(torch.cos, torch.tensor(starts, dtype=F64).view(4, 1), tol=1e-13, max_iter=300)
    np.testing.assert_allclose(z.squeeze(1).numpy(), expected, rtol=0, atol=1e-11)
    assert stats.converged.all()


# --- torchdeq 0.1.0's solvers --------------------------------------------------------------------

TORCHDEQ_NAMES = {"anderson": "anderson", "fixed_point": "fixed_point_iter", "broyden": "broyden"}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("contraction", [0.5, 0.9])
def test_same_fixed_point_as_torchdeq(solver, contraction):
    torchdeq_solver = pytest.importorskip("torchdeq.solver").get_solver(TORCHDEQ_NAMES[solver])
    f, z0 = _tanh_problem(contraction=contraction, seed=2)
    with torch.no_grad():
        z_ours, stats = solver_fn(solver)(f, z0, tol=1e-11, stop_mode="abs", max_iter=400)
        z_theirs, _, info = torchdeq_solver(f, z0, tol=1e-11, stop_mode="abs", max_iter=400)
    assert stats.converged.all() and info["abs_lowest"].max() < 1e-11
    torch.testing.assert_close(z_ours, z_theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("tol", [1e-4, 1e-8])
@pytest.mark.parametrize("contraction,seed", [(0.5, 0), (0.9, 1), (0.99, 2)])
def test_anderson_needs_no_more_f_evaluations_than_torchdeq(tol, contraction, seed):
    torchdeq_anderson = pytest.importorskip("torchdeq.solver").get_solver("anderson")
    f, z0 = _tanh_problem(B=8, d=64, contraction=contraction, seed=seed)
    ours, n_ours = _counting(f)
    theirs, n_theirs = _counting(f)
    with torch.no_grad():
        _, stats = deqfast.solvers.anderson(ours, z0, m=6, lam=1e-4, tol=tol, stop_mode="abs", max_iter=300)
        _, _, info = torchdeq_anderson(theirs, z0, m=6, lam=1e-4, tol=tol, stop_mode="abs", max_iter=300)
    assert stats.converged.all() and info["abs_lowest"].max() < tol
    assert n_ours[0] <= n_theirs[0], f"deqfast used {n_ours[0]} evaluations of f, torchdeq {n_theirs[0]}"


def test_anderson_needs_no_more_f_evaluations_than_torchdeq_conv():
    torchdeq_anderson = pytest.importorskip("torchdeq.solver").get_solver("anderson")
    cell = ConvCell(channels=4, contraction=0.9, seed=4)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    f = lambda z: cell(z, x)
    ours, n_ours = _counting(f)
    theirs, n_theirs = _counting(f)
    with torch.no_grad():
        deqfast.solvers.anderson(ours, torch.zeros_like(x), m=6, tol=1e-6, stop_mode="abs", max_iter=300)
        torchdeq_anderson(theirs, torch.zeros_like(x), m=6, tol=1e-6, stop_mode="abs", max_iter=300)
    assert n_ours[0] <= n_theirs[0]


# --- per-sample behaviour ------------------------------------------------------------------------

@pytest.mark.parametrize("solver", SOLVERS)
def test_batch_composition_independence(solver):
    """A sample's result is the same alone or in any batch (per-sample freezing and solves)."""
    f, z0 = _tanh_problem(B=6, contraction=0.9, seed=7)
    cell_f = f
    z_batch, stats = solver_fn(solver)(cell_f, z0, tol=1e-9, max_iter=200)
    assert len(set(stats.nstep.tolist())) > 1, "samples should converge at different steps for this test to bite"
    rows = torch.arange(6)
    for subset in ([3], [0, 5], [5, 1, 2]):
        idx = torch.tensor(subset)
        f_sub = lambda z, idx=idx: _rows(cell_f, z, idx, 6)
        z_sub, stats_sub = solver_fn(solver)(f_sub, z0[idx], tol=1e-9, max_iter=200)
        torch.testing.assert_close(z_sub, z_batch[idx], rtol=0, atol=1e-6)
        torch.testing.assert_close(z_sub, z_batch[idx], rtol=0, atol=1e-12)
        assert stats_sub.nstep.tolist() == stats.nstep[idx].tolist()
    del rows


def _rows(f, z, idx, B):
    """Evaluate the batch-B problem f on a sub-batch z of rows idx (the cell is per sample, x is fixed)."""
    full = torch.zeros((B,) + z.shape[1:], dtype=z.dtype)
    full[idx] = z
    return f(full)[idx]


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_hard_sample_and_easy_ones(solver):
    """Easy samples converge early and freeze; the hard one uses every iteration; stats say so."""
    a = torch.tensor([0.1, 0.2, 0.5, 0.3], dtype=F64).view(4, 1)  # per-sample contraction factor
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64).view(4, 1)
    W = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=F64))[0]
    hard = torch.tensor([False, False, True, False]).view(4, 1)
    # sample 2 has no fixed point at all (f(z) = z + 0.1 sin(z) + 1): it can only run out of iterations
    f = lambda z: torch.where(hard, z + 0.1 * torch.sin(z) + 1.0, a * torch.tanh(z @ W.T) + c)
    seen = []

    def spy(z):
        seen.append(z.clone())
        return f(z)

    z, stats = solver_fn(solver)(spy, torch.zeros(4, 5, dtype=F64), tol=1e-10, stop_mode="abs", max_iter=15)
    easy = torch.tensor([0, 1, 3])
    assert stats.converged[easy].all() and not stats.converged[2]
    assert (stats.nstep[easy] < 15).all() and stats.nstep[2] == 15
    assert not stats.failed.any()
    # Once converged, an easy sample is fed its frozen best iterate and no longer moves.
    for i in easy.tolist():
        n = int(stats.nstep[i])
        for later in seen[n:]:
            assert torch.equal(later[i], z[i])
    # The reported residuals are those of the returned iterates.
    fz = f(z)
    torch.testing.assert_close(stats.residual, (fz - z).norm(dim=1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(stats.rel_residual, (fz - z).norm(dim=1) / fz.norm(dim=1), rtol=1e-12, atol=1e-15)
    assert (stats.residual[easy] < 1e-10).all()


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_returns_best_iterate_with_its_residual(solver, stop_mode):
    f, z0 = _tanh_problem(contraction=0.95, seed=3)
    z, stats = solver_fn(solver)(f, z0, tol=1e-30, stop_mode=stop_mode, max_iter=7)
    fz = f(z)
    residual = (fz - z).norm(dim=1)
    torch.testing.assert_close(stats.residual, residual, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.rel_residual, residual / fz.norm(dim=1), rtol=1e-12, atol=0)
    assert not stats.converged.any() and (stats.nstep == 7).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_check_every_never_changes_results(solver):
    f, z0 = _tanh_problem(contraction=0.9, seed=4)
    z1, s1 = solver_fn(solver)(f, z0, tol=1e-8, max_iter=100, check_every=1)
    z7, s7 = solver_fn(solver)(f, z0, tol=1e-8, max_iter=100, check_every=7)
    assert torch.equal(z1, z7) and torch.equal(s1.nstep, s7.nstep) and torch.equal(s1.residual, s7.residual)


@pytest.mark.parametrize("solver", SOLVERS)
def test_deterministic(solver):
    f, z0 = _tanh_problem(seed=6)
    z1, s1 = solver_fn(solver)(f, z0, tol=1e-8)
    z2, s2 = solver_fn(solver)(f, z0, tol=1e-8)
    assert torch.equal(z1, z2) and torch.equal(s1.residual, s2.residual)


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_anderson_with_one_slot_is_damped_fixed_point_iteration(tau):
    f, z0 = _tanh_problem(seed=8)
    za, sa = deqfast.solvers.anderson(f, z0, m=1, tau=tau, tol=1e-9, max_iter=200)
    zf, sf = deqfast.solvers.fixed_point_iteration(f, z0, tau=tau, tol=1e-9, max_iter=200)
    torch.testing.assert_close(za, zf, rtol=0, atol=1e-14)
    assert torch.equal(sa.nstep, sf.nstep)


def test_damping_makes_an_oscillating_map_converge():
    f = lambda z: -1.5 * z + 1.0  # plain iteration diverges, the fixed point is 0.4
    z0 = torch.zeros(3, 2, dtype=F64)
    with pytest.warns(RuntimeWarning, match="3 of 3"):
        _, undamped = deqfast.solvers.fixed_point_iteration(f, z0, tol=1e-10, max_iter=3000)
    assert not undamped.converged.any()
    z, stats = deqfast.solvers.fixed_point_iteration(f, z0, tau=0.5, tol=1e-10, max_iter=200)
    assert stats.converged.all()
    torch.testing.assert_close(z, torch.full_like(z, 0.4), rtol=0, atol=1e-9)
    za, sa = deqfast.solvers.anderson(f, z0, tau=0.5, tol=1e-10, max_iter=200)
    assert sa.converged.all() and sa.nstep.max() < stats.nstep.min()


def test_anderson_survives_a_singular_history():
    """Repeated identical residuals make the Gram matrix singular: no NaN, still converges."""
    f = lambda z: 0.5 * z + 1.0
    z0 = torch.ones(2, 4, dtype=torch.float32) * 2.0  # the fixed point: an exact solution at step 1
    z, stats = deqfast.solvers.anderson(f, z0, tol=1e-7, max_iter=20, lam=1e-12)  # lam = 0 is rejected
    assert torch.isfinite(z).all() and stats.converged.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_states(dtype):
    f64, z0 = _tanh_problem(B=4, d=16, contraction=0.7, seed=9)
    f = lambda z: f64(z.double()).to(dtype)
    z, stats = deqfast.solvers.anderson(f, z0.to(dtype), tol=5e-3, max_iter=50)
    assert z.dtype == dtype and stats.residual.dtype == torch.float32
    assert stats.converged.all()
    z_ref, _ = deqfast.solvers.anderson(f64, z0, tol=1e-12, max_iter=100)
    assert (z.double() - z_ref).norm(dim=1).max() < 0.05 * z_ref.norm(dim=1).min()


def test_broyden_converges_with_a_short_history():
    """m = 4 rank-1 updates in a ring (overwritten every 4 steps) still reach the fixed point."""
    f, z0 = _tanh_problem(contraction=0.95, seed=10)
    z, stats = deqfast.solvers.broyden(f, z0, m=4, tol=1e-10, max_iter=500)
    assert stats.converged.all() and (stats.nstep > 4).all()
    torch.testing.assert_close(f(z), z, rtol=0, atol=1e-8)


def test_nonconverging_samples_report_max_iter_without_warning(recwarn):
    f, z0 = _tanh_problem(contraction=0.99, seed=11)
    _, stats = deqfast.solvers.anderson(f, z0, tol=1e-14, max_iter=3)
    assert (stats.nstep == 3).all() and not stats.converged.any() and not stats.failed.any()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_anderson_float32_with_large_gram_entries():
    """Gram entries ~1e5 in float32 (benchmarks/README.md: an absolute ridge gave NaN there)."""
    g = torch.Generator().manual_seed(12)
    c = 5.0 * torch.randn(3, 8192, generator=g)
    W = 0.9 * torch.randn(8192, generator=g).sign()  # per-element contraction, oscillating signs
    f = lambda z: W * torch.tanh(z) + c
    z, stats = deqfast.solvers.anderson(f, torch.zeros_like(c), tol=1e-5, max_iter=100)
    assert torch.isfinite(z).all() and stats.converged.all()
    z64, _ = deqfast.solvers.anderson(lambda z: W.double() * torch.tanh(z) + c.double(), torch.zeros_like(c).double(),
                                      tol=1e-12, max_iter=200)
    assert (z.double() - z64).norm(dim=1).max() < 1e-4 * z64.norm(dim=1).min()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5)])
def test_anderson_float32_no_more_f_evaluations_than_torchdeq(dtype, tol):
    torchdeq_anderson = pytest.importorskip("torchdeq.solver").get_solver("anderson")
    cell = TanhCell(d=64, contraction=0.9, seed=3, dtype=dtype)
    x = 2 * torch.randn(8, 64, generator=torch.Generator().manual_seed(3), dtype=dtype)
    f = lambda z: cell(z, x)
    ours, n_ours = _counting(f)
    theirs, n_theirs = _counting(f)
    with torch.no_grad():
        _, stats = deqfast.solvers.anderson(ours, torch.zeros_like(x), m=6, tol=tol, stop_mode="abs", max_iter=300)
        _, _, info = torchdeq_anderson(theirs, torch.zeros_like(x), m=6, tol=tol, stop_mode="abs", max_iter=300)
    assert stats.converged.all() and info["abs_lowest"].max() < tol
    assert n_ours[0] <= n_theirs[0]


@pytest.mark.parametrize("solver", SOLVERS)
def test_zero_map_is_not_a_failure_in_rel_mode(solver, recwarn):
    """f(z) = 0 gives ‖f(z) − z‖/‖f(z)‖ = inf at z != 0: large, not NaN/Inf from f, so not 'failed'."""
    z, stats = solver_fn(solver)(lambda z: 0.0 * z, torch.full((2, 4), 2.5, dtype=F64), tol=1e-6, max_iter=5)
    assert not stats.failed.any() and stats.converged.all()
    assert torch.equal(z, torch.zeros_like(z))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("solver", SOLVERS)
def test_empty_state_per_sample(solver):
    z, stats = solver_fn(solver)(lambda z: 0.5 * z, torch.zeros(3, 0), max_iter=4)
    assert z.shape == (3, 0) and stats.converged.all()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("contraction", [0.9, 0.99])
def test_half_states_converge_in_at_most_1_2x_the_float32_iterations(dtype, tol, contraction):
    """benchmarks/README.md: history in the state dtype, Gram and solve in float32, same tolerance in
    <= 1.2x the float32 iterations (per sample, on average over the batch)."""
    cell = TanhCell(d=256, contraction=contraction, seed=1, dtype=torch.float32)
    x = 0.5 * torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    steps = {}
    for dt in (torch.float32, dtype):
        f = lambda z, dt=dt: cell(z.float(), x).to(dt)
        with torch.no_grad():
            _, stats = deqfast.solvers.anderson(f, torch.zeros(16, 256, dtype=dt), tol=tol, max_iter=100)
        assert stats.converged.all()
        steps[dt] = stats.nstep.double().mean().item()
    assert steps[dtype] <= 1.2 * steps[torch.float32]
