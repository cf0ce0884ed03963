"""Every backward mode against an independent float64 oracle (dense Jacobians, explicit unrolling)."""
import warnings

import pytest
import torch

import deqfast
from deqfast.backward import neumann_series
from conftest import ConvCell, TanhCell, dense_jacobian

TIGHT = dict(max_iter=400, tol=1e-13, backward_max_iter=600, backward_tol=1e-13)


def _problem(kind, B=3, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    if kind == "tanh":
        cell = TanhCell(d=7, d_in=5, contraction=0.8, seed=seed)
        x = torch.randn(B, 5, generator=g, dtype=torch.float64)
        z0 = torch.randn(B, 7, generator=g, dtype=torch.float64)
    else:
        cell = ConvCell(channels=2, seed=seed)
        x = torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64)
        z0 = torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64)
    x.requires_grad_()
    c = torch.randn(z0.shape, generator=g, dtype=torch.float64)
    return cell, x, z0, c


def _solve_fixed_point(cell, x, z0):
    with torch.no_grad():
        z, stats = deqfast.solvers.anderson(lambda z: cell(z, x), z0, max_iter=400, tol=1e-14)
    assert bool(stats.converged.all())
    return z


def _dense_param_grad(cell, x, z_star, u):
    """Σ_b u_bᵀ ∂f_b/∂θ for θ in (params..., x), with ∂f/∂θ as dense Jacobians (no VJP)."""
    params = list(cell.parameters())
    names = [n for n, _ in cell.named_parameters()]
    B = z_star.shape[0]
    u = u.reshape(B, -1)
    grads = []
    for i, p in enumerate(params + [x]):
        def f_of(theta, i=i):
            if i < len(params):
                saved = {n: q for n, q in zip(names, params)}
                saved[names[i]] = theta
                out = torch.func.functional_call(cell, saved, (z_star, x.detach()))
            else:
                out = cell(z_star, theta)
            return out.reshape(B, -1)
        jac = torch.autograd.functional.jacobian(f_of, p.detach())  # (B, d, *p.shape)
        grads.append(torch.einsum("bd,bd...->...", u, jac))
    return grads


def _grads(out, cell, x, c):
    return torch.autograd.grad((out * c).sum(), list(cell.parameters()) + [x])


def _assert_rel(actual, expected, tol):
    for a, e in zip(actual, expected):
        err = (a - e).norm() / e.norm().clamp_min(1e-300)
        assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("kind", ["tanh", "conv"])
@pytest.mark.parametrize("backward_solver", ["fixed_point", "anderson", "broyden"])
def test_implicit_matches_dense_solve(kind, backward_solver):
    cell, x, z0, c = _problem(kind)
    layer = deqfast.DEQ(cell, backward="implicit", backward_solver=backward_solver, **TIGHT)
    out = layer(x, z0)
    grads = _grads(out, cell, x, c)
    assert layer.stats.backward is not None and bool(layer.stats.backward.converged.all())

    z_star = _solve_fixed_point(cell, x, z0)
    J = dense_jacobian(lambda z: cell(z, x.detach()), z_star)
    eye = torch.eye(J.shape[1], dtype=J.dtype)
    u = torch.linalg.solve((eye - J).transpose(1, 2), c.reshape(c.shape[0], -1, 1)).squeeze(2)
    _assert_rel(grads, _dense_param_grad(cell, x, z_star, u), 1e-8)
    torch.testing.assert_close(out.detach(), cell(z_star, x.detach()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("terms", [1, 2, 5])
def test_neumann_equals_explicit_sum(terms):
    cell, x, z0, c = _problem("tanh", seed=3)
    out = deqfast.DEQ(cell, backward="neumann", neumann_terms=terms, **TIGHT)(x, z0)
    grads = _grads(out, cell, x, c)
    z_star = _solve_fixed_point(cell, x, z0)
    Jt = dense_jacobian(lambda z: cell(z, x.detach()), z_star).transpose(1, 2)
    g = c.reshape(c.shape[0], -1, 1)
    term, u = g, torch.zeros_like(g)
    for _ in range(terms):
        u = u + term
        term = Jt @ term
    _assert_rel(grads, _dense_param_grad(cell, x, z_star, u.squeeze(2)), 1e-10)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_k_adjoint_iterations_from_zero_equal_k_neumann_terms(k):
    """The seed's claim: k fixed-point iterations u ← g + Jᵀu from u = 0 give Σ_{i<k} (Jᵀ)^i g."""
    g_ = torch.Generator().manual_seed(k)
    B, d = 3, 6
    J = torch.randn(B, d, d, generator=g_, dtype=torch.float64)
    J = 0.5 * J / torch.linalg.matrix_norm(J, 2).reshape(B, 1, 1)  # residuals then shrink every step
    g = torch.randn(B, d, generator=g_, dtype=torch.float64)
    vjp = lambda v: (J.transpose(1, 2) @ v.unsqueeze(2)).squeeze(2)
    neumann, _ = neumann_series(vjp, g, k)
    u = torch.zeros_like(g)
    for _ in range(k):
        u = g + vjp(u)
    torch.testing.assert_close(neumann, u, rtol=1e-14, atol=1e-14)
    # deqfast's own adjoint solver (tol 0: runs every iteration) returns the k-th iterate.
    u_solver, stats = deqfast.solvers.fixed_point_iteration(lambda v: g + vjp(v), torch.zeros_like(g),
                                                             max_iter=k + 1, tol=0.0)
    torch.testing.assert_close(u_solver, u, rtol=1e-14, atol=1e-14)
    assert stats.nstep.tolist() == [k + 1] * B


def test_jfb_equals_direct_partial_derivative():
    cell, x, z0, c = _problem("tanh", seed=5)
    out = deqfast.DEQ(cell, backward="jfb", **TIGHT)(x, z0)
    grads = _grads(out, cell, x, c)
    z_star = _solve_fixed_point(cell, x, z0)
    expected = torch.autograd.grad((cell(z_star, x) * c).sum(), list(cell.parameters()) + [x])
    _assert_rel(grads, expected, 1e-10)
    _assert_rel(grads, _dense_param_grad(cell, x, z_star, c), 1e-10)


@pytest.mark.parametrize("steps,tau", [(1, 1.0), (3, 0.5), (5, 0.8)])
def test_phantom_equals_autograd_through_damped_steps(steps, tau):
    cell, x, z0, c = _problem("conv", seed=7)
    out = deqfast.DEQ(cell, backward="phantom", phantom_steps=steps, phantom_tau=tau, **TIGHT)(x, z0)
    grads = _grads(out, cell, x, c)
    z = _solve_fixed_point(cell, x, z0)
    for _ in range(steps):
        z = (1 - tau) * z + tau * cell(z, x)
    torch.testing.assert_close(out, z, rtol=0, atol=1e-12)
    _assert_rel(grads, torch.autograd.grad((z * c).sum(), list(cell.parameters()) + [x]), 1e-10)


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_bptt_equals_autograd_through_unrolled_iteration(tau):
    cell, x, z0, c = _problem("tanh", seed=9)
    T = 12
    out, stats = deqfast.fixed_point(lambda z: cell(z, x), z0, solver="fixed_point", max_iter=T, tol=0.0,
                                     tau=tau, backward="bptt")
    grads = _grads(out, cell, x, c)
    # The solver evaluates f at z_0 .. z_{T-1}; with tol 0 and a contraction its best iterate is z_{T-1}.
    z = z0
    for _ in range(T - 1):
        z = (1 - tau) * z + tau * cell(z, x)
    torch.testing.assert_close(out, z, rtol=0, atol=1e-13)
    _assert_rel(grads, torch.autograd.grad((z * c).sum(), list(cell.parameters()) + [x]), 1e-12)
    assert stats.nstep.tolist() == [T] * 3


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_bptt_through_converged_solver_approaches_implicit_gradient(solver):
    """Autograd through the unrolled Anderson/Broyden solve works, and once converged it is the IFT gradient."""
    cell, x, z0, c = _problem("tanh", seed=11)
    out, stats = deqfast.fixed_point(lambda z: cell(z, x), z0, solver=solver, max_iter=200, tol=1e-12,
                                     backward="bptt")
    assert bool(stats.converged.all())
    grads = _grads(out, cell, x, c)
    out_ift = deqfast.DEQ(cell, **TIGHT)(x, z0)
    _assert_rel(grads, _grads(out_ift, cell, x, c), 1e-6)


def test_gradcheck_layer():
    torch.manual_seed(0)
    B, d = 2, 4
    W = torch.randn(d, d, dtype=torch.float64)
    W = (0.6 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d, dtype=torch.float64, requires_grad=True)

    def layer(W, x, b):
        z, _ = deqfast.fixed_point(lambda z: torch.tanh(z @ W.T + x + b), torch.zeros(B, d, dtype=torch.float64),
                                   **TIGHT)
        return z

    assert torch.autograd.gradcheck(layer, (W, x, b), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_f_called_once_with_grad_in_forward_and_never_in_backward():
    cell, x, z0, c = _problem("tanh", seed=13)
    calls = {"grad": 0, "backward_phase": 0}
    phase = {"backward": False}

    def f(z):
        if torch.is_grad_enabled():
            calls["grad"] += 1
        if phase["backward"]:
            calls["backward_phase"] += 1
        return cell(z, x)

    out, stats = deqfast.fixed_point(f, z0, **TIGHT)
    assert calls["grad"] == 1
    phase["backward"] = True
    (out * c).sum().backward()
    assert calls["backward_phase"] == 0
    assert stats.backward is not None and stats.backward.nstep.min() > 1


@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_bptt_stats_hold_no_graph(solver):
    """The stats are measurements: with bptt they are computed from recorded tensors, but detached."""
    cell, x, z0, c = _problem("tanh", seed=15)
    out, stats = deqfast.fixed_point(lambda z: cell(z, x), z0, solver=solver, backward="bptt", max_iter=20)
    assert out.requires_grad
    for name in ("nstep", "residual", "rel_residual", "converged", "failed"):
        assert not getattr(stats, name).requires_grad, name


def test_double_backward_through_jfb_equals_explicit_step():
    """jfb's output is a plain autograd graph of f(z*): second derivatives work and match f's own."""
    cell, x, z0, c = _problem("tanh", seed=17)
    out = deqfast.DEQ(cell, backward="jfb", **TIGHT)(x, z0)
    (gx,) = torch.autograd.grad((out * c).sum(), x, create_graph=True)
    second = torch.autograd.grad(gx.square().sum(), list(cell.parameters()))
    z_star = _solve_fixed_point(cell, x, z0)
    (gx_ref,) = torch.autograd.grad((cell(z_star, x) * c).sum(), x, create_graph=True)
    _assert_rel(second, torch.autograd.grad(gx_ref.square().sum(), list(cell.parameters())), 1e-9)


@pytest.mark.parametrize("backward", ["neumann"])
def test_double_backward_through_adjoint_raises(backward):
    """create_graph=True still gives the right first derivative; differentiating it again raises
    for neumann (the adjoint's dependence on the parameters is in no graph: a silent answer would be
    wrong). implicit's exact second derivatives: tests/test_higher_order.py."""
    cell, x, z0, c = _problem("tanh", seed=19)
    layer = deqfast.DEQ(cell, backward=backward, **TIGHT)
    (gx_once,) = torch.autograd.grad((layer(x, z0) * c).sum(), x)
    (gx,) = torch.autograd.grad((layer(x, z0) * c).sum(), x, create_graph=True)
    torch.testing.assert_close(gx, gx_once, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="second derivative through backward='neumann'.*not implemented"):
        gx.square().sum().backward()
    # autograd.grad runs only the nodes on a path to its inputs: asked for the parameters alone, it
    # skipped an error node on u and returned the second derivative without u's part.
    for inputs in (list(cell.parameters()), [x]):
        (gx,) = torch.autograd.grad((layer(x, z0) * c).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="second derivative through backward='neumann'.*not implemented"):
            torch.autograd.grad(gx.square().sum(), inputs)


@pytest.mark.parametrize("backward", ["implicit", "neumann"])
@pytest.mark.parametrize("how", ["is_grads_batched", "jacobian_vectorize"])
def test_batched_gradients_through_the_adjoint_are_a_clear_error(backward, how):
    """autograd's batched gradients (is_grads_batched=True, jacobian(vectorize=True)) run the
    backward under vmap, where the adjoint's solver cannot run: an error that says so and what to
    use instead (was: "Batching rule not implemented for aten::detach"). The unbatched Jacobian
    is the dense solve's."""
    cell, x, z0, _ = _problem("tanh", seed=23)
    layer = deqfast.DEQ(cell, backward=backward, **TIGHT)
    n = z0.numel()
    run = {
        "is_grads_batched": lambda: torch.autograd.grad(
            layer(x, z0), x, torch.eye(n, dtype=z0.dtype).view(n, *z0.shape), is_grads_batched=True),
        "jacobian_vectorize": lambda: torch.autograd.functional.jacobian(lambda x: layer(x, z0), x, vectorize=True),
    }[how]
    with pytest.raises(RuntimeError, match=r"backward='%s'.*batched gradients.*vectorize=False" % backward):
        run()
    if backward == "implicit" and how == "jacobian_vectorize":
        jac = torch.autograd.functional.jacobian(lambda x: layer(x, z0), x.detach())  # (B, d, B, d_in)
        z_star = layer(x, z0).detach()
        J = dense_jacobian(lambda z: cell(z, x.detach()), z_star)  # (B, d, d) per sample
        xl = x.detach().requires_grad_()
        Jx = torch.autograd.functional.jacobian(lambda xx: cell(z_star, xx), xl)
        eye = torch.eye(J.shape[1], dtype=J.dtype)
        for b in range(z0.shape[0]):
            expected = torch.linalg.solve(eye - J[b], Jx[b, :, b])
            torch.testing.assert_close(jac[b, :, b], expected, rtol=1e-9, atol=1e-11)


def _forward_mode_tangent(layer, x, z0, tangent):
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        z = layer(fwAD.make_dual(x.detach(), tangent), z0)
        return fwAD.unpack_dual(z).tangent


@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
@pytest.mark.parametrize("params_require_grad", [True, False])
@pytest.mark.parametrize("backward,keywords", [("implicit", {}), ("neumann", dict(neumann_terms=5)), ("bptt", {})])
def test_forward_mode_ad_is_exact_or_a_clear_error(backward, keywords, params_require_grad, grad_mode):
    """torch.autograd.forward_ad (a tangent on x): the tangent of z* is (I − J)⁻¹ ∂f/∂x ẋ. implicit
    solves it (t = J t + ḟ, forward-mode evaluations of f at z*) and neumann sums K terms of its
    series, in grad and no_grad mode alike; bptt carries it exactly through a recorded solve (grad on,
    a parameter requiring grad) and elsewhere would drop it (no tangent, read as zero, or under
    no_grad JFB's one-step tangent, silently): an error that says so."""
    cell, x, z0, _ = _problem("tanh", seed=29)
    for p in cell.parameters():
        p.requires_grad_(params_require_grad)
    layer = deqfast.DEQ(cell, backward=backward, **TIGHT, **keywords)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    context = torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad()
    recorded = backward == "bptt" and grad_mode == "grad" and params_require_grad
    if backward == "bptt" and not recorded:
        with context, pytest.raises(RuntimeError, match=rf"forward-mode AD.*backward='{backward}'"):
            _forward_mode_tangent(layer, x, z0, tangent)
        return
    with context:
        t = _forward_mode_tangent(layer, x, z0, tangent)
    z_star = _solve_fixed_point(cell, x.detach(), z0)
    J = dense_jacobian(lambda z: cell(z, x.detach()), z_star)
    _, f_dot = torch.autograd.functional.jvp(lambda xx: cell(z_star, xx), x.detach(), tangent)
    eye = torch.eye(J.shape[1], dtype=J.dtype)
    if backward == "neumann":
        expected = sum(torch.linalg.matrix_power(J, k) @ f_dot.unsqueeze(2) for k in range(5)).squeeze(2)
    else:
        expected = torch.linalg.solve(eye - J, f_dot.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(t, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backward", ["jfb", "phantom"])
def test_forward_mode_ad_through_jfb_and_phantom_is_their_graph(backward):
    """jfb and phantom are plain graphs from the detached z*: their tangent is that graph's."""
    cell, x, z0, _ = _problem("tanh", seed=31)
    layer = deqfast.DEQ(cell, backward=backward, **TIGHT)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    t = _forward_mode_tangent(layer, x, z0, tangent)
    z_star = _solve_fixed_point(cell, x.detach(), z0)
    if backward == "jfb":
        _, expected = torch.autograd.functional.jvp(lambda xx: cell(z_star, xx), x.detach(), tangent)
    else:
        def phantom(xx):
            z = z_star
            for _ in range(layer.options.phantom_steps):
                z = torch.lerp(z, cell(z, xx), layer.options.phantom_tau)
            return z
        _, expected = torch.autograd.functional.jvp(phantom, x.detach(), tangent)
    torch.testing.assert_close(t, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backward", ["implicit", "jfb"])
def test_model_with_deq_layer_under_torch_compile_matches_eager(backward):
    """torch.compile of a model around a DEQ (the solver's host checks are graph breaks)."""
    torch._dynamo.reset()
    cell, x, z0, c = _problem("tanh", seed=21)
    inp = torch.nn.Linear(5, 5, dtype=torch.float64)
    layer = deqfast.DEQ(cell, backward=backward, **TIGHT)
    params = list(cell.parameters()) + list(inp.parameters()) + [x]

    def model(x):
        return layer(x + inp(x), z0)

    eager = model(x)
    g_eager = torch.autograd.grad((eager * c).sum(), params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="aot_eager")(x)
        g_compiled = torch.autograd.grad((compiled * c).sum(), params)
    # deqfast's checks trace or run eagerly: dynamo has nothing of ours to warn about (it warned
    # "Dynamo does not know how to trace the builtin ... is_gradtrackingtensor" at every compile)
    assert not [str(w.message) for w in caught if "deqfast" in str(w.filename) or "Dynamo" in str(w.message)]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-12)
    _assert_rel(g_compiled, g_eager, 1e-10)


@pytest.mark.parametrize("solver,backward", [("anderson", "implicit"), ("anderson", "bptt"), ("broyden", "implicit")])
def test_torch_compile_does_not_recompile_the_solver_steps_per_iteration(solver, backward):
    """The solver loop runs between graph breaks, so dynamo compiles the step helpers frame by frame;
    their Python-int slot and count made it recompile them at every iteration up to its recompile
    limit (a warning, and compile time spent for nothing). They run eagerly under compile now: the
    number of graphs dynamo compiles does not grow with the iterations, and the result is eager's."""
    from torch._dynamo.utils import counters

    graphs = []
    for max_iter in (3, 20):
        torch._dynamo.reset()
        counters.clear()
        cell, x, z0, c = _problem("tanh", seed=22)
        layer = deqfast.DEQ(cell, solver=solver, backward=backward, m=4, max_iter=max_iter, tol=1e-300)
        model = lambda x: layer(2 * x, z0)
        compiled = torch.compile(model, backend="aot_eager")(x)
        g_compiled = torch.autograd.grad((compiled * c).sum(), [x, *cell.parameters()])
        graphs.append(counters["stats"]["unique_graphs"])
        assert int(layer.stats.nstep.min()) == max_iter
    eager = model(x)
    g_eager = torch.autograd.grad((eager * c).sum(), [x, *cell.parameters()])
    assert graphs[0] == graphs[1], graphs
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-12)
    _assert_rel(g_compiled, g_eager, 1e-10)


@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_bptt_gradient_stays_finite_while_samples_sit_frozen(solver):
    """Samples that converge early sit frozen for many recorded steps (Δx = 0: Broyden's update
    is 0/0 there, masked): their gradient must stay finite and equal the implicit one."""
    g = torch.Generator().manual_seed(23)
    d = 6
    W = torch.randn(d, d, generator=g, dtype=torch.float64)
    W = (W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    scale = torch.tensor([[0.05], [0.5], [0.9]], dtype=torch.float64)  # converge after ~5, ~20, ~100 steps
    c = torch.randn(3, d, generator=g, dtype=torch.float64).requires_grad_()
    f = lambda z: torch.tanh(scale * (z @ W.T) + c)
    z0 = torch.zeros(3, d, dtype=torch.float64)
    out, stats = deqfast.fixed_point(f, z0, solver=solver, backward="bptt", max_iter=300, tol=1e-11)
    assert bool(stats.converged.all()) and int(stats.nstep.max()) >= int(stats.nstep.min()) + 5
    grads = torch.autograd.grad(out.square().sum(), (W, c))
    assert all(bool(torch.isfinite(gr).all()) for gr in grads)
    out_ift, _ = deqfast.fixed_point(f, z0, solver=solver, **TIGHT)
    _assert_rel(grads, torch.autograd.grad(out_ift.square().sum(), (W, c)), 1e-6)


@pytest.mark.parametrize("backward", ["implicit", "neumann", "jfb", "phantom", "bptt"])
@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_nothing_requires_grad_then_z_does_not_and_no_adjoint_runs(solver, backward):
    """A frozen DEQ (parameters requires_grad=False, x not requiring grad) under grad mode feeding
    a trainable head: z is the no_grad solution, does not require grad, and backward of the head
    runs no adjoint solve (stats.backward stays None)."""
    cell, x, z0, c = _problem("tanh", seed=21)
    cell.requires_grad_(False)
    x = x.detach()
    layer = deqfast.DEQ(cell, solver=solver, backward=backward, max_iter=60, tol=1e-10)
    z = layer(x, z0=z0)
    assert not z.requires_grad
    with torch.no_grad():
        z_nograd = layer(x, z0=z0)
    torch.testing.assert_close(z, z_nograd, rtol=0, atol=0)
    head = torch.nn.Linear(7, 1, dtype=torch.float64)
    head(z).sum().backward()
    assert head.weight.grad is not None
    assert layer.stats.backward is None
    # With one parameter trainable again, the gradient flows (the check is not a blanket detach).
    cell.b.requires_grad_(True)
    z = layer(x, z0=z0)
    assert z.requires_grad
    grad_b, = torch.autograd.grad((z * c).sum(), [cell.b])
    assert torch.isfinite(grad_b).all() and grad_b.abs().sum() > 0


@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_bptt_started_at_the_fixed_point_has_a_gradient(solver):
    """bptt from a z0 where every sample already meets tol (a warm start at the fixed point): the
    solver takes no step and returns z0, which had no graph, so backward failed ('element 0 of
    tensors does not require grad'). The result is now the one iteration made, f(z0), recorded:
    its gradient is that of one step through f at z0 (JFB's there), within tol of z0."""
    cell, x, z0, c = _problem("tanh", seed=24)
    f = lambda z: cell(z, x)
    z_star, _ = deqfast.fixed_point(f, z0, solver=solver, **TIGHT)
    z_star = z_star.detach()
    out, stats = deqfast.fixed_point(f, z_star, solver=solver, backward="bptt", tol=1e-8)
    assert int(stats.nstep.max()) == 1 and out.requires_grad
    torch.testing.assert_close(out, z_star, rtol=0, atol=1e-10)
    params = [x, *cell.parameters()]
    grads = torch.autograd.grad((out * c).sum(), params)
    out_jfb, _ = deqfast.fixed_point(f, z_star, solver=solver, backward="jfb", tol=1e-8)
    _assert_rel(grads, torch.autograd.grad((out_jfb * c).sum(), params), 1e-12)
