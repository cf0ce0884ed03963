"""Broyden over the filled slots only: the same iterates as a dense float64 Broyden, and a sample's
result independent of the other samples of its batch (bitwise), on the fused ops and the reference."""
import pytest
import torch

import deqfast
from conftest import solve_path

PATHS = ["fused", "reference"]

F64 = torch.float64


def _dense_broyden(f, z0, T, m):
    """Reference: good Broyden with H = −I + Σ u vᵀ as an explicit (d, d) matrix per sample and
    the last m updates kept, T evaluations of f, nothing frozen (tol 0). Returns the last iterate
    of each sample and the residual norms of every evaluation."""
    out, trace = [], []
    for b in range(z0.shape[0]):
        fb = lambda z: f_one(f, z, b, z0)
        x = z0[b].clone()
        g = fb(x) - x
        updates, res = [], [float(g.norm())]
        d = x.numel()
        for k in range(1, T):
            H = -torch.eye(d, dtype=F64) + sum((torch.outer(u, v) for u, v in updates), torch.zeros(d, d, dtype=F64))
            x_next = x - H @ g
            g_next = fb(x_next) - x_next
            res.append(float(g_next.norm()))
            if k + 1 == T:
                x = x_next
                break
            dx, dg = x_next - x, g_next - g
            v = H.T @ dx
            u = (dx - H @ dg) / (v @ dg)
            updates.append((u, v))
            updates = updates[-m:]
            x, g = x_next, g_next
        out.append(x)
        trace.append(res)
    return torch.stack(out), torch.tensor(trace, dtype=F64)


def f_one(f, z, b, z0):
    """f on sample b alone (f here is per sample: evaluate the batch with z in row b)."""
    batch = z0.clone()
    batch[b] = z
    return f(batch)[b]


def _problem(B, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=F64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)
    c = torch.randn(B, d, generator=g, dtype=F64)
    return (lambda z: torch.tanh(z @ W.T + c)), 0.1 * torch.randn(B, d, generator=g, dtype=F64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", [3, 30])
def test_matches_dense_float64_broyden(m, path, monkeypatch):
    """Forced T = 12 evaluations (tol 0): the ring of m = 3 wraps, m = 30 never does."""
    solve_path(path, "broyden", monkeypatch)
    f, z0 = _problem(3, 10)
    T = 12
    expected, _ = _dense_broyden(f, z0, T, m)
    residuals = []

    def traced(z):
        fz = f(z)
        residuals.append((fz - z).norm(dim=1))
        return fz

    # The solver returns each sample's best iterate; with a contraction the last one is best
    # here, and the residual trace pins every intermediate iterate.
    z, stats = deqfast.solvers.broyden(traced, z0, max_iter=T, tol=0.0, m=m)
    _, trace = _dense_broyden(f, z0, T, m)
    got = torch.stack(residuals, dim=1)
    torch.testing.assert_close(got, trace, rtol=1e-9, atol=1e-12)
    best = trace.argmin(dim=1)
    assert (best == T - 1).all(), "the problem is meant to improve to the last step"
    torch.testing.assert_close(z, expected, rtol=1e-9, atol=1e-12)
    assert (stats.nstep == T).all()


def _elementwise_problem(n, d, seed):
    """A per-sample map (no matmul across the batch, so f itself is batch-independent), with a
    different contraction per sample so samples converge after different numbers of steps."""
    g = torch.Generator().manual_seed(seed)
    a = 0.3 + 0.65 * torch.rand(n, 1, generator=g)
    c = torch.randn(n, d, generator=g)
    z0 = torch.randn(n, d, generator=g)
    return c, a, z0


def _solve_rows(c, a, z0, rows, **kw):
    cc, aa = c[rows], a[rows]
    f = lambda z: aa * torch.sin(0.6 * z.roll(1, dims=1) + 0.4 * z + cc)
    return deqfast.solvers.broyden(f, z0[rows], **kw)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("d", [300, 40000])
def test_sample_independent_of_its_batch_neighbours(d, path, monkeypatch):
    """Sample 0 alone and in batches of 2, 7 and 64 (2 and 3 at large d) with random other samples: the
    same z and the same stats, bitwise. d = 40000 exceeds torch's 32768-element threshold above
    which a single-output sum is split between threads."""
    solve_path(path, "broyden", monkeypatch)
    n = 80 if d == 300 else 4
    c, a, z0 = _elementwise_problem(n, d, seed=1)
    kw = dict(max_iter=25, tol=1e-5, m=8)
    z_alone, s_alone = _solve_rows(c, a, z0, torch.tensor([0]), **kw)
    assert 3 < int(s_alone.nstep[0]) < kw["max_iter"], "sample 0 should converge within the solve"
    sizes = [2, 7, 64] if d == 300 else [2, 3]
    perm = torch.Generator().manual_seed(2)
    for i, B in enumerate(sizes):
        others = torch.randperm(n - 1, generator=perm)[:B - 1] + 1
        for position in [(B - 1) * (i % 2)]:  # first or last in the batch
            rows = torch.cat([others[:position], torch.tensor([0]), others[position:]])
            z, s = _solve_rows(c, a, z0, rows, **kw)
            assert torch.equal(z[position], z_alone[0]), (B, position)
            for name in ("nstep", "residual", "rel_residual", "converged", "failed"):
                assert torch.equal(getattr(s, name)[position], getattr(s_alone, name)[0]), (B, position, name)
        # and the neighbours converge at other speeds (else the test would not exercise freezing)
        if B > 2:
            assert len(set(s.nstep.tolist())) > 1


def test_recorded_history_gives_the_same_solve():
    """backward="bptt" records through the solve on a list history: the same iterates."""
    f, z0 = _problem(4, 12, seed=3)
    with torch.no_grad():
        z_buffer, s_buffer = deqfast.solvers.broyden(f, z0, max_iter=15, tol=1e-9, m=5)
    x = z0.clone().requires_grad_()
    z_rec, s_rec = deqfast.solvers.broyden(f, x, max_iter=15, tol=1e-9, m=5)
    assert z_rec.requires_grad
    torch.testing.assert_close(z_rec.detach(), z_buffer, rtol=1e-12, atol=1e-12)
    assert torch.equal(s_rec.nstep, s_buffer.nstep)


def test_one_default_history_length_for_the_solver_and_fixed_point_and_DEQ():
    """deqfast.solvers.broyden keeps m = 5 updates by default, the m that fixed_point and DEQ pass it:
    the solver called alone and through fixed_point(solver="broyden") take the same iterates."""
    import inspect

    from deqfast.options import Options

    assert inspect.signature(deqfast.solvers.broyden).parameters["m"].default == Options.m == 5
    assert inspect.signature(deqfast.fixed_point).parameters["m"].default == 5
    assert deqfast.DEQ(lambda z, x: z).options.m == 5
    c, a, z0 = _elementwise_problem(4, 24, seed=3)
    c, a, z0 = c.double(), a.double(), z0.double()
    f = lambda z: a * torch.sin(0.6 * z.roll(1, dims=1) + 0.4 * z + c)  # noqa: E731
    kw = dict(max_iter=40, tol=1e-10)
    traces = {}
    for name, solve in {"alone": lambda f_: deqfast.solvers.broyden(f_, z0, **kw),
                        "m=5": lambda f_: deqfast.solvers.broyden(f_, z0, m=5, **kw),
                        "m=30": lambda f_: deqfast.solvers.broyden(f_, z0, m=30, **kw),
                        "fixed_point": lambda f_: deqfast.fixed_point(f_, z0, solver="broyden", **kw)}.items():
        seen = []
        solve(lambda z: (seen.append(z.detach().clone()), f(z))[1])
        traces[name] = seen
    same = lambda s, t: len(s) == len(t) and all(torch.equal(x, y) for x, y in zip(s, t))  # noqa: E731
    assert same(traces["alone"], traces["m=5"])
    # fixed_point evaluates f once more at the result (its stats and returned f(z*))
    assert same(traces["alone"], traces["fixed_point"][:len(traces["alone"])])
    assert not same(traces["alone"], traces["m=30"]), "the problem should tell m = 5 from m = 30"
