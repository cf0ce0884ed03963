"""A state of several tensors (z0 a list/tuple) against the same problem packed by hand into one tensor.

The packed problem is the one every other test checks against dense-Jacobian oracles; here the
parts must give the same fixed point, stats and gradients (to rounding), in every backward mode.
"""
import pytest
import torch

import deqfast

F64 = torch.float64
B = 3
SHAPES = [(B, 2, 3, 3), (B, 5)]  # e.g. a feature map and a vector state
D = 2 * 3 * 3 + 5


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(D, D, generator=g, dtype=F64)
    M = (0.8 * M / torch.linalg.matrix_norm(M, 2)).requires_grad_()
    c = torch.randn(B, D, generator=g, dtype=F64).requires_grad_()
    z0 = torch.randn(B, D, generator=g, dtype=F64)
    return M, c, z0


def _split(z):
    return (z[:, :18].reshape(SHAPES[0]), z[:, 18:])


def _f_flat(M, c):
    return lambda z: torch.tanh(z @ M.T + c)


def _f_parts(M, c):
    def f(parts):
        z = torch.cat([p.reshape(B, -1) for p in parts], dim=1)
        return _split(torch.tanh(z @ M.T + c))
    return f


KW = dict(max_iter=200, tol=1e-12, backward_max_iter=200, backward_tol=1e-12)


@pytest.mark.parametrize("backward", ["implicit", "neumann", "jfb", "phantom", "bptt"])
@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_parts_equal_the_packed_problem(solver, backward):
    M, c, z0 = _problem()
    w = torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    z_flat, s_flat = deqfast.fixed_point(_f_flat(M, c), z0, solver=solver, backward=backward, **KW)
    g_flat = torch.autograd.grad((z_flat * w).sum(), (M, c))

    z_parts, s_parts = deqfast.fixed_point(_f_parts(M, c), _split(z0), solver=solver, backward=backward, **KW)
    assert isinstance(z_parts, tuple) and [p.shape for p in z_parts] == [torch.Size(s) for s in SHAPES]
    packed = torch.cat([p.reshape(B, -1) for p in z_parts], dim=1)
    g_parts = torch.autograd.grad((packed * w).sum(), (M, c))

    torch.testing.assert_close(packed, z_flat, rtol=0, atol=1e-12)
    assert torch.equal(s_parts.nstep, s_flat.nstep) and torch.equal(s_parts.converged, s_flat.converged)
    for a, b in zip(g_parts, g_flat):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_layer_with_a_list_state_returns_a_list():
    M, c, z0 = _problem(seed=2)
    cell = lambda parts, x: list(_f_parts(M, x)(parts))
    z = deqfast.DEQ(cell, tol=1e-10)(c, z0=list(_split(z0)))
    assert isinstance(z, list) and len(z) == 2
    z.__getitem__(1).sum().backward()
    assert M.grad is not None and c.grad is not None


def test_parts_bad_input_names_the_part():
    M, c, z0 = _problem(seed=3)
    f = _f_parts(M, c)
    a, b = _split(z0)
    with pytest.raises(ValueError, match=r"deqfast.fixed_point: z0\[1\] must have the batch size of z0\[0\], 3, got 2"):
        deqfast.fixed_point(f, (a, b[:2]))
    with pytest.raises(ValueError, match=r"z0\[1\] must have the dtype of z0\[0\], torch.float64, got torch.float32"):
        deqfast.fixed_point(f, (a, b.float()))
    with pytest.raises(TypeError, match=r"z0\[0\] must be floating point, got torch.int64"):
        deqfast.fixed_point(f, (a.long(), b))
    with pytest.raises(ValueError, match=r"z0 must be a tensor or a non-empty list/tuple of tensors, got an empty tuple"):
        deqfast.fixed_point(f, ())
    with pytest.raises(TypeError, match=r"f\(z\) must return a list/tuple of 2 tensors like z0, got Tensor"):
        deqfast.fixed_point(lambda parts: parts[1], (a, b))
    with pytest.raises(ValueError, match=r"f\(z\)\[1\] must return shape \(3, 5\) \(the shape of z0\[1\]\), got \(3, 4\)"):
        deqfast.fixed_point(lambda parts: (parts[0], parts[1][:, :4]), (a, b))


@pytest.mark.parametrize("backward", ["implicit", "neumann", "jfb", "phantom", "bptt"])
def test_empty_batch_of_a_multi_tensor_state(backward):
    """B = 0 with a list state: empty parts, empty stats, an empty gradient (as torch layers do)."""
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    z0 = [torch.zeros(0, 3, 2, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)]
    (a, c), stats = deqfast.fixed_point(lambda z: [torch.tanh(w * z[0]), w * z[1] + 1], z0, backward=backward)
    assert a.shape == (0, 3, 2) and c.shape == (0, 4)
    assert stats.nstep.shape == (0,) and stats.converged.shape == (0,)
    (a.sum() + c.sum()).backward()
    assert w.grad is None or float(w.grad) == 0.0
