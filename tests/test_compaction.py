"""DEQ(cell, compact=True): the cell evaluated on the active samples only, same results."""
import pytest
import torch
from torch import nn

import deqfast
from conftest import TanhCell, dense_jacobian
from test_gradients import _dense_param_grad

F64 = torch.float64


def _spread_problem(B=6, d=8, seed=0):
    """Samples that converge after very different numbers of steps: per-sample contraction
    scales 0.3 .. 0.97 applied to a shared TanhCell."""
    cell = TanhCell(d=d, d_in=d, contraction=1.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, d, generator=g, dtype=F64)
    scale = torch.linspace(0.3, 0.97, B, dtype=F64).unsqueeze(1)
    x = torch.cat([x, scale], dim=1).requires_grad_()  # the scale rides along in x (gathered with it)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = cell

        def forward(self, z, xs):
            return xs[:, -1:] * self.inner(z, xs[:, :-1])

    return Scaled(), x, torch.zeros(B, d, dtype=F64)


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_compact_equals_full_batch_and_the_dense_oracle(solver):
    cell, x, z0 = _spread_problem()
    kw = dict(solver=solver, max_iter=300, tol=1e-12, backward_tol=1e-12, backward_max_iter=500)
    c = torch.randn(z0.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    results = {}
    for compact in (False, True):
        layer = deqfast.DEQ(cell, compact=compact, **kw)
        out = layer(x, z0)
        grads = torch.autograd.grad((out * c).sum(), list(cell.parameters()) + [x])
        results[compact] = (out.detach(), grads, layer)
    (z_full, g_full, _), (z_c, g_c, comp) = results[False], results[True]
    assert bool(comp.stats.converged.all())
    assert len(set(comp.stats.nstep.tolist())) > 2, "samples should converge at different speeds"
    torch.testing.assert_close(z_c, z_full, rtol=0, atol=1e-10)
    for a, b in zip(g_c, g_full):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # each sample evaluated exactly while active (host check after every evaluation on the CPU),
    # plus the one full-batch f at z*
    B = z0.shape[0]
    assert comp.rows_evaluated == int(comp.stats.nstep.sum()) + B
    assert comp.rows_evaluated < B * int(comp.stats.nstep.max())
    # float64 oracle: u = (I − Jᵀ)⁻¹ c at z*, gradient Σ uᵀ ∂f/∂θ
    J = dense_jacobian(lambda z: cell(z, x.detach()), z_c)
    eye = torch.eye(J.shape[1], dtype=F64)
    u = torch.linalg.solve((eye - J).transpose(1, 2), c.unsqueeze(2)).squeeze(2)
    for a, e in zip(g_c, _dense_param_grad(cell, x, z_c, u)):
        assert float((a - e).norm() / e.norm()) < 1e-8


def test_check_every_bounds_the_compaction():
    cell, x, z0 = _spread_problem()
    layer = deqfast.DEQ(cell, compact=True, max_iter=300, tol=1e-12, check_every=5)
    with torch.no_grad():
        z = layer(x, z0)
        z_full = deqfast.DEQ(cell, max_iter=300, tol=1e-12, check_every=5)(x, z0)
    torch.testing.assert_close(z, z_full, rtol=0, atol=1e-9)
    B, n = z0.shape[0], layer.stats.nstep
    assert len(set(n.tolist())) > 2
    # active sets only change at checks: each sample is evaluated up to the next multiple of 5
    rounded = (n + 4) // 5 * 5
    assert int(n.sum()) + B <= layer.rows_evaluated <= int(rounded.sum()) + B


def test_compact_multi_tensor_state():
    cell, x, _ = _spread_problem(B=5, d=4)
    two = lambda zs, xs: (cell(zs[0], xs), 0.5 * zs[1] + zs[0][:, :2])
    z0 = (torch.zeros(5, 4, dtype=F64), torch.zeros(5, 2, dtype=F64))
    outs = [deqfast.DEQ(two, compact=c, tol=1e-12, max_iter=300)(x, z0) for c in (False, True)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_compact_bad_input():
    cell = lambda z, x: 0.5 * z + x["a"]
    layer = deqfast.DEQ(cell, compact=True)
    with pytest.raises(TypeError, match="x must be a tensor with the batch"):
        layer({"a": torch.ones(2, 3)}, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="compact must be a bool"):
        deqfast.DEQ(cell, compact="yes")
    drop = nn.Sequential(deqfast.VariationalDropout(0.2))
    layer = deqfast.DEQ(lambda z, x: drop(z) * 0.5 + x, compact=True)
    layer.cell = drop  # a module cell with a dropout inside
    layer.train()
    with pytest.raises(ValueError, match="VariationalDropout"):
        layer(torch.ones(2, 3))
    # the same dropout behind a cell that is not a module: the same error (was the mask's shape error,
    # which told the user to call reset_dropout)
    torch.manual_seed(0)
    layer = deqfast.DEQ(lambda z, x: drop(z) * x[:, :1] + 1.0, compact=True, solver="fixed_point")
    x = torch.tensor([[0.1], [0.5], [0.9]]).expand(3, 4)  # contractions: samples finish at different steps
    with pytest.raises(ValueError, match="VariationalDropout in the cell keeps one mask per sample"):
        layer(x)


@pytest.mark.parametrize("keywords", [dict(per_sample=False), dict(cuda_graph=True)])
def test_compact_refuses_what_it_cannot_gather(keywords):
    """compact=True needs independent samples (per_sample=True) and shapes a CUDA graph can replay."""
    name = next(iter(keywords))
    with pytest.raises(ValueError, match=rf"deqfast.DEQ: compact=True .*{name}"):
        deqfast.DEQ(lambda z, x: 0.5 * z + x, compact=True, **keywords)


@pytest.mark.parametrize("backward_solver", ["fixed_point", "anderson", "broyden"])
@pytest.mark.parametrize("state", ["tensor", "tuple", "1-D"])
def test_compact_with_anderson_warm_start_keeps_the_forward_history_true(backward_solver, state):
    """Anderson records every sample's f-value at every step, frozen ones included. A compacting f
    that handed a finished sample its own z back wrote f(z*) = z* into that sample's history: the
    warm start's secant pairs were then off by the true residual at z* (the size of the last
    steps), and the preconditioned adjoint crawled or diverged (a fixed-point adjoint reached
    backward_max_iter with the gradient off by ~60%). The history, so the adjoint and the
    gradient, must be those of compact=False; the gradient is checked against the dense solve."""
    cell, x, z0 = _spread_problem(seed=1)
    c = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    if state == "tuple":
        inner = cell
        cell = lambda zs, xs: (inner(zs[0], xs), 0.5 * zs[1] + 0.1 * zs[0][:, :2])
        z0 = (z0, torch.zeros(z0.shape[0], 2, dtype=F64))
    elif state == "1-D":  # one number per sample, its own contraction riding in x[:, -1]
        cell = lambda z, xs: xs[:, -1] * torch.tanh(z + xs[:, 0]) + 0.1
        z0 = z0[:, 0]
        c = c[:, 0]
    kw = dict(solver="anderson", backward_warm_start=True, backward_solver=backward_solver, max_iter=100, tol=1e-6,
              backward_max_iter=60, backward_tol=1e-10)
    results = {}
    for compact in (False, True):
        layer = deqfast.DEQ(cell, compact=compact, **kw)
        out = layer(x, z0)
        out = out[0] if state == "tuple" else out
        (g,) = torch.autograd.grad((out * c).sum(), x)
        if compact:  # the compaction did act: finished samples sat out some evaluations
            assert layer.rows_evaluated < x.shape[0] * (int(layer.stats.nstep.max()) + 1)
        results[compact] = (g, layer.stats.backward)
    (g_full, back_full), (g_c, back_c) = results[False], results[True]
    assert bool(back_c.converged.all()), back_c.nstep.tolist()
    assert back_c.nstep.tolist() == back_full.nstep.tolist()
    torch.testing.assert_close(g_c, g_full, rtol=1e-8, atol=1e-9)
    if state == "tensor":  # float64 oracle: u = (I − Jᵀ)⁻¹ c at z*, the gradient uᵀ ∂f/∂x
        z_star = deqfast.DEQ(cell, max_iter=300, tol=1e-13)(x.detach(), z0)
        J = dense_jacobian(lambda z: cell(z, x.detach()), z_star)
        u = torch.linalg.solve((torch.eye(J.shape[1], dtype=F64) - J).transpose(1, 2), c.unsqueeze(2)).squeeze(2)
        xl = x.detach().requires_grad_()
        (expected,) = torch.autograd.grad((cell(z_star, xl) * u).sum(), xl)
        assert float((g_c - expected).norm() / expected.norm()) < 1e-6


@pytest.mark.parametrize("inner", ["DEQ", "fixed_point", "DEQ compact"])
@pytest.mark.parametrize("check_every", [1, 3])
def test_compact_with_a_solve_nested_in_the_cell(inner, check_every):
    """A cell that solves an equilibrium of its own (a DEQ in a DEQ's cell): the nested solve's host
    checks must not tell the outer one which samples are active. They did, through the same side
    channel: with check_every > 1 the outer f then read the inner solve's last (all-done) set,
    handed every sample its own z back, and the outer solve stopped after 2 steps, z off by ~0.2."""
    cell, x, z0 = _spread_problem(B=5, d=4, seed=2)
    inner_cell = lambda u, v: torch.tanh(0.5 * u + v)
    if inner == "fixed_point":
        solve = lambda v: deqfast.fixed_point(lambda u: inner_cell(u, v), torch.zeros_like(v), tol=1e-12, max_iter=200)[0]
    else:
        solve = deqfast.DEQ(inner_cell, compact=inner == "DEQ compact", tol=1e-12, max_iter=200)
    nested = lambda z, xs: cell(solve(z), xs)
    kw = dict(tol=1e-10, max_iter=200, check_every=check_every)
    with torch.no_grad():
        full = deqfast.DEQ(nested, **kw)
        z_full = full(x, z0)
        comp = deqfast.DEQ(nested, compact=True, **kw)
        z_c = comp(x, z0)
    torch.testing.assert_close(z_c, z_full, rtol=0, atol=1e-9)
    assert comp.stats.nstep.tolist() == full.stats.nstep.tolist()
    assert bool(comp.stats.converged.all())
    n = comp.stats.nstep
    rounded = (n + check_every - 1) // check_every * check_every
    assert int(n.sum()) + 5 <= comp.rows_evaluated <= int(rounded.sum()) + 5
