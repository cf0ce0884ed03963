"""deqfast.compat against torchdeq 0.1.0 where a differential run found them apart (each class fixed
in compat is one test here): damping above 1, the statistics' dtypes and trace shapes, the
backward_writer's traces, the container of a list/tuple state with simple_fixed_point_iter, z* with
sradius_mode, b_max_iter = 0, a solve that makes no step, indexing with Anderson/Broyden, and the
statistics when deqfast's solver checks convergence every few evaluations (as on an accelerator).

Small float64 problems (B = 3, d = 6, a 0.6-contraction); the whole file runs in a few seconds.
"""
import pytest
import torch

torchdeq = pytest.importorskip("torchdeq")

import deqfast.compat as compat  # noqa: E402
import deqfast.solvers._common as _common  # noqa: E402

DT = torch.float64
B, D = 3, 6
INFO_KEYS = ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep")
SOLVERS = {"fixed_point_iter": "fixed_point_iter", "anderson": "anderson_solver", "broyden": "broyden_solver"}


def _problem(seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=DT)
    W = (0.6 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_(requires_grad)
    x = torch.randn(B, D, generator=g, dtype=DT).requires_grad_(requires_grad)
    return W, x


def _f(W, x):
    return lambda z: torch.tanh(z @ W.T + x)


def _split_f(W, x, container=tuple):
    def f(a, b):
        out = torch.tanh(torch.cat([a, b], 1) @ W.T + x)
        return container((out[:, :2], out[:, 2:]))
    return f


def _zeros(shape=(B, D)):
    return torch.zeros(*shape, dtype=DT)


def _assert_info_like(info, ref, values=True, rtol=1e-10):
    for key in INFO_KEYS:
        assert info[key].shape == ref[key].shape and info[key].dtype == ref[key].dtype, \
            (key, info[key].shape, ref[key].shape, info[key].dtype, ref[key].dtype)
        if values:
            torch.testing.assert_close(info[key], ref[key], rtol=rtol, atol=0, msg=key)


# --- tau > 1 (over-relaxation), as torchdeq takes it; tau <= 0 a clear error -------------------

def test_fixed_point_iter_over_relaxed_equals_torchdeq():
    W, x = _problem(1)
    kw = dict(max_iter=6, tol=1e-30, tau=1.3, indexing=[2, 5])
    z, traj, info = compat.solver.fixed_point_iter(_f(W, x), _zeros(), **kw)
    z_ref, traj_ref, info_ref = torchdeq.solver.fixed_point_iter(_f(W, x), _zeros(), **kw)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=0)
    assert len(traj) == len(traj_ref) == 2
    for t, t_ref in zip(traj, traj_ref):
        torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=0)
    _assert_info_like(info, ref=info_ref)


def test_anderson_over_relaxed_converges():
    """torchdeq's Anderson mixes x = tau Σα f(x_j) + (1 - tau) Σα x_j with any tau; deqfast's Anderson
    does the same mixing (its own API keeps tau <= 1); compat passes tau = 1.2 on and converges."""
    W, x = _problem(2)
    f = _f(W, x)
    z, _, info = compat.solver.anderson_solver(f, _zeros(), max_iter=40, tol=1e-10, tau=1.2)
    assert float((f(z) - z).norm(dim=1).max()) < 1e-9
    assert (info["abs_lowest"] < 1e-10).all()
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\]"):  # deqfast's own API unchanged
        import deqfast
        deqfast.solvers.anderson(f, _zeros(), tau=1.2)


def test_phantom_gradient_over_relaxed_equals_torchdeq():
    grads = []
    for lib in (torchdeq, compat):
        W, x = _problem(3, requires_grad=True)
        deq = lib.get_deq(f_max_iter=30, f_tol=1e-12, grad=3, tau=1.3)
        deq.train()
        z, _ = deq(_f(W, x), _zeros())
        grads.append(torch.autograd.grad((z[-1] ** 2).sum(), (W, x)))
    for g, g_ref in zip(*grads[::-1]):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("tau", [0.0, -0.5, float("inf")])
def test_tau_not_positive_finite_is_a_clear_error(tau):
    """torchdeq takes tau = 0 (the damped map is the identity: z0 passes as the fixed point)."""
    W, x = _problem(4)
    with pytest.raises(ValueError, match="tau"):
        compat.get_deq(grad=2, tau=tau)
    with pytest.raises(ValueError, match="tau"):
        compat.solver.fixed_point_iter(_f(W, x), _zeros(), tau=tau)
    with pytest.raises(ValueError, match="tau"):
        compat.solver.anderson_solver(_f(W, x), _zeros(), tau=tau)


# --- statistics: torchdeq's dtypes and trace shapes ------------------------------------------

@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("max_iter", [0, 1, 2, 5])
def test_info_dtypes_and_trace_shapes_equal_torchdeq(solver, max_iter):
    """torchdeq's start values are in the default dtype (float32 while no step is recorded); Anderson's
    traces start at its third evaluation (max_iter - 1 columns, 1 below 3), the others' have
    max_iter + 1. Fixed-point iteration and Broyden record the same values."""
    W, x = _problem(5)
    name = SOLVERS[solver]
    out = [getattr(lib.solver, name)(_f(W, x), _zeros(), max_iter=max_iter, tol=1e-30) for lib in (compat, torchdeq)]
    (z, _, info), (z_ref, _, info_ref) = out
    _assert_info_like(info, info_ref, values=solver != "anderson")
    if max_iter == 0 or (solver == "anderson" and max_iter <= 2):
        assert info["abs_lowest"].dtype == torch.get_default_dtype()


def test_anderson_samples_from_its_third_evaluation():
    W, x = _problem(6)
    for indexing, n in (([1, 2], 1), ([1, 3, 4], 2)):
        _, traj, _ = compat.solver.anderson_solver(_f(W, x), _zeros(), max_iter=8, tol=1e-30, indexing=indexing)
        _, traj_ref, _ = torchdeq.solver.anderson_solver(_f(W, x), _zeros(), max_iter=8, tol=1e-30, indexing=indexing)
        assert len(traj) == len(traj_ref) == n


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_statistics_do_not_depend_on_check_every(solver, monkeypatch):
    """On an accelerator deqfast's solvers test convergence every 4 evaluations and may evaluate a few
    times after the batch converged: compat cuts those from the traces and samples (torchdeq stops at
    the first step where every sample is under tol), so the result is the one checked every step."""
    W, x = _problem(7)
    x = torch.cat([x, 3 * x])  # samples converging at different steps
    f = lambda z: torch.tanh(z @ W.T + x)
    runs = []
    for every in (1, 4, 3):
        monkeypatch.setattr(_common, "default_check_every", lambda device, every=every: every)
        for max_iter, tol in ((9, 1e-3), (20, 1e-6)):
            runs.append((every, getattr(compat.solver, SOLVERS[solver])(f, _zeros((2 * B, D)), max_iter=max_iter, tol=tol,
                                                                        indexing=[2, 5, 8])))
    half = len(runs) // 3
    for k, (every, (z, traj, info)) in enumerate(runs[half:]):
        z1, traj1, info1 = runs[k % half][1]
        assert torch.equal(z, z1) and len(traj) == len(traj1), every
        assert all(torch.equal(a, b) for a, b in zip(traj, traj1))
        for key in INFO_KEYS:
            assert torch.equal(info[key], info1[key]), (every, key)


# --- backward_writer: torchdeq's traces and numbering, no extra VJP -----------------------------

@pytest.mark.parametrize("b_solver,b_max_iter", [("fixed_point_iter", 1), ("fixed_point_iter", 6), ("broyden", 6),
                                                 ("anderson", 6)])
def test_backward_writer_traces_equal_torchdeq(b_solver, b_max_iter):
    seen = []
    for lib in (torchdeq, compat):
        W, x = _problem(8, requires_grad=True)
        calls = []
        deq = lib.get_deq(f_max_iter=40, f_tol=1e-12, ift=True, b_solver=b_solver, b_max_iter=b_max_iter, b_tol=1e-12)
        deq.train()
        z, _ = deq(_f(W, x), _zeros(), backward_writer=calls.append)
        if lib is compat:  # unconverged: compat warns in torchdeq's terms
            with pytest.warns(RuntimeWarning, match=f"stopped at b_max_iter={b_max_iter} .*b_tol=1e-12"):
                grads = torch.autograd.grad((z[-1] ** 2).sum(), (W, x))
        else:
            grads = torch.autograd.grad((z[-1] ** 2).sum(), (W, x))
        assert len(calls) == 1
        seen.append((calls[0], grads))
    (ref, ref_grads), (info, grads) = seen
    _assert_info_like(info, ref, values=b_solver != "anderson", rtol=1e-7)
    if b_solver != "anderson":
        for g, g_ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-12)


# --- b_max_iter = 0 ---------------------------------------------------------------------------

def test_b_max_iter_zero():
    """Unused without an IFT gradient: taken, as torchdeq; with one, torchdeq's adjoint returns u = 0
    (a zero gradient through the state): a clear error, as for Anderson's b_max_iter <= 2."""
    W, x = _problem(9)
    z, _ = compat.get_deq(b_max_iter=0, grad=2)(_f(W, x), _zeros())
    z_ref, _ = torchdeq.get_deq(b_max_iter=0, grad=2)(_f(W, x), _zeros())
    torch.testing.assert_close(z[-1], z_ref[-1], rtol=1e-6, atol=1e-6)
    for kw in (dict(ift=True, b_max_iter=0), dict(hook_ift=True, b_max_iter=0),
               dict(ift=True, b_solver="anderson", b_max_iter=2)):
        with pytest.raises(ValueError, match="b_max_iter"):
            compat.get_deq(**kw)


# --- the returned state: container, requires_grad ---------------------------------------------

@pytest.mark.parametrize("container", [tuple, list])
@pytest.mark.parametrize("f_max_iter", [0, 3])
@pytest.mark.parametrize("train", [True, False])
def test_simple_fixed_point_iter_keeps_f_container(container, f_max_iter, train):
    """torchdeq's no_stat wrapper (simple_fixed_point_iter) hands back what made the state: f's own
    container, or z_init's when no step was made; a damped call (tau != 1) makes a list."""
    W, x = _problem(10)
    for kw in (dict(grad=1), dict(grad=2, tau=0.5)):
        types = []
        for lib in (torchdeq, compat):
            deq = lib.get_deq(f_solver="simple_fixed_point_iter", f_max_iter=f_max_iter, **kw)
            deq.train(train)
            z_init = (_zeros((B, 2)), _zeros((B, 4)))
            with torch.no_grad():
                z, _ = deq(_split_f(W, x, container), z_init)
            types.append([type(s) for s in z])
        assert types[0] == types[1], (kw, types)


@pytest.mark.parametrize("state", ["tensor", "list"])
def test_sradius_mode_returns_z_requiring_grad(state):
    """torchdeq's _sradius calls z_star.requires_grad_() in place: the returned z* requires grad."""
    W, x = _problem(11)
    for grad_mode in (torch.enable_grad, torch.no_grad):
        flags = []
        for lib in (torchdeq, compat):
            deq = lib.get_deq(f_max_iter=10)
            deq.eval()
            z_init = _zeros() if state == "tensor" else [_zeros((B, 2)), _zeros((B, 4))]
            f = _f(W, x) if state == "tensor" else _split_f(W, x, list)
            with grad_mode():
                z, info = deq(f, z_init, sradius_mode=True)
            parts = [z[0]] if state == "tensor" else z[0]
            flags.append([p.requires_grad for p in parts])
            assert info["sradius"].shape == (B,)
        assert flags[0] == flags[1] == [True] * len(flags[0])


def test_no_step_returns_z_init():
    """A solve that makes no step returns x0 itself, as torchdeq's (lowest_xest = x0): a z_init
    that requires grad comes back requiring grad."""
    W, x = _problem(12)
    for f_solver in ("fixed_point_iter", "anderson", "broyden"):
        flags = []
        for lib in (torchdeq, compat):
            deq = lib.get_deq(f_solver=f_solver, f_max_iter=0)
            deq.eval()
            z_init = _zeros().requires_grad_()
            z, _ = deq(_f(W, x), z_init)
            flags.append((z[0].requires_grad, z[0] is z_init))
        assert flags[0] == flags[1] == (True, True), f_solver
