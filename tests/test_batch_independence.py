"""A sample's result does not depend on which others share the batch (README, "Per sample").

Solved alone and at any position of batches of 2, 7 and 64 with other neighbours, a sample gets
bitwise the same iterate and stats, on the fused path and on the reference (where torch.bmm and
torch's whole-tensor sums change their reduction order with the batch size, so the reference sums
each row in fixed chunks instead). f is per-sample and elementwise, so f itself cannot mix samples.
"""
import pytest
import torch

import deqfast
from deqfast import ops
from deqfast._extension import fused_available

SOLVERS = {"anderson": deqfast.solvers.anderson, "fixed_point": deqfast.solvers.fixed_point_iteration}
PATHS = ["fused", "reference"]


def _path(path, monkeypatch):
    if path == "fused":
        if not fused_available(torch.device("cpu")):
            pytest.skip("deqfast._C not compiled")
    else:
        monkeypatch.setattr(ops, "use_fused", lambda *a, **k: False)


def _problem(d, dtype, n_neighbours, seed):
    g = torch.Generator().manual_seed(0)
    w = (0.5 * (2 * torch.rand(d, generator=g, dtype=torch.float64) - 1)).to(dtype)
    v = (0.4 * (2 * torch.rand(d, generator=g, dtype=torch.float64) - 1)).to(dtype)
    x_target = torch.randn(1, d, generator=g, dtype=torch.float64).to(dtype)
    g = torch.Generator().manual_seed(seed)
    neighbours = 3 * torch.randn(n_neighbours, d, generator=g, dtype=torch.float64).to(dtype)
    position = int(torch.randint(n_neighbours + 1, (1,), generator=g))
    x = torch.cat([neighbours[:position], x_target, neighbours[position:]])
    # |∂f/∂z| <= 0.9 elementwise-ish: a contraction, per sample (roll along dim 1 only).
    return (lambda z: torch.tanh(w * z + v * torch.roll(z, 1, dims=1) + x)), x, position


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d, sizes", [(4500, (2, 7, 64)), (33000, (2,))])
def test_sample_alone_equals_sample_in_any_batch(path, solver, dtype, d, sizes, monkeypatch):
    _path(path, monkeypatch)
    kw = dict(max_iter=8, tol=1e-12 if dtype == torch.float64 else 1e-7, tau=0.8)
    f, _, _ = _problem(d, dtype, 0, 0)
    z_alone, s_alone = SOLVERS[solver](f, torch.zeros(1, d, dtype=dtype), **kw)
    for B in sizes:
        f, x, i = _problem(d, dtype, B - 1, B)
        z, s = SOLVERS[solver](f, torch.zeros(B, d, dtype=dtype), **kw)
        assert torch.equal(z[i], z_alone[0]), (B, (z[i] - z_alone[0]).abs().max())
        for name in ("nstep", "residual", "rel_residual", "converged", "failed"):
            assert torch.equal(getattr(s, name)[i], getattr(s_alone, name)[0]), (B, name)
    # And the stats are those of the returned iterate (its residual re-measured in float64).
    f, _, _ = _problem(d, dtype, 0, 0)
    true_res = torch.linalg.vector_norm((f(z_alone) - z_alone).double())
    torch.testing.assert_close(s_alone.residual.double()[0], true_res, rtol=1e-5, atol=0)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_recorded_solve_is_batch_independent(solver):
    """backward="bptt": the reference's recorded Anderson step sums in the same fixed chunks."""
    d = 33000
    kw = dict(max_iter=6, tol=1e-12)
    results = []
    for B in (1, 2):
        f, x, i = _problem(d, torch.float32, B - 1, B)
        x.requires_grad_()
        z, s = SOLVERS[solver](f, torch.zeros(B, d), **kw)
        assert z.requires_grad
        results.append((z[i].detach(), s.residual[i]))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
