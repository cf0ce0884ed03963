"""Variational dropout: one mask per forward, shared by every f call, so the solve and the implicit
gradient are those of one fixed f (checked against the same cell with the mask as a constant)."""
import pytest
import torch
from torch import nn

import deqfast
from conftest import TanhCell

F64 = torch.float64
TIGHT = dict(max_iter=300, tol=1e-12, backward_max_iter=300, backward_tol=1e-12)


class DropCell(nn.Module):
    """f(z, x) = tanh(W drop(z) + U x + b): the dropout sits inside the map, on z."""

    def __init__(self, drop, seed=0):
        super().__init__()
        self.inner = TanhCell(d=8, d_in=4, contraction=0.6, seed=seed)
        self.drop = drop

    def forward(self, z, x):
        return self.inner(self.drop(z), x)


def _x(seed=1):
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(seed), dtype=F64).requires_grad_()


def test_one_mask_per_forward_gives_the_fixed_point_of_one_f():
    torch.manual_seed(0)
    cell = DropCell(deqfast.VariationalDropout(0.3))
    x, z0 = _x(), torch.zeros(5, 8, dtype=F64)
    layer = deqfast.DEQ(cell, **TIGHT)
    z = layer(x, z0)
    mask = cell.drop.mask
    assert mask is not None and mask.shape == (5, 8) and bool((mask == 0).any())
    assert bool(layer.stats.converged.all())
    grads = torch.autograd.grad(z.square().sum(), list(cell.parameters()) + [x])

    # The oracle: the same cell with that mask as a constant (no dropout module at all).
    fixed = lambda z: cell.inner(z * mask, x)
    z_ref, _ = deqfast.fixed_point(fixed, z0, **TIGHT)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
    g_ref = torch.autograd.grad(z_ref.square().sum(), list(cell.parameters()) + [x])
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ordinary_dropout_has_no_fixed_point():
    """Why the module exists: nn.Dropout draws a new mask per f call and the solve does not converge."""
    torch.manual_seed(0)
    layer = deqfast.DEQ(DropCell(nn.Dropout(0.3)), max_iter=100, tol=1e-8)
    with pytest.warns(UserWarning, match="draws a new mask at every call"):  # said once per layer
        layer(_x(), torch.zeros(5, 8, dtype=F64))
    assert not bool(layer.stats.converged.any())


def test_each_forward_draws_a_new_mask_and_eval_uses_none():
    torch.manual_seed(0)
    cell = DropCell(deqfast.VariationalDropout(0.5))
    layer = deqfast.DEQ(cell, tol=1e-10)
    x, z0 = _x(), torch.zeros(5, 8, dtype=F64)
    layer(x, z0)
    first = cell.drop.mask.clone()
    layer(x, z0)
    assert not torch.equal(first, cell.drop.mask)
    layer.eval()
    with torch.no_grad():
        z_eval = layer(x, z0)
        z_plain, _ = deqfast.fixed_point(lambda z: cell.inner(z, x), z0, tol=1e-10)
    torch.testing.assert_close(z_eval, z_plain, rtol=0, atol=0)


def test_shared_dims_and_reset_dropout():
    torch.manual_seed(0)
    drop = deqfast.VariationalDropout(0.5, shared_dims=(2, 3))  # channel dropout of (B, C, H, W)
    model = nn.Sequential(nn.Identity(), drop)
    x = torch.randn(2, 6, 4, 4)
    y = model(x)
    assert drop.mask.shape == (2, 6, 1, 1) and drop.mask.dtype == x.dtype
    torch.testing.assert_close(y, x * drop.mask)
    assert torch.equal(model(x), y)  # same mask until reset
    deqfast.reset_dropout(model)
    assert drop.mask is None
    drop(x)  # draws a (2, 6, 1, 1) mask
    with pytest.raises(ValueError, match=r"VariationalDropout: input of shape \(2, 6, 4\) does not match the mask drawn"):
        drop(x[:, :, :, 0])


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\), got 1.0"):
        deqfast.VariationalDropout(1.0)
    with pytest.raises(ValueError, match=r"shared_dims must be dims >= 1 \(dim 0 is the batch\), got \(0,\)"):
        deqfast.VariationalDropout(0.1, shared_dims=(0,))
    with pytest.raises(ValueError, match=r"shared_dims \(3,\) do not fit an input of 2 dims"):
        deqfast.VariationalDropout(0.1, shared_dims=(3,))(torch.randn(2, 3))


def test_a_cell_that_is_not_a_module_gets_new_masks_too():
    """The usual way to pass a cell with extra arguments or a method, DEQ(lambda z, x: self.block(z, x)):
    the layer cannot see the dropout modules inside, and the mask drawn at the first forward was
    kept for the whole training (silently: the same B every step). The layer now resets the masks
    its cell used in its last forward, so each training forward draws new ones, as with a module cell."""
    torch.manual_seed(0)
    cell = DropCell(deqfast.VariationalDropout(0.5))
    layer = deqfast.DEQ(lambda z, x: cell(z, x), tol=1e-10)
    x, z0 = _x(), torch.zeros(5, 8, dtype=F64)
    masks = []
    for _ in range(3):
        layer(x, z0)
        masks.append(cell.drop.mask.clone())
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    # one mask per forward all the same: the result is the fixed point of f with the last mask
    z = layer(x, z0)
    z_fixed, _ = deqfast.fixed_point(lambda z: cell(z, x), z0, tol=1e-10)  # mask kept (no reset here)
    torch.testing.assert_close(z, z_fixed, rtol=0, atol=1e-9)
    # the layer still copies and pickles (it keeps no reference to the modules in its state)
    import copy
    import pickle
    pickle.dumps(deqfast.DEQ(cell))
    copy.deepcopy(layer)
    cell.eval()  # in eval mode (the model around both set so) the dropout draws none
    cell.drop.reset()
    layer(x, z0)
    assert cell.drop.mask is None
