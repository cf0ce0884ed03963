"""Jacobian regularisation against dense float64 Jacobians, gradcheck, and torchdeq's jac_reg/power_method."""
import pytest
import torch

import deqfast
from deqfast import compat
from conftest import ConvCell, TanhCell, dense_jacobian

F64 = torch.float64


def _problem(kind, B=3, seed=0):
    g = torch.Generator().manual_seed(seed + 50)
    if kind == "tanh":
        cell = TanhCell(d=7, d_in=5, contraction=0.9, seed=seed)
        x = torch.randn(B, 5, generator=g, dtype=F64)
        z = torch.randn(B, 7, generator=g, dtype=F64)
    else:
        cell = ConvCell(channels=2, seed=seed)
        x = torch.randn(B, 2, 4, 4, generator=g, dtype=F64)
        z = torch.randn(B, 2, 4, 4, generator=g, dtype=F64)
    return cell, x, z


@pytest.mark.parametrize("kind", ["tanh", "conv"])
@pytest.mark.parametrize("vecs", [1, 3])
def test_penalty_equals_dense_jacobian_with_the_same_probes(kind, vecs):
    cell, x, z = _problem(kind)
    f = lambda z: cell(z, x)
    penalty = deqfast.jacobian_penalty(f, z, vecs=vecs, generator=torch.Generator().manual_seed(9))

    J = dense_jacobian(f, z)  # (B, d, d)
    probes = torch.Generator().manual_seed(9)
    B, d = J.shape[0], J.shape[1]
    expected = torch.zeros(B, dtype=F64)
    for _ in range(vecs):
        v = torch.randn(z.shape, generator=probes, dtype=F64).reshape(B, d, 1)
        expected += (J.transpose(1, 2) @ v).square().sum(dim=(1, 2))  # ‖vᵀJ‖² per sample
    torch.testing.assert_close(penalty.detach(), expected / (vecs * d), rtol=1e-12, atol=0)
    assert penalty.shape == (B,) and penalty.requires_grad


def test_penalty_is_unbiased_for_the_frobenius_norm():
    """E‖vᵀJ‖² = ‖J‖_F²: 4000 probes land within 6% (the estimate's relative std is ~2% here)."""
    cell, x, z = _problem("tanh", seed=1)
    f = lambda z: cell(z, x)
    with torch.no_grad():
        penalty = deqfast.jacobian_penalty(f, z, vecs=4000, generator=torch.Generator().manual_seed(3))
    J = dense_jacobian(f, z)
    exact = J.square().sum(dim=(1, 2)) / J.shape[1]
    torch.testing.assert_close(penalty, exact, rtol=0.06, atol=0)


def test_penalty_gradient_passes_gradcheck():
    """The penalty is differentiable in f's parameters and inputs (a second derivative of f)."""
    cell, x, z = _problem("tanh", seed=2, B=2)
    W, U = cell.W.detach().clone().requires_grad_(), cell.U.detach().clone()
    x = x.requires_grad_()

    def penalty(W, x):
        f = lambda z: torch.tanh(z @ W.T + x @ U.T)
        return deqfast.jacobian_penalty(f, z, vecs=2, generator=torch.Generator().manual_seed(4))

    assert torch.autograd.gradcheck(penalty, (W, x), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_penalty_under_no_grad_is_a_measurement():
    cell, x, z = _problem("tanh", seed=3)
    f = lambda z: cell(z, x)
    with torch.no_grad():
        measured = deqfast.jacobian_penalty(f, z, generator=torch.Generator().manual_seed(5))
    trained = deqfast.jacobian_penalty(f, z, generator=torch.Generator().manual_seed(5))
    assert not measured.requires_grad and trained.requires_grad
    torch.testing.assert_close(measured, trained.detach(), rtol=0, atol=0)


def test_penalty_on_the_output_of_a_deq_layer_trains():
    """The use it is for: a penalty at the layer's output, added to the loss, reaches the cell's weights."""
    cell, x, _ = _problem("tanh", seed=4)
    z0 = torch.zeros(x.shape[0], 7, dtype=F64)
    layer = deqfast.DEQ(cell)
    z = layer(x, z0)
    penalty = deqfast.jacobian_penalty(lambda z: cell(z, x), z).mean()
    (grad_W,) = torch.autograd.grad(z.square().sum() + penalty, cell.W)
    (grad_W_plain,) = torch.autograd.grad(layer(x, z0).square().sum(), cell.W)
    assert float((grad_W - grad_W_plain).norm()) > 1e-3 * float(grad_W_plain.norm())


def test_penalty_bad_input_names_the_argument():
    f = lambda z: 0.5 * z
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"deqfast.jacobian_penalty: vecs must be >= 1, got 0"):
        deqfast.jacobian_penalty(f, z, vecs=0)
    with pytest.raises(TypeError, match=r"deqfast.jacobian_penalty: z must be floating point, got torch.int64"):
        deqfast.jacobian_penalty(f, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"f\(z\) must return shape \(2, 3\) \(the shape of z\), got \(2, 2\)"):
        deqfast.jacobian_penalty(lambda z: z[:, :2], z)
    with pytest.raises(TypeError, match=r"f must be callable"):
        deqfast.jacobian_penalty(None, z)


def test_compat_jac_reg_and_power_method_equal_torchdeq():
    torchdeq_loss = pytest.importorskip("torchdeq.loss")
    cell, x, z = _problem("conv", seed=6)
    z_leaf = z.clone().requires_grad_()
    f0 = cell(z_leaf, x)
    for vecs in (1, 3):
        torch.manual_seed(7)
        ours = compat.jac_reg(f0, z_leaf, vecs=vecs)
        torch.manual_seed(7)
        theirs = torchdeq_loss.jac_reg(f0, z_leaf, vecs=vecs)
        torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-12, atol=0)
        assert ours.requires_grad
    # Like torchdeq's, the power method frees f0's graph at its last iteration: a fresh f0 each.
    torch.manual_seed(8)
    v_ours, radius_ours = compat.power_method(cell(z_leaf, x), z_leaf, n_iters=30)
    torch.manual_seed(8)
    v_theirs, radius_theirs = torchdeq_loss.power_method(cell(z_leaf, x), z_leaf, n_iters=30)
    torch.testing.assert_close(radius_ours, radius_theirs, rtol=1e-12, atol=0)
    torch.testing.assert_close(v_ours, v_theirs, rtol=1e-12, atol=1e-14)


def test_power_method_finds_the_largest_eigenvalue():
    """Against the dense Jacobian's eigenvalues (a linear f, whose J is the matrix itself)."""
    g = torch.Generator().manual_seed(11)
    A = torch.randn(3, 6, 6, generator=g, dtype=F64)
    A = A @ A.transpose(1, 2)  # symmetric positive definite: a dominant positive eigenvalue
    z = torch.randn(3, 6, generator=g, dtype=F64).requires_grad_()
    f0 = (A @ z.unsqueeze(2)).squeeze(2)
    torch.manual_seed(0)
    _, radius = compat.power_method(f0, z, n_iters=500)
    torch.testing.assert_close(radius, torch.linalg.eigvalsh(A).abs().max(dim=1).values, rtol=1e-6, atol=0)


def test_penalty_of_an_empty_batch_is_empty():
    cell, x, z = _problem("tanh")
    z_empty = torch.zeros(0, 7, dtype=F64, requires_grad=True)
    penalty = deqfast.jacobian_penalty(lambda z: cell(z, x[:0]), z_empty)
    assert penalty.shape == (0,) and penalty.dtype == F64


def test_penalty_under_inference_mode_and_of_an_inference_tensor():
    """Logging the penalty in an evaluation loop run under torch.inference_mode, or of a z made
    there: the same measurement as under no_grad (was: autograd's 'does not require grad' or
    'requires_grad on an inference tensor' errors)."""
    cell, x, z = _problem("tanh", seed=2)
    f = lambda z: cell(z, x)
    with torch.no_grad():
        expected = deqfast.jacobian_penalty(f, z, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        measured = deqfast.jacobian_penalty(f, z, generator=torch.Generator().manual_seed(1))
        z_inference = z.clone()
    assert not measured.requires_grad
    torch.testing.assert_close(measured, expected, rtol=0, atol=0)
    trained = deqfast.jacobian_penalty(f, z_inference, generator=torch.Generator().manual_seed(1))
    assert trained.requires_grad
    torch.testing.assert_close(trained.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("f", [lambda z: torch.ones_like(z), lambda z: 2.0 * z.detach(),
                               lambda z: torch.tanh(z.data) + _W.sum()],
                         ids=["constant", "detach", "data-with-parameter"])
def test_penalty_of_an_f_not_depending_on_z_is_named(f):
    with pytest.raises(RuntimeError, match=r"deqfast.jacobian_penalty: f\(z\) does not depend on z"):
        deqfast.jacobian_penalty(f, torch.randn(2, 3))


_W = torch.randn(3, requires_grad=True)
