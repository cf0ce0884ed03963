"""Forward-mode AD and second derivatives through the implicit (and Neumann) backward, against
float64 oracles: dense Jacobian solves, explicit unrolling to convergence, finite differences."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import deqfast

F64 = torch.float64
TIGHT = dict(max_iter=300, tol=1e-13, backward_max_iter=400, backward_tol=1e-13)
UNROLL = 240  # contraction <= 0.5: 0.5^240 is far below float64's rounding


class Cell(nn.Module):
    """f(z, x) = tanh(W z + U x + b), ‖W‖₂ = contraction."""

    def __init__(self, d=5, d_in=4, contraction=0.5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=g, dtype=F64)
        self.W = nn.Parameter(contraction * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(d, d_in, generator=g, dtype=F64) / d_in ** 0.5)
        self.b = nn.Parameter(0.3 * torch.randn(d, generator=g, dtype=F64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class PairCell(nn.Module):
    """A state of two tensors (B, 3) and (B, 2, 2), coupled: each part reads both."""

    def __init__(self, d_in=4, contraction=0.5, seed=1):
        super().__init__()
        self.inner = Cell(d=7, d_in=d_in, contraction=contraction, seed=seed)

    def forward(self, z, x):
        a, b = z
        out = self.inner(torch.cat([a, b.reshape(b.shape[0], 4)], dim=1), x)
        return out[:, :3], out[:, 3:].reshape(-1, 2, 2)


def _inputs(B=3, d_in=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d_in, generator=g, dtype=F64, requires_grad=True)
    return x, g


def _unrolled(cell, x, z0):
    """z* by explicit iteration of f with autograd (every derivative of every order is the graph's)."""
    z = z0
    for _ in range(UNROLL):
        z = cell(z, x)
    return z


def _flat(z):
    return torch.cat([t.reshape(t.shape[0], -1) for t in z], dim=1) if isinstance(z, (list, tuple)) else z


def _zeros(cell, B):
    return (torch.zeros(B, 3, dtype=F64), torch.zeros(B, 2, 2, dtype=F64)) if isinstance(cell, PairCell) \
        else torch.zeros(B, cell.W.shape[0], dtype=F64)


def _loss(z, c):
    z = _flat(z)
    return (z * c).sum() + (z ** 3).sum()  # nonlinear: the incoming gradient g depends on z* too


def _penalties(out_fn, cell, x, c):
    """d/d(x, θ) of ‖∂L/∂x‖² and of ‖∂L/∂θ‖² (gradient penalties), L = _loss(out)."""
    params = list(cell.parameters())
    first = torch.autograd.grad(_loss(out_fn(x), c), [x] + params, create_graph=True)
    on_x = first[0].square().sum()
    on_theta = sum(g.square().sum() for g in first[1:])
    return (torch.autograd.grad(on_x, [x] + params, retain_graph=True), torch.autograd.grad(on_theta, [x] + params))


def _assert_rel(got, expected, rtol):
    for a, b in zip(got, expected):
        scale = b.abs().max().clamp_min(1e-300)
        err = float(((a - b).abs().max() / scale).detach())
        assert err < rtol, (err, rtol)


# --- forward-mode AD ---------------------------------------------------------------------------


def _dense_tangent(f_of_z_x, z_star, x, x_dot, terms=None):
    """(I − J)⁻¹ ḟ per sample (or Σ_{k<terms} J^k ḟ), J and ḟ = ∂f/∂x ẋ as dense Jacobians, flat (B, d)."""
    B = z_star.shape[0]
    J = torch.autograd.functional.jacobian(lambda z: f_of_z_x(z, x), z_star).reshape(B, -1, B, z_star[0].numel())
    J = torch.stack([J[b, :, b] for b in range(B)])
    Jx = torch.autograd.functional.jacobian(lambda xx: f_of_z_x(z_star, xx), x).reshape(B, -1, B, x[0].numel())
    f_dot = torch.stack([Jx[b, :, b] @ x_dot[b].reshape(-1) for b in range(B)])
    if terms is None:
        return torch.linalg.solve(torch.eye(J.shape[1], dtype=F64) - J, f_dot.unsqueeze(2)).squeeze(2)
    return sum(torch.linalg.matrix_power(J, k) @ f_dot.unsqueeze(2) for k in range(terms)).squeeze(2)


@pytest.mark.parametrize("state", ["tensor", "tuple"])
@pytest.mark.parametrize("backward,keywords", [("implicit", dict(backward_solver="fixed_point")),
                                               ("implicit", dict(backward_solver="anderson")),
                                               ("neumann", dict(neumann_terms=4))])
def test_forward_mode_tangent_of_x(state, backward, keywords):
    """fixed_point's z* under forward_ad with a tangent on x: (I − J)⁻¹ ∂f/∂x ẋ (implicit), its
    4-term series (neumann); against dense Jacobians, and implicit against central differences too."""
    cell = PairCell() if state == "tuple" else Cell()
    x, g = _inputs()
    x = x.detach()
    x_dot = torch.randn(x.shape, generator=g, dtype=F64)
    z0 = _zeros(cell, x.shape[0])
    run = lambda xx: deqfast.fixed_point(lambda z: cell(z, xx), z0, backward=backward, **TIGHT, **keywords)[0]
    with fwAD.dual_level():
        out = run(fwAD.make_dual(x, x_dot))
        parts = out if isinstance(out, tuple) else (out,)
        primal = _flat(tuple(fwAD.unpack_dual(p).primal for p in parts))
        tangent = _flat(tuple(fwAD.unpack_dual(p).tangent for p in parts))
    assert isinstance(out, type(z0))
    with torch.no_grad():
        z_star = _flat(_unrolled(cell, x, z0))
    torch.testing.assert_close(primal, z_star, rtol=0, atol=1e-12)
    layout = deqfast._state.PackedState("test", list(z0)) if state == "tuple" else None
    f_flat = (lambda z, xx: layout.pack(cell(tuple(layout.unpack(z)), xx))) if layout else cell
    expected = _dense_tangent(f_flat, z_star, x, x_dot, terms=keywords.get("neumann_terms"))
    torch.testing.assert_close(tangent, expected, rtol=1e-10, atol=1e-11)
    if backward == "implicit":
        h = 1e-5
        with torch.no_grad():
            fd = (_flat(run(x + h * x_dot)) - _flat(run(x - h * x_dot))) / (2 * h)
        torch.testing.assert_close(tangent, fd, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_forward_mode_tangent_of_parameters_and_x_through_deq(grad_mode):
    """DEQ under forward_ad with tangents on its parameters (torch.func.functional_call) and on x,
    in grad and no_grad mode: the tangent of z* is (I − J)⁻¹ ḟ with ḟ the tangent of f at z*
    (taken by torch.autograd.functional.jvp, the double-VJP trick) and J dense."""
    cell = Cell(seed=3)
    layer = deqfast.DEQ(cell, **TIGHT)
    x, g = _inputs(seed=7)
    x = x.detach()
    params = {n: p.detach() for n, p in cell.named_parameters()}
    dots = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in params.items()}
    x_dot = torch.randn(x.shape, generator=g, dtype=F64)
    with torch.set_grad_enabled(grad_mode), fwAD.dual_level():
        duals = {n: fwAD.make_dual(p, dots[n]) for n, p in params.items()}
        inputs = (fwAD.make_dual(x, x_dot), torch.zeros(3, 5, dtype=F64))
        out = torch.func.functional_call(layer, {"cell." + n: v for n, v in duals.items()}, inputs)
        tangent = fwAD.unpack_dual(out).tangent
    with torch.no_grad():
        z_star = _unrolled(cell, x, torch.zeros(3, 5, dtype=F64))
    names = list(params)
    f_theta = lambda xx, *ps: torch.func.functional_call(cell, dict(zip(names, ps)), (z_star, xx))
    _, f_dot = torch.autograd.functional.jvp(f_theta, (x, *params.values()), (x_dot, *dots.values()))
    J = torch.autograd.functional.jacobian(lambda z: cell(z, x), z_star)
    J = torch.stack([J[b, :, b] for b in range(3)])
    expected = torch.linalg.solve(torch.eye(5, dtype=F64) - J, f_dot.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(tangent, expected, rtol=1e-10, atol=1e-11)


def test_forward_mode_tangent_is_not_differentiated_silently():
    """Reverse mode through a tangent (reverse over forward) would hold J and z* constant: an error."""
    cell = Cell(seed=4)
    x, g = _inputs(seed=8)
    with fwAD.dual_level():
        out = deqfast.DEQ(cell, **TIGHT)(fwAD.make_dual(x.detach(), torch.ones_like(x)), torch.zeros(3, 5, dtype=F64))
        tangent = fwAD.unpack_dual(out).tangent
        assert tangent.requires_grad  # ∂f/∂x ẋ depends on U, which requires grad
        with pytest.raises(RuntimeError, match="forward-mode tangent of z\\* .* not differentiable in reverse mode"):
            tangent.sum().backward()


# --- second derivatives --------------------------------------------------------------------------


@pytest.mark.parametrize("state,keywords", [
    ("tensor", {}), ("tuple", {}), ("tensor", dict(backward_solver="anderson")),
    ("tensor", dict(backward_solver="broyden", per_sample=False)),
    ("tensor", dict(compact=True, solver="anderson", backward_warm_start=True))])
def test_gradient_penalties_equal_full_unrolling(state, keywords):
    """d/d(x, θ) of ‖∂L/∂x‖² and of ‖∂L/∂θ‖² through DEQ(backward="implicit") equal those of f
    unrolled UNROLL times with autograd (contraction 0.5: converged far below float64 rounding),
    with each adjoint solver, coupled rows, compaction and a warm-started first-order adjoint."""
    cell = PairCell() if state == "tuple" else Cell()
    x, g = _inputs()
    B = x.shape[0]
    c = torch.randn(B, 7 if state == "tuple" else 5, generator=g, dtype=F64)
    layer = deqfast.DEQ(cell, **TIGHT, **keywords)
    z0 = _zeros(cell, B)
    got = _penalties(lambda xx: layer(xx, z0), cell, x, c)
    expected = _penalties(lambda xx: _unrolled(cell, xx, z0), cell, x, c)
    for a, b in zip(got, expected):
        _assert_rel(a, b, 1e-10)
    assert layer.stats.backward is not None and bool(layer.stats.backward.converged.all())


def test_second_derivative_equals_dense_jacobian_formula_by_differences():
    """d/dθ ‖∂L/∂x‖² against an oracle with no autograd through the fixed point: ∂L/∂x from dense
    Jacobians, ∂f/∂xᵀ (I − Jᵀ)⁻¹ ∂L/∂z*, at z*(θ) solved by iteration; its θ-derivative by central
    differences along a random direction."""
    cell = Cell(seed=9)
    x, g = _inputs(seed=11)
    c = torch.randn(3, 5, generator=g, dtype=F64)
    direction = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in cell.named_parameters()}
    layer = deqfast.DEQ(cell, **TIGHT)
    (gx,) = torch.autograd.grad(_loss(layer(x, torch.zeros(3, 5, dtype=F64)), c), x, create_graph=True)
    second = torch.autograd.grad(gx.square().sum(), list(cell.parameters()))
    directional = sum((s * direction[n]).sum() for s, (n, _) in zip(second, cell.named_parameters()))

    def penalty(eps):
        params = {n: (p + eps * direction[n]).detach() for n, p in cell.named_parameters()}
        f = lambda z, xx: torch.func.functional_call(cell, params, (z, xx))
        xd = x.detach()
        with torch.no_grad():
            z = _unrolled(f, xd, torch.zeros(3, 5, dtype=F64))
        J = torch.autograd.functional.jacobian(lambda zz: f(zz, xd), z)
        Jx = torch.autograd.functional.jacobian(lambda xx: f(z, xx), xd)
        grad_z = c + 3 * z ** 2
        total = 0.0
        for b in range(3):
            u = torch.linalg.solve(torch.eye(5, dtype=F64) - J[b, :, b].T, grad_z[b])
            total = total + (Jx[b, :, b].T @ u).square().sum()
        return total

    h = 1e-4
    fd = (penalty(h) - penalty(-h)) / (2 * h)
    assert abs(float(directional) - float(fd)) < 1e-7 * max(1.0, abs(float(fd))), (float(directional), float(fd))


def test_second_derivative_through_fixed_point_of_a_module():
    """fixed_point with an nn.Module f (no x): d/dθ ‖∂L/∂θ‖² equals unrolling's."""
    class Map(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = Cell(seed=12)
            self.x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=F64)

        def forward(self, z):
            return self.cell(z, self.x)

    f = Map()
    c = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    params = list(f.parameters())
    z0 = torch.zeros(3, 5, dtype=F64)

    def second(out):
        first = torch.autograd.grad(_loss(out, c), params, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), params)

    got = second(deqfast.fixed_point(f, z0, **TIGHT)[0])
    expected = second(_unrolled(lambda z, _: f(z), None, z0))
    _assert_rel(got, expected, 1e-10)


def test_create_graph_first_derivative_is_the_plain_one_and_the_plain_path_is_unchanged():
    """create_graph=True gives the first derivative of the plain backward bit for bit. The plain
    backward (no create_graph) evaluates f solver-steps + 1 times and backpropagates through f's one
    graph adjoint-VJPs + 1 times, as before second derivatives existed: no extra f call, no extra VJP."""
    counts = {"f": 0, "vjp": 0}

    class Count(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            counts["vjp"] += 1
            return g

    cell = Cell(seed=13)

    def counted(z, x):
        counts["f"] += 1
        return Count.apply(cell(z, x))

    layer = deqfast.DEQ(counted, backward_solver="fixed_point", **TIGHT)
    x, g = _inputs(seed=14)
    c = torch.randn(3, 5, generator=g, dtype=F64)
    params = [x] + list(cell.parameters())
    z0 = torch.zeros(3, 5, dtype=F64)
    out = layer(x, z0)
    forward_calls = counts["f"]
    assert forward_calls == int(layer.stats.nstep.max()) + 1  # the solver's + f at z*
    plain = torch.autograd.grad(_loss(out, c), params)
    assert counts["f"] == forward_calls  # backward never re-runs f
    assert counts["vjp"] == int(layer.stats.backward.nstep.max()) + 1  # adjoint VJPs + the final one
    with_graph = torch.autograd.grad(_loss(layer(x, z0), c), params, create_graph=True)
    for a, b in zip(with_graph, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_what_remains_unsupported_is_a_clear_error():
    """Second derivatives through: neumann; a closure f (tensors deqfast cannot re-evaluate f with);
    a cell reading a tensor requiring grad that is neither its parameter nor x; a third derivative.
    Each raises (also with autograd.grad(..., inputs=params)), naming what is supported."""
    cell = Cell(seed=15)
    x, g = _inputs(seed=16)
    c = torch.randn(3, 5, generator=g, dtype=F64)
    params = list(cell.parameters())

    def second(out, inputs):
        (gx,) = torch.autograd.grad(_loss(out, c), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), inputs, create_graph=True)

    z0 = torch.zeros(3, 5, dtype=F64)
    with pytest.raises(RuntimeError, match="backward='neumann'.*not implemented.*exact for backward='implicit'"):
        second(deqfast.DEQ(cell, backward="neumann", **TIGHT)(x, z0), params)
    with pytest.raises(RuntimeError, match="backward='implicit'.*f is a closure.*nn.Module"):
        second(deqfast.fixed_point(lambda z: cell(z, x), z0, **TIGHT)[0], params)
    extra = torch.randn(5, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"reads a tensor requiring grad \(shape \(5,\)\).*neither a parameter"):
        second(deqfast.DEQ(lambda z, xx: cell(z, xx) + 0.1 * extra, **TIGHT)(x, z0), params)
    # a plain (non-module) cell whose only tensor requiring grad is x: exact
    frozen = Cell(seed=15).requires_grad_(False)
    got = second(deqfast.DEQ(lambda z, xx: frozen(z, xx), **TIGHT)(x, z0), [x])
    _assert_rel(got, second(_unrolled(frozen, x, z0), [x]), 1e-10)
    # third derivative
    (gx,) = torch.autograd.grad(_loss(deqfast.DEQ(cell, **TIGHT)(x, z0), c), x, create_graph=True)
    (gxx,) = torch.autograd.grad(gx.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivative is not implemented"):
        torch.autograd.grad(gxx.sum(), params)


@pytest.mark.parametrize("kw", [dict(ift=True), dict(hook_ift=True)])
def test_compat_ift_forward_mode_tangent(kw):
    """deqfast.compat's IFT gradient under forward_ad: the tangent of z*, (I − J)⁻¹ ∂f/∂x ẋ (torch's
    "You must implement the jvp function" before). Its second derivative stays an error (f is a
    closure): tests/test_compat_zoo.py."""
    from deqfast import compat
    cell = Cell(seed=17)
    x, g = _inputs(seed=18)
    x = x.detach()
    x_dot = torch.randn(x.shape, generator=g, dtype=F64)
    deq = compat.get_deq(f_solver="fixed_point_iter", f_max_iter=200, f_tol=1e-13, b_max_iter=400, b_tol=1e-13, **kw)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, x_dot)
        z_out, _ = deq(lambda z: cell(z, xd), torch.zeros(3, 5, dtype=F64))
        tangent = fwAD.unpack_dual(z_out[-1]).tangent
    with torch.no_grad():
        z_star = _unrolled(cell, x, torch.zeros(3, 5, dtype=F64))
    torch.testing.assert_close(tangent, _dense_tangent(cell, z_star, x, x_dot), rtol=1e-9, atol=1e-10)


def test_a_tensor_computed_before_the_cell_from_its_parameters_is_an_error():
    """A cell reading a tensor made outside its call from its own parameter (a cached weight): the
    re-evaluation with the parameters replaced would hold that path constant, and the walk of f's
    graph sees a node older than f's call: an error, not a silent answer."""
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = Cell(seed=19)
            self.cached = None

        def forward(self, z, x):
            return self.cell(z, x) + 0.1 * self.cached

    cell = Cached()
    x, g = _inputs(seed=20)
    cell.cached = cell.cell.b * 2  # computed before the DEQ's call, from a parameter
    out = deqfast.DEQ(cell, **TIGHT)(x, torch.zeros(3, 5, dtype=F64))
    (gx,) = torch.autograd.grad(_loss(out, torch.ones(3, 5, dtype=F64)), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"computed before its call \(MulBackward0\)"):
        torch.autograd.grad(gx.square().sum(), list(cell.parameters()))


@pytest.mark.parametrize("state", ["tensor", "tuple"])
def test_torch_func_jvp_equals_dense_solve_and_the_double_vjp_trick(state):
    """torch.func.jvp (its one transform) through DEQ(implicit): the tangent of x's push-forward equals
    the dense (I − J)⁻¹ ∂f/∂x ẋ and torch.autograd.functional.jvp's (the double-VJP trick, which runs
    through the second-order backward); tangents on the parameters via functional_call too."""
    cell = PairCell() if state == "tuple" else Cell(seed=23)
    layer = deqfast.DEQ(cell, **TIGHT)
    x, g = _inputs(seed=24)
    x = x.detach()
    x_dot = torch.randn(x.shape, generator=g, dtype=F64)
    z0 = _zeros(cell, 3)
    with torch.no_grad():  # the cell's parameters require grad: reverse mode off inside torch.func.jvp
        out, tangent = torch.func.jvp(lambda xx: layer(xx, z0), (x,), (x_dot,))
        z_star = _unrolled(cell, x, z0)
    assert isinstance(out, type(z0)) and isinstance(tangent, type(z0))
    torch.testing.assert_close(_flat(out), _flat(z_star), rtol=0, atol=1e-12)
    layout = deqfast._state.PackedState("test", list(z0)) if state == "tuple" else None
    f_flat = (lambda z, xx: layout.pack(cell(tuple(layout.unpack(z)), xx))) if layout else cell
    expected = _dense_tangent(f_flat, _flat(z_star), x, x_dot)
    torch.testing.assert_close(_flat(tangent), expected, rtol=1e-10, atol=1e-11)
    _, double_vjp = torch.autograd.functional.jvp(lambda xx: _flat(layer(xx, z0)), x, x_dot)
    torch.testing.assert_close(double_vjp, expected, rtol=1e-10, atol=1e-11)
    if state == "tensor":
        params = {n: p.detach() for n, p in layer.named_parameters()}
        dots = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in params.items()}
        _, t_params = torch.func.jvp(lambda p: torch.func.functional_call(layer, p, (x, z0)), (params,), (dots,))
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p, dots[n]) for n, p in params.items()}
            t_fw = fwAD.unpack_dual(torch.func.functional_call(layer, duals, (x, z0))).tangent
        torch.testing.assert_close(t_params, t_fw, rtol=1e-12, atol=1e-13)
        with pytest.raises(RuntimeError, match="under torch.func.jvp.*no reverse-mode graph.*torch.no_grad"):
            torch.func.jvp(lambda xx: layer(xx, z0), (x,), (x_dot,))  # grad on, parameters requiring grad
        with pytest.raises(RuntimeError, match="torch.func.jvp through backward='bptt' is not supported"):
            with torch.no_grad():
                torch.func.jvp(lambda xx: deqfast.DEQ(cell, backward="bptt")(xx, z0), (x,), (x_dot,))
