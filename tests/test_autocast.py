"""Mixed precision: a DEQ under torch.autocast.

f's matmuls then run in the autocast dtype and f returns it; the solver state stays in z0's dtype
(f's output is cast to it), so every backward mode trains. The oracle is the float64 solve of the
same cell without autocast; the tolerances are those of the autocast dtype, and the implicit
gradient is checked to be far closer to the oracle than the Jacobian-free one (which differs from
it by O(1) here), so a backward that skipped the adjoint would fail.
"""
import pytest
import torch
import torch.nn.functional as F

import deqfast
from deqfast.compat import get_deq

B, D, D_IN = 4, 12, 6


class LinearTanhCell(torch.nn.Module):
    """f(z, x) = tanh(W z + U x + b) through F.linear, so that autocast runs both matmuls in low precision."""

    def __init__(self, contraction=0.7, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.W = torch.nn.Parameter(contraction * W / torch.linalg.matrix_norm(W, 2))
        self.U = torch.nn.Parameter(torch.randn(D, D_IN, generator=g, dtype=torch.float64) / D_IN ** 0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, z, x):
        return torch.tanh(F.linear(z, self.W) + F.linear(x, self.U, self.b))


def _cpu_autocast_dtypes():
    dtypes = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            F.linear(torch.ones(1, 2), torch.ones(2, 2))
        dtypes.append(torch.float16)
    except (RuntimeError, ValueError):  # older torch: CPU autocast is bfloat16 only
        pass
    return dtypes


def _setup(dtype, seed=0):
    cell = LinearTanhCell(seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, D_IN, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    c = torch.randn(B, D, generator=g, dtype=torch.float64)
    return cell, x, c


def _grads(out, cell, x, c):
    return torch.autograd.grad((out.double() * c).sum(), list(cell.parameters()) + [x])


def _rel_err(actual, expected):
    num = sum(float((a.detach().double() - e).norm() ** 2) for a, e in zip(actual, expected)) ** 0.5
    den = sum(float(e.detach().norm() ** 2) for e in expected) ** 0.5
    return num / den


def _oracle(backward, **kw):
    """The same layer in float64, no autocast, solved tightly."""
    cell, x, c = _setup(torch.float64)
    out = deqfast.DEQ(cell, backward=backward, max_iter=300, tol=1e-12, backward_max_iter=300,
                      backward_tol=1e-12, **kw)(x, torch.zeros(B, D, dtype=torch.float64))
    return out.detach(), _grads(out, cell, x, c)


# Tolerances a low-precision f can meet: bfloat16 rounds at 4e-3, so a residual of 1e-3 is out of reach.
AMP = dict(max_iter=60, tol=1e-2, backward_max_iter=60, backward_tol=1e-2)


@pytest.mark.parametrize("amp_dtype", _cpu_autocast_dtypes(), ids=str)
@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_implicit_gradient_under_autocast_matches_float64_oracle(solver, amp_dtype):
    cell, x, c = _setup(torch.float32)
    layer = deqfast.DEQ(cell, solver=solver, backward="implicit", **AMP)
    with torch.autocast("cpu", dtype=amp_dtype):
        out = layer(x, torch.zeros(B, D))
        assert F.linear(x, cell.U).dtype == amp_dtype  # autocast is really on for f
    assert out.dtype == torch.float32  # the dtype of z0 = zeros_like(x)
    grads = _grads(out, cell, x, c)
    assert bool(layer.stats.converged.all()) and bool(layer.stats.backward.converged.all())

    z_ref, g_ref = _oracle("implicit")
    _, g_jfb = _oracle("jfb")
    assert _rel_err([out], [z_ref]) < 2e-2
    err, err_jfb = _rel_err(grads, g_ref), _rel_err(g_jfb, g_ref)
    assert err < 2e-2, f"autocast implicit gradient: relative error {err:.2e}"
    assert err_jfb > 10 * err, f"the oracle does not tell the adjoint from JFB ({err_jfb:.2e} vs {err:.2e})"


@pytest.mark.parametrize("backward", ["neumann", "jfb", "phantom", "bptt"])
def test_every_backward_mode_trains_under_autocast(backward):
    cell, x, c = _setup(torch.float32, seed=3)
    layer = deqfast.DEQ(cell, backward=backward, **AMP)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, torch.zeros(B, D))
    assert out.dtype == torch.float32
    grads = _grads(out, cell, x, c)
    assert all(bool(torch.isfinite(g).all()) for g in grads)

    cell64, x64, c64 = _setup(torch.float64, seed=3)
    out64 = deqfast.DEQ(cell64, backward=backward, **AMP)(x64, torch.zeros(B, D, dtype=torch.float64))
    err = _rel_err(grads, _grads(out64, cell64, x64, c64))
    assert err < 3e-2, f"{backward} under autocast: relative error {err:.2e} against float64"


def test_solvers_alone_under_autocast_keep_z0_dtype():
    cell, x, _ = _setup(torch.float32, seed=5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for solver in (deqfast.solvers.anderson, deqfast.solvers.fixed_point_iteration, deqfast.solvers.broyden):
            z, stats = solver(lambda z: cell(z, x), torch.zeros(B, D), tol=1e-2, max_iter=60)
            assert z.dtype == torch.float32 and bool(stats.converged.all())


def test_compat_under_autocast_trains():
    """torchdeq 0.1.0's own backward fails under CPU autocast (a bf16/float32 matmul); the drop-in trains."""
    cell, x, c = _setup(torch.float32, seed=7)
    deq = get_deq(f_solver="anderson", f_max_iter=60, f_tol=1e-2, b_max_iter=60, b_tol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_list, info = deq(lambda z: cell(z, x), torch.zeros(B, D))
    grads = _grads(z_list[-1], cell, x, c)
    assert z_list[-1].dtype == torch.float32
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_autocast_does_not_excuse_a_non_floating_output():
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match=r"f\(z\).*dtype.*float32.*int64"):
        deqfast.fixed_point(lambda z: torch.zeros(z.shape, dtype=torch.int64), torch.zeros(B, D))


def test_other_dtype_outside_autocast_is_still_an_error():
    with pytest.raises(TypeError, match=r"f\(z\).*dtype.*float32.*bfloat16"):
        deqfast.fixed_point(lambda z: z.bfloat16(), torch.zeros(B, D))
