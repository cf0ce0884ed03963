"""Small programs researchers write with deqfast's native API (deqfast.DEQ, deqfast.fixed_point),
each checked against an independent float64 oracle: plain fixed-point iteration to convergence,
and the implicit gradient from a dense Jacobian solve over the whole state (rows coupled or not).

Each test names the class of program it stands for; those marked "fails without the fix" found a
bug (a silent wrong answer or a crash) that deqfast now handles.
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import deqfast


# --- oracles -----------------------------------------------------------------------------------

def fixed_point_oracle(f, z0, tol=1e-13, max_iter=5000):
    """z* = f(z*) by plain iteration in float64 (no grad), to ‖f(z) − z‖ <= tol (1 + ‖f(z)‖)."""
    z = z0.detach().double()
    with torch.no_grad():
        for _ in range(max_iter):
            fz = f(z)
            if (fz - z).norm() <= tol * (1 + fz.norm()):
                return fz
            z = fz
    raise AssertionError("the oracle's fixed-point iteration did not converge")


def implicit_gradients(f, z_star, loss, inputs, vectorize=True):
    """d loss(z*) / d inputs with z* = f(z*): u = (I − J)⁻ᵀ ∂loss/∂z (J dense, over the whole
    state), then uᵀ ∂f/∂inputs at z*."""
    z = z_star.detach()
    n = z.numel()
    J = torch.autograd.functional.jacobian(lambda v: f(v).reshape(-1), z, vectorize=vectorize).reshape(n, n)
    zz = z.clone().requires_grad_()
    g = torch.autograd.grad(loss(zz), zz)[0].reshape(-1)
    u = torch.linalg.solve((torch.eye(n, dtype=J.dtype) - J).T, g)
    out = torch.autograd.grad(f(z), inputs, u.reshape(z.shape), allow_unused=True)
    return [torch.zeros_like(p) if o is None else o for o, p in zip(out, inputs)]


def weighted_loss(z):
    """A loss whose gradient differs for every element (a plain sum would hide permutations)."""
    return (z * torch.linspace(-1, 1, z.numel(), dtype=z.dtype).reshape(z.shape)).sum()


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# --- Anderson under bptt: a residual that is exactly 0 ------------------------------------------

def test_anderson_bptt_gradient_is_finite_when_a_residual_reaches_exactly_zero():
    """A state of one element per sample (z0 of shape (B,), or (B, 1)) in float32: Anderson lands
    some samples on their fixed point exactly (a residual of 0.0), and its mixing weights for
    them are unusable (the Jacobi scaling of a zero Gram diagonal overflows the weights' sum to
    inf). The solver falls back to a plain step there, but the masked division's derivative,
    0 · inf, was NaN, and backward="bptt" gave NaN gradients to x and a for every such sample
    (fails without the fix). The oracle: z = a cos z + x has dz/dx = 1 / (1 + a sin z)."""
    x = torch.tensor([1.5409961, -0.2934289, -2.1787894, 0.5684313, -1.0845224], requires_grad=True)
    a = torch.tensor(0.7, requires_grad=True)
    for shape in [(5,), (5, 1)]:
        x.grad = a.grad = None
        xs = x.view(shape)
        z, stats = deqfast.fixed_point(lambda z: a * torch.cos(z) + xs, torch.zeros(shape), solver="anderson",
                                       backward="bptt", tol=1e-7, max_iter=50)
        z.sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(a.grad), (shape, x.grad, a.grad)
        z64 = fixed_point_oracle(lambda z: 0.7 * torch.cos(z) + x.detach().double(), torch.zeros(5))
        dx = 1 / (1 + 0.7 * torch.sin(z64))
        # BPTT through a converged solve approaches the implicit gradient (float32 iterates)
        assert rel_err(x.grad, dx) < 1e-4, shape
        assert rel_err(a.grad, (torch.cos(z64) * dx).sum()) < 1e-4, shape


# --- batch norm in the cell, training mode ------------------------------------------------------

C, H = 3, 4


class NormCell(nn.Module):
    """f(z, x) = tanh(0.5 norm(conv(z)) + x), a contraction for these weights."""

    def __init__(self, norm="bn", momentum=0.1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(0.3 * torch.randn(self.conv.weight.shape, generator=g) / 3)
            self.conv.bias.copy_(0.1 * torch.randn(C, generator=g))
        self.norm = {"bn": lambda: nn.BatchNorm2d(C, momentum=momentum),
                     "gn": lambda: nn.GroupNorm(1, C), "ln": lambda: nn.LayerNorm([C, H, H])}[norm]()

    def forward(self, z, x):
        return torch.tanh(0.5 * self.norm(self.conv(z)) + x)


def _bn_input():
    return torch.randn(6, C, H, H, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("backward", ["implicit", "jfb", "phantom"])
def test_batch_norm_running_stats_come_from_the_equilibrium(backward, momentum):
    """BatchNorm in training mode normalises with batch statistics at every f call, and used to
    take one running-statistics step per call too: 20-30 momentum steps per forward, mostly from
    iterates far from the equilibrium (z0 = 0 first), and num_batches_tracked counting solver
    iterations; with momentum=None (a cumulative average) the running mean averaged every iterate
    (fails without the fix). Now the solve leaves them alone and the evaluation at the equilibrium
    updates them: once per forward (phantom: once per phantom step). Oracle: the batch mean and
    unbiased variance of conv(z*) with z* from float64 iteration."""
    cell = NormCell(momentum=momentum)
    oracle = copy.deepcopy(cell).double()
    x = _bn_input()
    layer = deqfast.DEQ(cell, tol=1e-6, max_iter=100, backward=backward, phantom_steps=3)
    z = layer(x)
    steps = 3 if backward == "phantom" else 1
    assert int(cell.norm.num_batches_tracked) == steps
    assert layer.stats.converged.all()
    x64 = x.double()
    z_star = fixed_point_oracle(lambda z: oracle(z, x64), torch.zeros_like(x64))
    h = oracle.conv(z_star)
    mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=True)
    if momentum is None:  # the cumulative average of `steps` updates at (nearly) z*
        expected_mean, expected_var = mean, var
    else:
        keep = (1 - momentum) ** steps
        expected_mean, expected_var = (1 - keep) * mean, keep * 1.0 + (1 - keep) * var
    assert torch.allclose(cell.norm.running_mean.double(), expected_mean, atol=2e-5, rtol=1e-4)
    assert torch.allclose(cell.norm.running_var.double(), expected_var, atol=2e-5, rtol=1e-4)
    assert cell.norm.track_running_stats  # restored
    z.sum().backward()  # (the backward re-runs nothing: no further update)
    assert int(cell.norm.num_batches_tracked) == steps


def test_lazy_batch_norm_is_created_at_the_first_forward_then_updated_once_per_forward():
    """A LazyBatchNorm creates its running statistics at its first call, only if it tracks them:
    turning tracking off for the solve made that first forward fail ('has not been fully
    initialized'; found while writing this file). It is left alone at that forward."""
    cell = NormCell()
    cell.norm = nn.LazyBatchNorm2d()
    layer = deqfast.DEQ(cell, tol=1e-5)
    x = _bn_input()
    layer(x).sum().backward()
    first = int(cell.norm.num_batches_tracked)
    assert first > 1 and cell.norm.running_mean.shape == (C,)
    layer(x).sum().backward()
    assert int(cell.norm.num_batches_tracked) == first + 1


def test_batch_norm_eval_mode_and_bptt_are_as_before():
    """Eval mode uses (and keeps) the running statistics; bptt records every iteration as the
    model itself, so each of its f calls still updates them, as in a plain unrolled network."""
    cell = NormCell()
    x = _bn_input()
    layer = deqfast.DEQ(cell, tol=1e-5, max_iter=100, backward="bptt")
    calls = []
    cell.register_forward_hook(lambda *args: calls.append(1))
    layer(x)
    assert int(cell.norm.num_batches_tracked) == len(calls) > 3
    cell.eval()
    before = cell.norm.running_mean.clone()
    tracked = int(cell.norm.num_batches_tracked)
    layer(x)
    assert torch.equal(cell.norm.running_mean, before) and int(cell.norm.num_batches_tracked) == tracked


def test_batch_norm_flag_is_restored_when_the_solve_raises():
    cell = NormCell()
    layer = deqfast.DEQ(cell, max_iter=10)

    class Boom(Exception):
        pass

    calls = [0]

    def hook(*args):
        calls[0] += 1
        if calls[0] == 3:
            raise Boom

    handle = cell.conv.register_forward_hook(hook)
    with pytest.raises(Boom):
        layer(_bn_input())
    handle.remove()
    assert cell.norm.track_running_stats
    assert int(cell.norm.num_batches_tracked) == 0


def test_compact_refuses_a_cell_with_batch_statistics():
    """compact=True evaluates the cell on the active samples alone: batch norm would normalise them
    with their own statistics, a silently different f (the result differed from compact=False by
    far more than tol). A clear error now, naming the layer; in eval mode (running statistics,
    per sample) compaction is allowed and gives compact=False's result."""
    cell = NormCell()
    x = _bn_input()
    with pytest.raises(ValueError, match=r"compact=True\): the cell's BatchNorm2d at cell.norm normalises with the "
                                         r"statistics of the whole batch.*use compact=False"):
        deqfast.DEQ(cell, compact=True)(x)
    assert cell.norm.track_running_stats and int(cell.norm.num_batches_tracked) == 0
    cell.eval()
    with torch.no_grad():
        compact = deqfast.DEQ(cell, compact=True, tol=1e-6)(x)
        full = deqfast.DEQ(cell, tol=1e-6)(x)
    assert torch.allclose(compact, full, atol=1e-5)


@pytest.mark.parametrize("norm, per_sample", [("bn", False), ("bn", True), ("gn", True), ("ln", True)])
def test_normalised_cell_gradient_matches_the_dense_implicit_gradient(norm, per_sample):
    """Batch norm couples the samples (its statistics are over the batch); group and layer norm do
    not. In float64 the implicit gradient through each matches the dense solve over the whole
    state, with per_sample=False and, for batch norm too, with the default (the adjoint's VJPs are
    over the whole batch; the frozen rows are within tol)."""
    cell = NormCell(norm).double()
    oracle = copy.deepcopy(cell)
    x = _bn_input().double().requires_grad_()
    layer = deqfast.DEQ(cell, tol=1e-12, max_iter=200, backward_tol=1e-12, backward_max_iter=300,
                        backward_solver="anderson", per_sample=per_sample)
    weighted_loss(layer(x)).backward()
    x64 = x.detach().clone().requires_grad_()
    f = lambda z: oracle(z, x64)  # noqa: E731
    z_star = fixed_point_oracle(f, torch.zeros_like(x64))
    gW, gx = implicit_gradients(f, z_star, weighted_loss, [oracle.conv.weight, x64])
    assert rel_err(cell.conv.weight.grad, gW) < 1e-6
    assert rel_err(x.grad, gx) < 1e-6


# --- parametrizations under parametrize.cached() --------------------------------------------------

class LinearCell(nn.Module):
    def __init__(self, d=6, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.lin = nn.Linear(d, d).to(dtype)
        with torch.no_grad():
            self.lin.weight.copy_(0.4 * torch.randn(d, d, generator=g) / d ** 0.5)
            self.lin.bias.copy_(0.1 * torch.randn(d, generator=g))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


@pytest.mark.parametrize("backward", ["implicit", "phantom", "jfb"])
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_a_parametrized_weight_cached_during_the_solve_still_gets_its_gradient(kind, backward):
    """Under torch.nn.utils.parametrize.cached() the weight is computed once and kept. First read
    inside the solver's no_grad, the kept weight had no graph, so the parametrization's parameters
    (weight_norm's g and v, spectral_norm's original) got no gradient, silently (grad None; fails
    without the fix). The solve now drops what it put in the cache, so f(z*) computes the weight
    again with grad. The gradients are those of the same step without caching."""
    torch.manual_seed(0)
    cell = LinearCell()
    (weight_norm if kind == "weight_norm" else spectral_norm)(cell.lin)
    cell.eval()  # spectral_norm's power iteration stays put: one weight for both runs
    x = torch.randn(4, 6)
    layer = deqfast.DEQ(cell, tol=1e-6, backward=backward, backward_tol=1e-8)

    def grads(cached):
        cell.zero_grad()
        if cached:
            with parametrize.cached():
                weighted_loss(layer(x)).backward()
        else:
            weighted_loss(layer(x)).backward()
        return {name: p.grad for name, p in cell.named_parameters()}

    plain, cached = grads(False), grads(True)
    for name in plain:
        assert cached[name] is not None, name
        assert torch.allclose(cached[name], plain[name], rtol=1e-5, atol=1e-7), name


def test_a_solve_that_raises_leaves_no_gradless_weight_in_the_cache():
    """f raising mid-solve (here at its third call) inside parametrize.cached(): the weight the solve
    cached without grad is dropped all the same, so a step that goes on in the same block trains."""
    cell = LinearCell()
    weight_norm(cell.lin)
    x = torch.randn(4, 6)
    calls = [0]

    def f(z):
        calls[0] += 1
        if calls[0] == 3:
            raise FloatingPointError("a NaN check in the user's f")
        return cell(z, x)

    with parametrize.cached():
        with pytest.raises(FloatingPointError):
            deqfast.fixed_point(f, torch.zeros(4, 6))
        weighted_loss(cell(torch.zeros(4, 6), x)).backward()
    assert all(p.grad is not None for p in cell.lin.parametrizations.weight.parameters())


def test_cached_parametrization_with_fixed_point_and_the_oracle():
    """The same through deqfast.fixed_point (any closure), against the dense float64 oracle; a
    weight the user cached before the solve, with grad, is kept (not computed again)."""
    torch.manual_seed(0)
    cell = LinearCell()
    weight_norm(cell.lin)
    x = torch.randn(4, 6)
    with parametrize.cached():
        z, _ = deqfast.fixed_point(lambda z: cell(z, x), torch.zeros(4, 6), tol=1e-7, backward_tol=1e-8)
        weighted_loss(z).backward()
        w = cell.lin.weight
        assert w.requires_grad and cell.lin.weight is w  # cached with grad by f(z*), then kept
    oracle = copy.deepcopy(cell).double()
    f = lambda z: oracle(z, x.double())  # noqa: E731
    z_star = fixed_point_oracle(f, torch.zeros(4, 6))
    params = list(oracle.lin.parametrizations.weight.parameters())
    expected = implicit_gradients(f, z_star, weighted_loss, params)
    for p, e in zip(cell.lin.parametrizations.weight.parameters(), expected):
        assert rel_err(p.grad, e) < 1e-5


# --- complex states -------------------------------------------------------------------------------

def test_a_complex_state_is_refused_with_the_real_view_recipe_which_solves_it_exactly():
    """A complex z0 (or x for DEQ without z0, or a complex f(z)) is a TypeError naming the dtype and
    the recipe: solve torch.view_as_real of the state. The recipe, checked against the float64
    oracle on the real view: values and the complex gradients (PyTorch's convention) of W and x."""
    B, d = 4, 5
    g = torch.Generator().manual_seed(0)
    W0 = 0.15 * torch.randn(d, d, dtype=torch.complex128, generator=g)
    X0 = torch.randn(B, d, dtype=torch.complex128, generator=g)
    with pytest.raises(TypeError, match=r"z0 must be floating point, got torch.complex64 .*torch.view_as_real"):
        deqfast.fixed_point(lambda z: 0.5 * z, torch.zeros(B, d, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"x must be floating point .*got torch.complex64 .*torch.view_as_real"):
        deqfast.DEQ(lambda z, x: 0.5 * z + x)(X0.to(torch.complex64))
    with pytest.raises(TypeError, match=r"got torch.complex64; for a complex state return torch.view_as_real"):
        deqfast.fixed_point(lambda z: torch.complex(z, z), torch.zeros(B, d))

    def make(W, X):
        return lambda zr: torch.view_as_real(torch.tanh(torch.view_as_complex(zr) @ W + X))

    def loss(zr):
        return (torch.view_as_complex(zr).abs() ** 2 * torch.arange(1, B * d + 1, dtype=zr.dtype).reshape(B, d)).sum()

    W64, X64 = W0.clone().requires_grad_(), X0.clone().requires_grad_()
    f64 = make(W64, X64)
    z_star = fixed_point_oracle(f64, torch.zeros(B, d, 2, dtype=torch.float64))
    expected = implicit_gradients(f64, z_star, loss, [W64, X64])
    for solver in ["anderson", "broyden"]:
        W, X = W0.to(torch.complex64).requires_grad_(), X0.to(torch.complex64).requires_grad_()
        zr, _ = deqfast.fixed_point(make(W, X), torch.zeros(B, d, 2), solver=solver, tol=1e-7, backward_tol=1e-8)
        loss(zr).backward()
        assert float((zr.detach().double() - z_star).abs().max()) < 1e-6
        assert rel_err(torch.view_as_real(W.grad), torch.view_as_real(expected[0])) < 2e-6
        assert rel_err(torch.view_as_real(X.grad), torch.view_as_real(expected[1])) < 2e-6


# --- 16-bit states with the default tolerances ---------------------------------------------------

@pytest.mark.parametrize("dtype, eps, advice", [(torch.bfloat16, "0.0078", "0.01"), (torch.float16, "0.00098", "0.001"),
                                                (torch.float32, "1.2e-07", "1e-06")])
def test_an_adjoint_tolerance_below_the_state_rounding_is_named_in_the_warning(dtype, eps, advice):
    """model.half() / model.bfloat16() after construction keeps the default backward_tol=1e-6, which
    a 16-bit state cannot meet: the inexact-adjoint warning (at most every step) now says so and
    what tolerance the dtype can meet, rather than only 'raise backward_max_iter'. The layer still
    runs, and its gradient is the float64 one to the dtype's precision."""
    tol = 1e-6 if dtype != torch.float32 else 1e-8  # the default for 16 bits; below float32's rounding

    def build(**keywords):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 6), deqfast.DEQ(LinearCell(), **keywords), nn.Linear(6, 2))

    model = build(backward_tol=tol, backward_max_iter=8).to(dtype)
    reference = build(tol=1e-12, max_iter=200, backward_tol=1e-12, backward_max_iter=200).double()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match=rf"below the rounding of the {str(dtype)[6:]} state, {eps}: a tolerance "
                                            rf"above it, e.g. {advice}, is what it can meet"):
        model(x.to(dtype)).float().square().sum().backward()
    reference(x.double()).square().sum().backward()
    bound = 1e-3 if dtype == torch.float32 else 0.05  # (the forward tol is the default 1e-4)
    assert rel_err(model[0].weight.grad, reference[0].weight.grad) < bound


# --- programs that already worked: kept as regression tests ---------------------------------------

def test_implicit_graph_network_with_a_sparse_adjacency():
    """IGNN: Z = relu(A (Z W) + X U), nodes on dim 0 (per_sample=False, the rows are coupled through
    A), torch.sparse.mm inside f; values and gradients of W and U against the dense oracle."""
    g = torch.Generator().manual_seed(0)
    N, d, d_in = 10, 4, 3
    A = torch.sparse_coo_tensor(torch.randint(0, N, (2, 25), generator=g), torch.rand(25, generator=g) / 4,
                                (N, N), check_invariants=True).coalesce()
    W0, U0 = 0.3 * torch.randn(d, d, generator=g), torch.randn(d_in, d, generator=g)
    X = torch.randn(N, d_in, generator=g)

    def make(W, U, A, X):
        return lambda z: torch.relu(torch.sparse.mm(A, z @ W) + X @ U)

    W64, U64 = W0.double().requires_grad_(), U0.double().requires_grad_()
    f64 = make(W64, U64, A.double(), X.double())
    z_star = fixed_point_oracle(f64, torch.zeros(N, d))
    gW, gU = implicit_gradients(f64, z_star, weighted_loss, [W64, U64], vectorize=False)  # (sparse A)
    for solver in ["anderson", "broyden"]:
        W, U = W0.clone().requires_grad_(), U0.clone().requires_grad_()
        z, stats = deqfast.fixed_point(make(W, U, A, X), torch.zeros(N, d), solver=solver, per_sample=False,
                                       tol=1e-7, max_iter=100, backward_tol=1e-7)
        weighted_loss(z).backward()
        assert stats.converged.all()
        assert float((z.detach().double() - z_star).abs().max()) < 1e-6
        assert rel_err(W.grad, gW) < 1e-5 and rel_err(U.grad, gU) < 1e-5


class MonotoneCell(nn.Module):
    """monDEQ's forward-backward splitting step z <- relu((1 - a) z + a (W z + U x)) with
    W = (1 - m) I - AᵀA + B - Bᵀ (strongly monotone I - W)."""

    def __init__(self, d=6, d_in=3, m=0.5, alpha=0.3):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.m, self.alpha = m, alpha
        self.A = nn.Parameter(0.3 * torch.randn(d, d, generator=g))
        self.B = nn.Parameter(0.3 * torch.randn(d, d, generator=g))
        self.U = nn.Linear(d_in, d)
        with torch.no_grad():
            self.U.weight.copy_(torch.randn(d, d_in, generator=g) / d_in ** 0.5)
            self.U.bias.copy_(0.1 * torch.randn(d, generator=g))

    def forward(self, z, x):
        I = torch.eye(self.A.shape[0], dtype=self.A.dtype)
        W = (1 - self.m) * I - self.A.T @ self.A + self.B - self.B.T
        return torch.relu((1 - self.alpha) * z + self.alpha * (z @ W.T + self.U(x)))


def test_monotone_operator_equilibrium_network():
    cell = MonotoneCell()
    oracle = copy.deepcopy(cell).double()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), requires_grad=True)
    layer = deqfast.DEQ(cell, tol=1e-7, max_iter=100, backward_solver="anderson", backward_tol=1e-7,
                        backward_max_iter=200)
    weighted_loss(layer(x, torch.zeros(5, 6))).backward()
    x64 = x.detach().double().requires_grad_()
    f = lambda z: oracle(z, x64)  # noqa: E731
    z_star = fixed_point_oracle(f, torch.zeros(5, 6))
    expected = implicit_gradients(f, z_star, weighted_loss, [oracle.A, oracle.B, oracle.U.weight, x64])
    for got, want in zip([cell.A.grad, cell.B.grad, cell.U.weight.grad, x.grad], expected):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("layout", ["TBd", "BTd"])
def test_sequence_state_with_the_batch_first_or_not(layout):
    """A causal recurrence along T inside f (z_t reads z_{t-1}); state (T, B, d) puts time on dim 0,
    where deqfast's per-sample rows are time steps: per_sample=False solves it as one state."""
    T, B, d = 5, 3, 4
    g = torch.Generator().manual_seed(6)
    W0, V0 = 0.3 * torch.randn(d, d, generator=g), 0.3 * torch.randn(d, d, generator=g)
    x = torch.randn((T, B, d) if layout == "TBd" else (B, T, d), generator=g)
    t_dim = 0 if layout == "TBd" else 1

    def make(W, V, x):
        def f(z):
            prev = torch.cat([torch.zeros_like(z.narrow(t_dim, 0, 1)), z.narrow(t_dim, 0, T - 1)], dim=t_dim)
            return torch.tanh(z @ W + prev @ V + x)
        return f

    W64, V64 = W0.double().requires_grad_(), V0.double().requires_grad_()
    f64 = make(W64, V64, x.double())
    z_star = fixed_point_oracle(f64, torch.zeros(x.shape))
    gW, gV = implicit_gradients(f64, z_star, weighted_loss, [W64, V64])
    for per_sample in (layout == "BTd", False):
        W, V = W0.clone().requires_grad_(), V0.clone().requires_grad_()
        z, stats = deqfast.fixed_point(make(W, V, x), torch.zeros(x.shape), per_sample=per_sample, tol=1e-7,
                                       backward_solver="anderson", backward_tol=1e-7)
        weighted_loss(z).backward()
        assert float((z.detach().double() - z_star).abs().max()) < 1e-6
        assert rel_err(W.grad, gW) < 1e-5 and rel_err(V.grad, gV) < 1e-5


@pytest.mark.parametrize("backward", ["implicit", "neumann", "phantom"])
def test_a_loss_scaled_as_by_a_grad_scaler_gives_the_same_unscaled_gradients(backward):
    """AMP's GradScaler multiplies the loss by 65536 (and more): the relative stopping rule of the
    adjoint makes its solve, so the unscaled gradient, the same."""
    cell = LinearCell()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(7))
    layer = deqfast.DEQ(cell, tol=1e-6, backward=backward)
    grads = []
    for scale in (1.0, 65536.0, 2.0 ** 24):
        cell.zero_grad()
        (weighted_loss(layer(x)) * scale).backward()
        grads.append(cell.lin.weight.grad / scale)
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], rtol=1e-5, atol=1e-7)


def test_model_level_programs_match_the_oracle_layer():
    """A parameter shared with a layer outside the DEQ, two DEQs in sequence inside nn.Sequential,
    called through torch.func.functional_call and under torch.utils.checkpoint, the loss on two
    samples only, gradient accumulation over two backwards: the parameters' gradients are those
    of the same model with each DEQ replaced by the float64 oracle layer (dense implicit gradient)."""
    from torch.func import functional_call
    from torch.utils.checkpoint import checkpoint

    class OracleDEQ(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, x):
            z_star = fixed_point_oracle(lambda z: self.cell(z, x), torch.zeros_like(x))
            n = z_star.numel()
            J = torch.autograd.functional.jacobian(lambda z: self.cell(z, x.detach()).reshape(-1), z_star,
                                                   vectorize=True).reshape(n, n)
            inverse_t = torch.linalg.inv(torch.eye(n, dtype=J.dtype) - J).T

            class Adjoint(torch.autograd.Function):
                @staticmethod
                def forward(ctx, fz):
                    return fz.clone()

                @staticmethod
                def backward(ctx, grad):
                    return (inverse_t @ grad.reshape(-1)).reshape(grad.shape)

            return Adjoint.apply(self.cell(z_star, x))

    def build(deq):
        torch.manual_seed(0)
        shared = nn.Linear(6, 6)
        first, second = LinearCell(), LinearCell()
        first.lin = shared  # the first DEQ's weight is also the model's input layer
        with torch.no_grad():
            shared.weight.mul_(0.5)
        return nn.Sequential(shared, deq(first), nn.Linear(6, 6), deq(second))

    model = build(lambda cell: deqfast.DEQ(cell, tol=1e-7, backward_tol=1e-8, backward_max_iter=100))
    oracle = build(OracleDEQ).double()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(8))

    def loss_of(out):
        return weighted_loss(out[[0, 2]])

    params = dict(model.named_parameters())
    loss_of(functional_call(model, params, (x[:3],))).backward()
    loss_of(checkpoint(model, x[1:], use_reentrant=False)).backward()
    loss = loss_of(model(x[2:]))
    loss.backward(retain_graph=True)  # a second backward through the same graph: each runs the adjoint
    loss.backward()
    x64 = x.double()
    loss_of(oracle(x64[:3])).backward()
    loss_of(oracle(x64[1:])).backward()
    loss = loss_of(oracle(x64[2:]))
    loss.backward(retain_graph=True)
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-5, name


def test_a_given_z0_that_requires_grad_gets_none_and_x_without_grad_is_fine():
    """z* does not depend on where the solve starts: a z0 requiring grad (a learned initialisation)
    gets no gradient through implicit or neumann (exactly 0, left as None), while the
    parameters get theirs; an x that does not require grad is a constant of the backward."""
    cell = LinearCell()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(9))
    reference = deqfast.DEQ(cell, tol=1e-7, backward_tol=1e-7)
    weighted_loss(reference(x)).backward()
    expected = cell.lin.weight.grad.clone()
    for backward in ["implicit", "neumann"]:
        cell.zero_grad()
        init = nn.Linear(6, 6)
        z0 = init(x)
        weighted_loss(deqfast.DEQ(cell, tol=1e-7, backward=backward, neumann_terms=40)(x, z0)).backward()
        assert init.weight.grad is None
        assert torch.allclose(cell.lin.weight.grad, expected, rtol=1e-4, atol=1e-6)


# --- Broyden's restarts and check_every ----------------------------------------------------------

@pytest.mark.parametrize("path", ["fused", "reference"])
def test_broyden_with_restarts_gives_the_same_bits_for_every_check_every_on_the_cpu(path, monkeypatch):
    """monDEQ's relu cell with Broyden's memory at DEQ's default m=5: samples blow up and restart
    (their history cleared). The clear waited for the next host check, so with check_every > 1 the
    iterates differed from check_every=1's (one sample: converged at 71 evaluations with 1, ran to
    max_iter=100 with 4), against the README's 'check_every never changes a result' (fails without
    the fix). On the CPU, reading the restart flags costs no synchronisation: cleared at once."""
    import importlib
    broyden_module = importlib.import_module("deqfast.solvers.broyden")
    if path == "reference":
        monkeypatch.setattr(deqfast.ops, "use_fused", lambda *a, **k: False)
    elif not deqfast.extension_info()["compiled"]:
        pytest.skip("deqfast._C not compiled")
    clears = []
    clear = broyden_module._clear
    monkeypatch.setattr(broyden_module, "_clear", lambda *a: clears.append(1) or clear(*a))
    cell = MonotoneCell()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        runs = [deqfast.solvers.broyden(lambda z: cell(z, x), torch.zeros(6, 6), tol=1e-7, max_iter=100, m=5,
                                        check_every=c) for c in (1, 4, 7)]
        if path == "fused":  # the fused op clears inside deqfast::broyden_fused_step: count on the reference path
            monkeypatch.setattr(deqfast.ops, "use_fused", lambda *a, **k: False)
            deqfast.solvers.broyden(lambda z: cell(z, x), torch.zeros(6, 6), tol=1e-7, max_iter=100, m=5)
    assert clears  # restarts happened
    (z1, s1), rest = runs[0], runs[1:]
    for z, s in rest:
        assert torch.equal(z, z1) and torch.equal(s.nstep, s1.nstep) and torch.equal(s.residual, s1.residual)


# --- an overflowed incoming gradient (AMP's GradScaler) -------------------------------------------

@pytest.mark.parametrize("backward_solver, warm", [("fixed_point", False), ("anderson", False), ("broyden", False),
                                                   ("anderson", True), ("broyden", True)])
@pytest.mark.parametrize("per_sample", [True, False])
def test_an_overflowed_gradient_stays_non_finite_so_grad_scaler_skips_the_step(backward_solver, warm, per_sample):
    """GradScaler finds an overflow by Inf/NaN in the parameters' gradients, then skips the step and
    lowers its scale. The Anderson and Broyden adjoint solvers froze a sample whose incoming
    gradient held Inf at its best finite iterate, so the parameters' gradients came out finite
    and the scaler applied the step (fails without the fix). Now such a sample passes its
    gradient through as it came (as autograd through an explicit layer does); the other samples'
    gradients are untouched."""
    cell = LinearCell()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    layer = deqfast.DEQ(cell, tol=1e-6, backward_solver=backward_solver, backward_warm_start=warm,
                        per_sample=per_sample, solver="anderson" if backward_solver != "broyden" else "broyden")
    weights = torch.ones(4, 6)
    weighted = lambda z: (z * weights).sum()  # noqa: E731
    weighted(layer(x)).backward()
    clean_x = x.grad.clone()
    cell.zero_grad()
    x.grad = None
    weights[1, 2] = float("inf")
    opt = torch.optim.SGD(cell.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = [p.detach().clone() for p in cell.parameters()]
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        scaler.scale(weighted(layer(x))).backward()
    assert not all(torch.isfinite(p.grad).all() for p in cell.parameters())
    if per_sample:  # the other samples' input gradients are those of the clean run (scaled)
        keep = torch.tensor([True, False, True, True])
        torch.testing.assert_close(x.grad[keep] / 2.0 ** 16, clean_x[keep])
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(cell.parameters(), before))  # the step was skipped
    assert scaler.get_scale() < 2.0 ** 16
