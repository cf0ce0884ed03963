"""Every memory layout torch allows works on every solver, backward mode and path, with the result
(and gradients) of the reference on a contiguous copy.

The matrix: solver x backward mode x path (fused ops, reference) x layout of z0 (transposed,
sliced, expanded with stride 0, channels_last, permuted, made under torch.inference_mode). The
cell is elementwise plus a per-sample mean, so f's output keeps z's layout (a non-contiguous f(z)),
and the loss weight has the layout too, so the gradient arriving at z* is non-contiguous (stride 0
for "expanded"). The oracle is the reference path (``ops.use_fused`` False) on ``z0.contiguous()``:
the same algorithm on the same numbers, so values agree to float64 rounding.
"""
import functools

import pytest
import torch

import deqfast
from deqfast import ops

B, D = 3, 4
C, H, W = 2, 3, 2


def _layout(kind: str, seed: int) -> torch.Tensor:
    """A float64 tensor of the layout ``kind`` (values from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "contiguous":
        return r(B, D)
    if kind == "transposed":
        return r(D, B).t()
    if kind == "sliced":
        return r(B, 2 * D + 1)[:, 1::2]
    if kind == "expanded":
        return r(1, D).expand(B, D)
    if kind == "channels_last":
        return r(B, C, H, W).contiguous(memory_format=torch.channels_last)
    if kind == "permuted":
        return r(H, B, C).permute(1, 2, 0)  # (B, C, H)
    if kind == "inference":
        with torch.inference_mode():
            return r(B, D)
    raise AssertionError(kind)


LAYOUTS = ["transposed", "sliced", "expanded", "channels_last", "permuted", "inference"]
SOLVERS = ["anderson", "fixed_point", "broyden"]
BACKWARDS = ["implicit", "neumann", "jfb", "phantom", "bptt"]


def test_the_layouts_are_what_they_say():
    for kind in LAYOUTS:
        t = _layout(kind, 0)
        assert t.is_inference() if kind == "inference" else not t.is_contiguous(), kind
    assert 0 in _layout("expanded", 0).stride()


def _cell(z0_shape, seed=1):
    """f(z) = tanh(0.5 s z + 0.2 mean(z per sample) + x), a contraction; s a scalar parameter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(z0_shape, generator=g, dtype=torch.float64).requires_grad_()
    s = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)

    def f(z):
        mean = z.flatten(1).mean(1).view((-1,) + (1,) * (z.dim() - 1))
        return torch.tanh(0.5 * s * z + 0.2 * mean + x)

    return f, x, s


def _run(z0, solver, backward, weight, **extra):
    f, x, s = _cell(z0.shape)
    kw = dict(solver=solver, backward=backward, max_iter=40, tol=1e-12, backward_tol=1e-12,
              backward_max_iter=60, **extra)
    z, stats = deqfast.fixed_point(f, z0, **kw)
    loss = (z * weight).sum()
    gx, gs = torch.autograd.grad(loss, [x, s])
    return z.detach(), stats, gx, gs


@functools.lru_cache(maxsize=None)
def _oracle(layout, solver, backward):
    """The reference path on contiguous copies of the layout's z0 and loss weight (shared by both paths)."""
    z0 = _layout(layout, 0).clone(memory_format=torch.contiguous_format)
    weight = _layout("transposed" if layout == "inference" else layout, 2).contiguous()
    real = ops.use_fused
    ops.use_fused = lambda *a, **k: False
    try:
        return _run(z0, solver, backward, weight)
    finally:
        ops.use_fused = real


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matrix(layout, solver, backward, path, monkeypatch):
    if path == "fused" and not deqfast.extension_info()["compiled"]:
        pytest.skip("deqfast._C is not compiled")
    z0 = _layout(layout, 0)
    z0_before = z0.clone()
    # The gradient arriving at z* has z0's layout (an inference tensor cannot enter autograd).
    weight = _layout("transposed" if layout == "inference" else layout, 2)
    if path == "reference":
        monkeypatch.setattr(ops, "use_fused", lambda *a, **k: False)
    z, stats, gx, gs = _run(z0, solver, backward, weight)
    assert torch.equal(z0, z0_before), "z0 was written into"

    z_ref, stats_ref, gx_ref, gs_ref = _oracle(layout, solver, backward)
    assert z.shape == z0.shape
    assert torch.equal(stats.nstep, stats_ref.nstep)
    assert torch.equal(stats.converged, stats_ref.converged)
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z, z_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gs, gs_ref, **tol)
    if backward in ("implicit", "neumann"):
        assert torch.equal(stats.backward.nstep, stats_ref.backward.nstep)


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("solver", ["anderson", "fixed_point_iteration", "broyden"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_solvers_take_every_layout(layout, solver, path, monkeypatch):
    """deqfast.solvers.* directly (the issue's repro: anderson on torch.zeros(6, 4).t())."""
    if path == "fused" and not deqfast.extension_info()["compiled"]:
        pytest.skip("deqfast._C is not compiled")
    if path == "reference":
        monkeypatch.setattr(ops, "use_fused", lambda *a, **k: False)
    fn = getattr(deqfast.solvers, solver)
    z0 = _layout(layout, 3)
    z0_before = z0.clone()
    z, stats = fn(lambda z: 0.5 * z + 1.0, z0, max_iter=60, tol=1e-12)
    assert torch.equal(z0, z0_before)
    assert stats.converged.all()
    torch.testing.assert_close(z, torch.full(z0.shape, 2.0, dtype=z0.dtype), rtol=0, atol=1e-10)


def test_deq_on_a_transposed_input():
    lin = torch.nn.Linear(D, D, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    layer = deqfast.DEQ(lambda z, x: torch.tanh(lin(z) + x), solver="anderson", tol=1e-12, max_iter=60)
    x = _layout("transposed", 4).requires_grad_()
    z = layer(x)
    gx, = torch.autograd.grad((z * _layout("transposed", 5)).sum(), [x])
    x_c = x.detach().contiguous().requires_grad_()
    z_c = layer(x_c)
    gx_c, = torch.autograd.grad((z_c * _layout("transposed", 5)).sum(), [x_c])
    torch.testing.assert_close(z, z_c, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, gx_c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_implicit_adjoint_solver_with_a_non_contiguous_gradient(solver):
    """The adjoint solve starts from zeros_like(g): a transposed g must work with each backward_solver,
    and give the dense-oracle gradient (I - J)^-T applied to g, J = 0.5 I: b.grad = 2 g."""
    b = torch.ones(4, 6, dtype=torch.float64, requires_grad=True)
    z, _ = deqfast.fixed_point(lambda z: 0.5 * z + b, torch.zeros(4, 6, dtype=torch.float64),
                               backward_solver=solver, backward_tol=1e-12, tol=1e-12)
    weight = torch.randn(6, 4, dtype=torch.float64)
    (z.t() * weight).sum().backward()
    torch.testing.assert_close(b.grad, 2 * weight.t(), rtol=1e-9, atol=1e-10)
