"""backward_warm_start: the adjoint started and preconditioned from the forward solver's history,
against the dense float64 oracle, with its VJP count against the adjoint from zero."""
import pytest
import torch
from torch import nn

import deqfast
from conftest import ConvCell, TanhCell, dense_jacobian
from test_gradients import _dense_param_grad, _grads, _problem, _solve_fixed_point

TIGHT = dict(max_iter=400, tol=1e-13, backward_max_iter=600, backward_tol=1e-13)


def _oracle(cell, x, z0, c):
    z_star = _solve_fixed_point(cell, x, z0)
    J = dense_jacobian(lambda z: cell(z, x.detach()), z_star)
    eye = torch.eye(J.shape[1], dtype=J.dtype)
    u = torch.linalg.solve((eye - J).transpose(1, 2), c.reshape(c.shape[0], -1, 1)).squeeze(2)
    return _dense_param_grad(cell, x, z_star, u)


@pytest.mark.parametrize("kind", ["tanh", "conv"])
@pytest.mark.parametrize("solver,backward_solver", [("anderson", "fixed_point"), ("broyden", "fixed_point"),
                                                    ("anderson", "anderson"), ("broyden", "broyden")])
def test_warm_started_gradient_matches_dense_solve(kind, solver, backward_solver):
    cell, x, z0, c = _problem(kind)
    layer = deqfast.DEQ(cell, solver=solver, backward_solver=backward_solver, backward_warm_start=True, **TIGHT)
    out = layer(x, z0)
    grads = _grads(out, cell, x, c)
    assert bool(layer.stats.backward.converged.all())
    for a, e in zip(grads, _oracle(cell, x, z0, c)):
        assert float((a - e).norm() / e.norm()) <= 1e-8


def _slow_conv(seed=1):
    """A conv cell near the edge of contraction with a small input: the adjoint from zero needs
    ~150 VJPs to 1e-8."""
    cell = ConvCell(channels=4, contraction=0.95, seed=seed)
    with torch.no_grad():
        cell.weight.mul_(4)  # ConvCell's bound is loose by about that much
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    c = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return cell, x, c


@pytest.mark.parametrize("solver,m,backward_solver,at_most", [
    ("anderson", 10, "fixed_point", 0.8), ("broyden", 30, "fixed_point", 0.8),
    ("anderson", 10, "anderson", 1.0), ("broyden", 10, "anderson", 1.0),
    ("anderson", 10, "broyden", 1.0), ("broyden", 10, "broyden", 1.0),
])
def test_warm_start_needs_fewer_vjps_for_the_same_gradient(solver, m, backward_solver, at_most):
    """The slowly contracting conv cell: each warm-started adjoint (fixed point: started and
    preconditioned; Anderson: preconditioned; Broyden: seeded with H = −M) reaches the same gradient
    as the same adjoint solver from zero in fewer VJPs (the fixed-point one in < 0.8× as many)."""
    cell, x, c = _slow_conv()
    kw = dict(solver=solver, m=m, max_iter=300, tol=1e-8, backward_solver=backward_solver, backward_tol=1e-8,
              backward_max_iter=3000)
    results = {}
    for warm in (False, True):
        layer = deqfast.DEQ(cell, backward_warm_start=warm, **kw)
        out = layer(x)
        grads = torch.autograd.grad((out * c).sum(), list(cell.parameters()))
        assert bool(layer.stats.backward.converged.all())
        results[warm] = (grads, layer.stats.backward.nstep.sum().item())
    (g_plain, n_plain), (g_warm, n_warm) = results[False], results[True]
    assert n_warm < at_most * n_plain, (n_warm, n_plain)
    for a, b in zip(g_warm, g_plain):
        assert float((a - b).norm() / b.norm()) < 1e-6


def test_history_kept_only_when_asked():
    cell, x, z0, c = _problem("tanh")
    for warm, expected in ((False, None), (True, "anderson")):
        out = deqfast.DEQ(cell, backward_warm_start=warm)(x, z0)
        history = out.grad_fn.history
        assert (history if history is None else history.kind) == expected
        out.sum().backward()
        assert out.grad_fn.history is None  # released by backward
    with torch.no_grad():  # no backward to come: nothing kept, plain f(z*)
        out = deqfast.DEQ(cell, backward_warm_start=True)(x, z0)
        assert out.grad_fn is None


def test_multi_tensor_state_with_warm_start():
    cell = TanhCell(d=6, d_in=6, contraction=0.8, seed=2)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    f = lambda zs: (cell(zs[0], x), 0.5 * zs[1] + zs[0].sum(1, keepdim=True))
    z0 = (torch.zeros(3, 6, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64))
    grads = []
    for warm in (False, True):
        z, _ = deqfast.fixed_point(f, z0, backward_warm_start=warm, **TIGHT)
        grads.append(torch.autograd.grad(z[0].sum() + z[1].square().sum(), x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(backward_warm_start=1), TypeError, "backward_warm_start must be a bool"),
    (dict(backward_warm_start=True, solver="fixed_point"), ValueError, "solver='anderson' or 'broyden'"),
    (dict(backward_warm_start=True, backward="jfb"), ValueError, "backward='implicit'"),
])
def test_bad_warm_start_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        deqfast.DEQ(torch.nn.Identity(), **kwargs)
    with pytest.raises(error, match=match):
        deqfast.fixed_point(lambda z: 0.5 * z, torch.ones(2, 3), **kwargs)


@pytest.mark.parametrize("b_solver", ["fixed_point_iter", "anderson"])
@pytest.mark.parametrize("hook_ift", [False, True])
def test_compat_backward_warm_start_same_gradient_fewer_vjps(hook_ift, b_solver):
    """get_deq(..., backward_warm_start=True): torchdeq's IFT gradient (J at f(z*), or at z* with
    hook_ift) from an adjoint started and preconditioned by the forward Anderson history: the
    gradient of the plain adjoint (both to b_tol 1e-10) and of the dense float64 solve, in fewer VJPs."""
    from deqfast.compat import get_deq
    g = torch.Generator().manual_seed(5)
    d, B = 24, 5
    W = torch.randn(d, d, generator=g, dtype=torch.float64)
    W = nn.Parameter(0.95 * W / torch.linalg.matrix_norm(W, 2))
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    grads, vjps = [], []
    for warm in (False, True):
        deq = get_deq(f_solver="anderson", b_solver=b_solver, f_max_iter=100, f_tol=1e-11, b_tol=1e-10, b_max_iter=400,
                      ift=not hook_ift, hook_ift=hook_ift, backward_warm_start=warm)
        stats = []
        W.grad = None
        z_list, _ = deq(f, torch.zeros(B, d, dtype=torch.float64), backward_writer=stats.append)
        z_list[-1].square().sum().backward()
        grads.append(W.grad.clone())
        vjps.append(float(stats[0]["nstep"].sum()))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-9)  # both adjoints to b_tol 1e-10
    # the dense oracle: u = (I − Jᵀ)⁻¹ ∂L/∂z at z*, then uᵀ ∂f/∂W
    with torch.no_grad():
        z = torch.zeros(B, d, dtype=torch.float64)
        for _ in range(2000):
            z = f(z)
    J = dense_jacobian(lambda zz: torch.tanh(zz @ W.detach().T + x), z)
    u = torch.linalg.solve((torch.eye(d, dtype=torch.float64) - J).transpose(1, 2), (2 * z).unsqueeze(2)).squeeze(2)
    z_leaf = z.clone().requires_grad_()
    exact = torch.autograd.grad(f(z_leaf), W, u)[0]
    torch.testing.assert_close(grads[1], exact, rtol=1e-7, atol=1e-12)
    assert vjps[1] < vjps[0], vjps


def test_compat_backward_warm_start_must_be_a_bool():
    from deqfast.compat import get_deq
    with pytest.raises(TypeError, match="backward_warm_start must be a bool"):
        get_deq(backward_warm_start="yes")


# --- backward_solver="anderson": Anderson on the preconditioned map, decisions on the true residual


def _linear_adjoint_problem(B=4, d=40, seed=3, radius=0.9):
    """A linear Jᵀ with a known dense solution: u* = (I − Jᵀ)⁻¹ g per sample."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(B, d, d, generator=g, dtype=torch.float64)
    J = radius * J / torch.linalg.matrix_norm(J, 2).view(B, 1, 1)
    rhs = torch.randn(B, d, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - J.transpose(1, 2), rhs)
    vjp = lambda v: torch.einsum("bij,bi->bj", J, v)  # noqa: E731  Jᵀv
    return vjp, rhs, exact


@pytest.mark.parametrize("name", ["identity", "bad", "exact-ish"])
def test_warm_anderson_adjoint_converges_to_the_dense_solution_whatever_m(name):
    """Any M (even a harmful one) gives the dense solution to the tolerance: M only changes the
    steps, the decisions are taken on ‖g + Jᵀu − u‖ and a stalled sample drops M."""
    from deqfast.backward import warm_adjoint_anderson
    vjp, rhs, exact = _linear_adjoint_problem()
    g = torch.Generator().manual_seed(9)
    if name == "identity":
        M = lambda r: r  # noqa: E731
    elif name == "bad":
        Q = torch.randn(rhs.shape[1], 3, generator=g, dtype=torch.float64)
        M = lambda r: -5.0 * r + 40.0 * (r @ Q) @ Q.T  # noqa: E731  nothing like (I − Jᵀ)⁻¹
    else:
        M = lambda r: 1.5 * r  # noqa: E731
    u, stats = warm_adjoint_anderson(vjp, rhs, M, max_iter=400, tol=1e-12, stop_mode="rel", m=6, lam=1e-10)
    assert bool(stats.converged.all()), stats.rel_residual
    torch.testing.assert_close(u, exact, rtol=1e-9, atol=1e-10)
    # The stats are the true residual of the returned u.
    true = (rhs + vjp(u) - u).norm(dim=1)
    torch.testing.assert_close(stats.residual, true, rtol=1e-6, atol=1e-14)


def test_warm_anderson_adjoint_is_the_anderson_adjoint_when_m_is_identity():
    """With M = I the preconditioned map is the plain adjoint map: the same VJPs as
    solvers.anderson from u₀ = g on u ↦ g + Jᵀu (the same iterates), to the tolerance."""
    from deqfast.backward import warm_adjoint_anderson
    vjp, rhs, exact = _linear_adjoint_problem(seed=4)
    kw = dict(max_iter=300, tol=1e-10, stop_mode="rel", m=5, lam=1e-4)
    u_warm, s_warm = warm_adjoint_anderson(vjp, rhs, lambda r: r, **kw)
    u_plain, s_plain = deqfast.solvers.anderson(lambda v: rhs + vjp(v), rhs.clone(), **kw)
    assert torch.equal(s_warm.nstep, s_plain.nstep)
    torch.testing.assert_close(u_warm, u_plain, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_warm_anderson_adjoint_sample_independent_of_the_batch(path, monkeypatch):
    """A sample's warm-started Anderson adjoint does not depend on its neighbours (bitwise), as
    the forward solve's result does not (tests/test_batch_independence.py; f per sample and
    elementwise, so f itself cannot mix samples)."""
    from test_batch_independence import _path, _problem as _elementwise
    _path(path, monkeypatch)
    d = 4500
    kw = dict(solver="anderson", m=6, max_iter=40, tol=1e-9, backward_solver="anderson", backward_tol=1e-10,
              backward_max_iter=200, backward_warm_start=True)
    results = []
    for B in (1, 7):
        f, x, i = _elementwise(d, torch.float64, B - 1, B)
        x = x.clone().requires_grad_()
        c = torch.linspace(-1, 1, d, dtype=torch.float64).expand(B, d)
        f_x = lambda z: f(z) - x.detach() + x  # noqa: E731  the same values, differentiable in x
        z, stats = deqfast.fixed_point(f_x, torch.zeros(B, d, dtype=torch.float64), **kw)
        (gx,) = torch.autograd.grad((z * c).sum(), x)
        results.append((gx[i], stats.backward.nstep[i], stats.backward.residual[i]))
    (g_alone, n_alone, r_alone), (g_batch, n_batch, r_batch) = results
    assert int(n_alone) > 2
    assert torch.equal(g_alone, g_batch), (g_alone - g_batch).abs().max()
    assert torch.equal(n_alone, n_batch) and torch.equal(r_alone, r_batch)


def test_warm_anderson_adjoint_coupled_state():
    """per_sample=False: the whole state is one row, in the forward and the warm-started adjoint."""
    cell, x, z0, c = _problem("tanh", B=4)
    grads = []
    for warm in (False, True):
        layer = deqfast.DEQ(cell, per_sample=False, backward_solver="anderson", backward_warm_start=warm, **TIGHT)
        grads.append(_grads(layer(x, z0), cell, x, c))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_anderson_preconditioner_inverts_i_minus_j_on_the_secant_span():
    """For a linear f(z) = J z + b the forward Anderson history's pairs satisfy A S = Y exactly
    (A = I − J); M = I + P Qᵀ built from them is the least change from I with Mᵀ Y = S, i.e.
    Yᵀ (M r) = Sᵀ r for every r, and it leaves the directions orthogonal to span(S − Y) alone."""
    from deqfast.backward import warm_preconditioner
    from deqfast.solvers import _history
    g = torch.Generator().manual_seed(11)
    B, d, m = 3, 30, 6
    J = torch.randn(B, d, d, generator=g, dtype=torch.float64)
    J = 0.9 * J / torch.linalg.matrix_norm(J, 2).view(B, 1, 1)
    b = torch.randn(B, d, generator=g, dtype=torch.float64)
    f = lambda z: torch.einsum("bij,bj->bi", J, z) + b  # noqa: E731
    with _history.capture() as history:
        deqfast.solvers.anderson(f, torch.zeros(B, d, dtype=torch.float64), m=m, max_iter=m + 2, tol=0.0)
    M = warm_preconditioner(history, b, lam=1e-12)
    t = history.tensors
    F, G, newest = t["F"], t["G"], t["newest"]
    X = F - G
    others = [j for j in range(t["filled"]) if j != newest]
    S = X[:, others] - X[:, newest:newest + 1]
    Y = G[:, newest:newest + 1] - G[:, others]
    A = torch.eye(d, dtype=torch.float64) - J
    torch.testing.assert_close(torch.einsum("bij,bkj->bki", A, S), Y)  # the pairs are exact secants
    r = torch.randn(B, d, generator=g, dtype=torch.float64)
    Mr = M(r)
    torch.testing.assert_close(torch.einsum("bkd,bd->bk", Y, Mr), torch.einsum("bkd,bd->bk", S, r), rtol=1e-6, atol=1e-8)
    q = torch.linalg.qr((S - Y).transpose(1, 2)).Q  # (B, d, k): span(S − Y)
    w = torch.randn(B, d, generator=g, dtype=torch.float64)
    w = w - torch.einsum("bdk,bk->bd", q, torch.einsum("bdk,bd->bk", q, w))  # ⟂ span(S − Y)
    torch.testing.assert_close(M(w), w)


def test_broyden_seed_is_the_initial_inverse_jacobian():
    """solvers.broyden inside _history.seed(U, V) starts from H = −I + Σ U_i V_iᵀ: seeded with the
    exact (J − I)⁻¹ of a linear f(z) = J z + b with J of rank k (Woodbury: −I − P (I − QᵀP)⁻¹ Qᵀ
    for J = P Qᵀ), its first step lands on the fixed point (the dense solve); unseeded it does not."""
    from deqfast.solvers import _history
    g = torch.Generator().manual_seed(12)
    B, d, k = 3, 25, 4
    P = torch.randn(B, d, k, generator=g, dtype=torch.float64) / d ** 0.5
    Q = torch.randn(B, d, k, generator=g, dtype=torch.float64) / d ** 0.5
    b = torch.randn(B, d, generator=g, dtype=torch.float64)
    J = P @ Q.transpose(1, 2)
    f = lambda z: torch.einsum("bij,bj->bi", J, z) + b  # noqa: E731
    exact = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - J, b)
    inner = torch.linalg.inv(torch.eye(k, dtype=torch.float64) - Q.transpose(1, 2) @ P)  # (B, k, k)
    U = -(P @ inner).transpose(1, 2).contiguous()  # (B, k, d): U_i = −(P (I − QᵀP)⁻¹)_{:, i}
    V = Q.transpose(1, 2).contiguous()  # V_i = Q_{:, i}
    kw = dict(m=5, max_iter=30, tol=1e-12)
    with _history.seed(U, V):
        z, stats = deqfast.solvers.broyden(f, torch.zeros(B, d, dtype=torch.float64), **kw)
    torch.testing.assert_close(z, exact, rtol=1e-10, atol=1e-12)
    assert bool((stats.nstep <= 2).all()), stats.nstep  # f(z0), then f at the solution
    z_plain, plain = deqfast.solvers.broyden(f, torch.zeros(B, d, dtype=torch.float64), **kw)
    assert bool((plain.nstep > 2).all())
    assert _history.take_seed() is None  # the block is closed: later solves start from −I


def test_broyden_seed_is_taken_by_the_first_solve_only():
    """A solve nested inside f (f itself runs a Broyden solve) does not take the outer seed."""
    from deqfast.solvers import _history
    seen = []

    def f(z):
        seen.append(_history.take_seed())
        return 0.5 * z + 1.0

    with _history.seed(torch.zeros(1, 1, 3, dtype=torch.float64), torch.zeros(1, 1, 3, dtype=torch.float64)):
        deqfast.solvers.broyden(f, torch.zeros(1, 3, dtype=torch.float64), max_iter=3, tol=0.0)
    assert seen and all(s is None for s in seen)


def test_pairs_at_the_rounding_floor_are_not_used():
    """An Anderson secant pair whose y is within rounding of f carries no information about J:
    s − y = f(x_j) − f(x_r) is then rounding noise, and (s − y)/‖y‖ would put a random rank-1 term
    of size ~1 into M (seen in bfloat16 near convergence: the warm adjoint crawled). Such a pair is
    dropped: for that sample M = I; a sample with a real pair keeps it."""
    from deqfast.backward import warm_preconditioner
    from deqfast.solvers import _history
    g = torch.Generator().manual_seed(13)
    d = 8
    F = torch.randn(2, 2, d, generator=g)
    G = 0.1 * torch.randn(2, 2, d, generator=g)
    G[1, 0] = G[1, 1] + 1e-9 * F[1, 1].norm() * torch.randn(d, generator=g) / d ** 0.5  # y_1 ≈ 1e-9 ‖f‖
    F[1, 0] = F[1, 1] + 1e-7 * torch.randn(d, generator=g)  # s − y: rounding-sized noise
    history = _history.History()
    history.kind = "anderson"
    history.tensors = dict(F=F, G=G, filled=2, newest=1)
    M = warm_preconditioner(history, F[:, 0], lam=1e-4)
    r = torch.randn(2, d, generator=g)
    out = M(r)
    assert torch.equal(out[1], r[1])
    assert not torch.allclose(out[0], r[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "no IFT gradient"),  # torchdeq's default: the 1-step gradient, no adjoint solve to start
    (dict(ift=True, f_solver="fixed_point_iter"), "f_solver='fixed_point_iter'"),
])
def test_compat_warm_start_without_effect_warns(kwargs, match):
    """get_deq(backward_warm_start=True) where it cannot act says so (at the user's line) instead of
    silently doing nothing; where it acts, no warning."""
    from deqfast.compat import get_deq
    with pytest.warns(UserWarning, match=match) as record:
        get_deq(backward_warm_start=True, **kwargs)
    assert record[0].filename == __file__
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_deq(backward_warm_start=True, ift=True, f_solver="anderson")
        get_deq(backward_warm_start=True, hook_ift=True, f_solver="broyden")
