"""The same solvers and gradients on a CUDA device (skipped, and shown as skipped, without one)."""
import warnings

import pytest
import torch

import deqfast
from conftest import TanhCell, solver_fn

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = [pytest.mark.cuda, needs_cuda]


def _problem(device, dtype=torch.float64):
    cell = TanhCell(d=32, contraction=0.9, seed=0, dtype=dtype).to(device)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    return cell, x


@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_cuda_solve_matches_cpu(solver):
    cell, x = _problem("cpu")
    z_cpu, s_cpu = solver_fn(solver)(lambda z: cell(z, x), torch.zeros_like(x), tol=1e-10, max_iter=200)
    cell_g, x_g = _problem("cuda")
    z_gpu, s_gpu = solver_fn(solver)(lambda z: cell_g(z, x_g), torch.zeros_like(x_g), tol=1e-10, max_iter=200)
    torch.testing.assert_close(z_gpu.cpu(), z_cpu, rtol=0, atol=1e-9)
    assert s_gpu.converged.all() and s_gpu.nstep.device.type == "cuda"


def test_cuda_implicit_gradient_matches_cpu():
    grads = []
    for device in ("cpu", "cuda"):
        cell, x = _problem(device)
        x.requires_grad_()
        z = deqfast.DEQ(cell, tol=1e-12, backward_tol=1e-12, max_iter=200, backward_max_iter=200)(x)
        grads.append([g.cpu() for g in torch.autograd.grad(z.square().sum(), list(cell.parameters()) + [x])])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_cuda_anderson_syncs_only_at_checks():
    """No host synchronisation between convergence checks: 20 steps, checks every 4 -> 4 syncs, +1 at the end."""
    cell, x = _problem("cuda", torch.float32)
    f = lambda z: cell(z, x)
    with torch.no_grad():
        deqfast.solvers.anderson(f, torch.zeros_like(x), tol=0.0, max_iter=20, check_every=4)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                deqfast.solvers.anderson(f, torch.zeros_like(x), tol=0.0, max_iter=20, check_every=4)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 5, [str(w.message) for w in syncs]


def test_cuda_autocast_float16_implicit_gradient_matches_float64():
    """Under CUDA autocast f runs in float16, the solver state stays float32 on the fused ops."""
    grads = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        # Built in float64, then cast: randn draws other numbers in float32.
        cell = TanhCell(d=32, contraction=0.9, seed=0).to(device=device, dtype=dtype)
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        x = x.to(device=device, dtype=dtype).requires_grad_()
        layer = deqfast.DEQ(cell, tol=1e-3, backward_tol=1e-3, max_iter=100, backward_max_iter=100)
        with torch.autocast("cuda", dtype=torch.float16, enabled=device == "cuda"):
            z = layer(x)
        assert z.dtype == dtype and bool(layer.stats.converged.all())
        grads.append([g.cpu().double() for g in torch.autograd.grad(z.square().sum(), list(cell.parameters()) + [x])])
    for a, b in zip(*grads):
        assert float((a - b).norm() / b.norm()) < 2e-2  # 8e-4 measured with CPU float16 autocast


def test_cuda_variational_dropout_mask_lives_on_the_input_device():
    drop = deqfast.VariationalDropout(0.5)
    x = torch.randn(4, 8, device="cuda", dtype=torch.float16)
    y = drop(x)
    assert drop.mask.device == x.device and drop.mask.dtype == x.dtype
    torch.testing.assert_close(y, x * drop.mask)


def test_cuda_kernels_run_on_this_device():
    from deqfast import _extension

    assert deqfast.extension_info()["cuda"], deqfast.extension_info()
    assert _extension.fused_available(torch.device("cuda")), deqfast.extension_info()
    assert deqfast.extension_info()["cuda_devices"] == {}


@pytest.mark.parametrize("m,check_every", [(5, 4), (3, 3)])
def test_cuda_graph_solve_equals_the_eager_solve_bitwise(m, check_every):
    cell, x = _problem("cuda", torch.float32)
    f = lambda z: cell(z, x)
    z_e, s_e = deqfast.fixed_point(f, torch.zeros_like(x), m=m, check_every=check_every, max_iter=60, tol=1e-6)
    z_g, s_g = deqfast.fixed_point(f, torch.zeros_like(x), m=m, check_every=check_every, max_iter=60, tol=1e-6,
                                   cuda_graph=True)
    assert torch.equal(z_g, z_e)
    for name in ("nstep", "residual", "rel_residual", "converged", "failed"):
        assert torch.equal(getattr(s_g, name), getattr(s_e, name)), name


def test_cuda_graph_with_a_host_sync_in_f_names_the_fallback():
    cell, x = _problem("cuda", torch.float32)

    def f(z):
        if float(z.abs().max()) > 1e9:  # a host synchronisation: not capturable
            raise AssertionError
        return cell(z, x)

    with pytest.raises(RuntimeError, match="cuda_graph=False"):
        deqfast.fixed_point(f, torch.zeros_like(x), max_iter=40, tol=0.0, check_every=4, cuda_graph=True)


def test_cuda_graph_deq_replays_its_kept_graphs_bitwise():
    """DEQ(cuda_graph=True) captures at its first call and replays at the next ones (new x and z0):
    the eager layer's bits and gradients; a replaced parameter is a new key (captured anew)."""
    cell, x = _problem("cuda", torch.float32)
    options = dict(max_iter=40, tol=0.0, check_every=4)
    graphed, eager = deqfast.DEQ(cell, cuda_graph=True, **options), deqfast.DEQ(cell, **options)
    g = torch.Generator().manual_seed(2)
    captures = []
    for call in range(4):
        if call == 3:
            cell.b = torch.nn.Parameter(cell.b.detach() + 0.05)
        x = torch.randn(8, 32, generator=g).cuda().requires_grad_()
        z0 = torch.randn(8, 32, generator=g).cuda()
        z_g, z_e = graphed(x, z0), eager(x, z0)
        assert torch.equal(z_g, z_e) and torch.equal(graphed.stats.residual, eager.stats.residual)
        for a, b in zip(*[torch.autograd.grad(z.sin().sum(), [x] + list(cell.parameters())) for z in (z_g, z_e)]):
            assert torch.equal(a, b)
        captures.append(graphed.graph_captures)
    assert 0 < captures[0] == captures[1] == captures[2] < captures[3]


def test_cuda_graph_deq_under_autocast_replays_bitwise():
    """Under float16 autocast the kept graphs must not read autocast's cached weight casts, which
    are freed when each call's autocast region ends."""
    cell, x = _problem("cuda", torch.float32)
    options = dict(max_iter=40, tol=0.0, check_every=4)
    graphed, eager = deqfast.DEQ(cell, cuda_graph=True, **options), deqfast.DEQ(cell, **options)
    g = torch.Generator().manual_seed(3)
    for call in range(3):
        x = torch.randn(8, 32, generator=g).cuda()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            z_g, z_e = graphed(x), eager(x)
        poison = [torch.full((32, 32), float("nan"), device="cuda", dtype=torch.float16) for _ in range(64)]
        del poison  # freed blocks of a cast weight's size hold NaN now
        assert torch.equal(z_g, z_e)
    assert graphed.graph_captures > 0
