"""deqfast.compat.get_deq against torchdeq 0.1.0's get_deq, keyword for keyword.

Both are built with the same keywords and run on the same float64 contractive cell
f(z) = tanh(W z + U x + b), ‖W‖₂ = 0.7, B = 4, d = 16.

Tolerances. The two libraries do not return the same point of the trajectory: torchdeq's
fixed-point and Anderson solvers return f(x) at their best iterate x, and its training graph applies
one more f (IFT / 1-step) or the phantom steps to that; deqfast returns f(z*) at its best iterate z*
(in training and eval mode alike). Both solves stop with a residual ‖f(z) − z‖ ≤ r, r = f_tol = 1e-10
("abs") or f_tol·‖f(z)‖ ≤ 1e-10·√16 ("rel", |tanh| ≤ 1), and f is a 0.7-contraction, so each returned
point lies within r / (1 − 0.7) ≤ 1.4e-9 of the exact fixed point: the two agree to 3e-9, and we
check 1e-8. The gradients are smooth functions of that point and of the adjoint (solved to
b_tol = 1e-10), with condition ~1/(1 − 0.7): we check 1e-7 relative (seen: ~1e-10).
"""
import argparse
import itertools

import pytest
import torch

torchdeq = pytest.importorskip("torchdeq")

import deqfast  # noqa: E402
from deqfast.compat import get_deq  # noqa: E402

DT = torch.float64
B, D, D_IN = 4, 16, 8
L = 0.7
TIGHT = dict(f_tol=1e-10, f_max_iter=200, b_tol=1e-10, b_max_iter=200)
Z_ATOL = 1e-8
GRAD_RTOL = 1e-7
SOLVERS = ["anderson", "fixed_point_iter", "broyden"]
TORCHDEQ_INFO_KEYS = ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep", "sradius")


def _problem(seed=0, d=D):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=DT)
    W = L * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(d, D_IN, generator=g, dtype=DT) / D_IN ** 0.5
    b = 0.1 * torch.randn(d, generator=g, dtype=DT)
    x = torch.randn(B, D_IN, generator=g, dtype=DT)
    z0 = torch.randn(B, d, generator=g, dtype=DT)
    c = torch.randn(B, d, generator=g, dtype=DT)  # weights of the random linear loss
    params = [t.requires_grad_() for t in (W, U, b, x)]
    return params, z0, c


def _func(params):
    W, U, b, x = params
    return lambda z: torch.tanh(z @ W.T + x @ U.T + b)


def _run(deq, train, params, z0, c, **call_kw):
    deq.train(train)
    z_list, info = deq(_func(params), z0, **call_kw)
    assert isinstance(z_list, list) and len(z_list) == 1
    z = z_list[0]
    assert isinstance(z, torch.Tensor) and z.shape == z0.shape and z.dtype == DT
    grads = torch.autograd.grad((z * c).sum(), params) if train else None
    return z, grads, info


def _assert_grads_close(actual, expected, rtol=GRAD_RTOL):
    for name, a, e in zip("WUbx", actual, expected):
        err = float((a - e).norm() / e.norm())
        assert err < rtol, f"grad {name}: relative error {err:.3e}"


def _assert_info(info, reference, stop_mode, tol=TIGHT["f_tol"]):
    """deqfast's info carries torchdeq's keys with torchdeq's shapes and converged residuals."""
    reference = {key: None for key in TORCHDEQ_INFO_KEYS} if reference is None else reference
    assert set(reference) >= set(TORCHDEQ_INFO_KEYS)
    for key in reference:
        assert key in info, key
    for key in ("abs_lowest", "rel_lowest", "nstep"):
        assert reference[key] is None or reference[key].shape == (B,)
        assert info[key].shape == (B,), key
        assert info[key].is_floating_point(), key  # torchdeq's are floating point, nstep included
    if reference["sradius"] is not None:
        assert info["sradius"].shape == reference["sradius"].shape
    for key in ("abs_trace", "rel_trace"):  # (B, N); deqfast keeps only the final value (N = 1)
        assert info[key].dim() == 2 and info[key].shape[0] == B, key
        torch.testing.assert_close(info[key][:, -1], info[key.replace("trace", "lowest")])
    assert (info[f"{stop_mode}_lowest"] < tol).all(), info[f"{stop_mode}_lowest"]
    assert (info["nstep"] >= 1).all()


# ---------------------------------------------------------------------------------------------
# Values and gradients, training mode, every gradient configuration
# ---------------------------------------------------------------------------------------------

GRAD_CONFIGS = [
    # (ift, grad, tau): with ift the last (only) state gets IFT and grad/tau are unused
    pytest.param(dict(ift=True), id="ift"),
    pytest.param(dict(ift=True, grad=3, tau=0.6), id="ift-grad3-tau0.6"),
    pytest.param(dict(ift=False, grad=1, tau=1.0), id="grad1-tau1.0"),
    pytest.param(dict(ift=False, grad=1, tau=0.6), id="grad1-tau0.6"),
    pytest.param(dict(ift=False, grad=3, tau=1.0), id="grad3-tau1.0"),
    pytest.param(dict(ift=False, grad=3, tau=0.6), id="grad3-tau0.6"),
]


@pytest.mark.parametrize("grad_config", GRAD_CONFIGS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("f_solver", SOLVERS)
def test_train_matches_torchdeq(f_solver, stop_mode, grad_config):
    kw = dict(f_solver=f_solver, f_stop_mode=stop_mode, **TIGHT, **grad_config)
    params, z0, c = _problem(seed=10 * SOLVERS.index(f_solver) + ("abs", "rel").index(stop_mode))
    z_ref, g_ref, info_ref = _run(torchdeq.get_deq(**kw), True, params, z0, c)
    z, g, info = _run(get_deq(**kw), True, params, z0, c)
    torch.testing.assert_close(z, z_ref, atol=Z_ATOL, rtol=0)
    _assert_grads_close(g, g_ref)
    _assert_info(info, info_ref, stop_mode)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(dict(hook_ift=True), id="hook_ift"),
        pytest.param(dict(ift=True, b_solver="anderson"), id="b_solver-anderson"),
        pytest.param(dict(ift=True, b_solver="broyden"), id="b_solver-broyden"),
        pytest.param(dict(ift=True, core="indexing"), id="core-indexing-ift"),
        pytest.param(dict(grad=2, tau=0.8, core="indexing"), id="core-indexing-grad2"),
    ],
)
def test_train_matches_torchdeq_other_keywords(extra):
    kw = dict(f_solver="anderson", **TIGHT, **extra)
    params, z0, c = _problem(seed=11)
    z_ref, g_ref, _ = _run(torchdeq.get_deq(**kw), True, params, z0, c)
    z, g, _ = _run(get_deq(**kw), True, params, z0, c)
    torch.testing.assert_close(z, z_ref, atol=Z_ATOL, rtol=0)
    _assert_grads_close(g, g_ref)


def test_gradient_configuration_matters():
    """The comparison above can fail: the configurations give measurably different gradients."""
    params, z0, c = _problem(seed=5)
    grads = {}
    for name, cfg in [("ift", dict(ift=True)), ("jfb", dict(grad=1)), ("phantom", dict(grad=3, tau=0.6))]:
        grads[name] = _run(get_deq(f_solver="anderson", **TIGHT, **cfg), True, params, z0, c)[1]
    for a, b in itertools.combinations(grads, 2):
        rel = max(float((x - y).norm() / y.norm()) for x, y in zip(grads[a], grads[b]))
        assert rel > 1e3 * GRAD_RTOL, (a, b, rel)


# ---------------------------------------------------------------------------------------------
# Eval mode
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("f_solver", SOLVERS)
def test_eval_matches_torchdeq(f_solver, stop_mode):
    kw = dict(f_solver=f_solver, f_stop_mode=stop_mode, ift=True, **TIGHT)
    params, z0, c = _problem(seed=21)
    with torch.no_grad():
        z_ref, _, info_ref = _run(torchdeq.get_deq(**kw), False, params, z0, c)
        z, _, info = _run(get_deq(**kw), False, params, z0, c)
        torch.testing.assert_close(z, z_ref, atol=Z_ATOL, rtol=0)
        _assert_info(info, info_ref, stop_mode)
        # The residuals reported are those of the point returned (eval returns the solver's z*,
        # or f(z*)): ‖f(z) − z‖ recomputed here, up to the rounding of one evaluation of f.
        # (f(z*) has the smaller residual ‖f(f(z*)) − f(z*)‖ ≤ 0.7‖f(z*) − z*‖.)
        residual = (_func(params)(z) - z).norm(dim=1)
        assert (residual <= info["abs_lowest"] + 1e-13).all(), (residual, info["abs_lowest"])


@pytest.mark.parametrize("keyword,value,expected_steps", [("eval_f_max_iter", 4, 4), ("eval_factor", 0.1, 5)])
def test_eval_max_iter_keywords(keyword, value, expected_steps):
    """Unconverged on purpose: both run plain iteration from the same z0, so the best residual of the
    first few iterates is the same number in both libraries."""
    kw = dict(f_solver="fixed_point_iter", f_max_iter=50, f_tol=1e-12, **{keyword: value})
    params, z0, c = _problem(seed=31)
    with torch.no_grad():
        _, _, info_ref = _run(torchdeq.get_deq(**kw), False, params, z0, c)
        _, _, info = _run(get_deq(**kw), False, params, z0, c)
    assert (info_ref["abs_lowest"] > 1e-6).all()  # really unconverged
    torch.testing.assert_close(info["abs_lowest"], info_ref["abs_lowest"], rtol=1e-12, atol=0)
    assert info["nstep"].tolist() == [float(expected_steps)] * B
    assert info_ref["nstep"].tolist() == [float(expected_steps)] * B


def test_eval_sradius_mode():
    params, z0, c = _problem(seed=41)
    deq = get_deq(f_solver="anderson", **TIGHT)
    deq.eval()
    with torch.no_grad():
        _, info = deq(_func(params), z0, sradius_mode=True)
    radius = info["sradius"]
    assert radius.shape == (B,)
    # |vᵀ J v| / ‖v‖² ≤ ‖J‖₂ ≤ ‖W‖₂ · max tanh' ≤ 0.7, and J ≠ 0.
    assert (radius > 0).all() and (radius <= L + 1e-12).all(), radius


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keyword", ["f_sovler", "max_iter", "learning_rate"])
def test_unknown_keyword_warns_once_and_is_ignored(keyword):
    """torchdeq takes any keyword into its config and ignores what it does not read; compat does the
    same, and says so once, naming the keyword. The DEQ built is the one without it."""
    import deqfast.compat.utils as cu
    cu._warned.discard(("deqfast.compat.get_deq", keyword))
    with pytest.warns(UserWarning, match=rf"ignoring keyword\(s\) '{keyword}'"):
        deq = get_deq(**{keyword: 1}, f_solver="anderson", **TIGHT)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_deq(**{keyword: 1})  # once only
    params, z0, c = _problem(seed=12)
    z, g, _ = _run(deq, True, params, z0, c)
    z_plain, g_plain, _ = _run(get_deq(f_solver="anderson", **TIGHT), True, params, z0, c)
    assert torch.equal(z, z_plain) and all(torch.equal(a, b) for a, b in zip(g, g_plain))


@pytest.mark.parametrize(
    "config",
    [dict(core="indexing", n_states=2), dict(core="indexing", indexing=[3]), dict(core="sliced", sup_gap=2, grad=4),
     dict(core="sliced", sup_loc=[1], grad=3), dict(core="indexing", sup_loc=[2], grad=3, n_states=2)],
    ids=["indexing-n_states", "indexing-indexing", "sup_gap", "sup_loc", "indexing-sup_loc"],
)
def test_formerly_refused_features_match_torchdeq(config):
    """sup_gap, sup_loc and several states of the indexing core (refused before) give torchdeq's
    states and gradients: fixed-point iteration, whose trajectory compat reproduces exactly."""
    kw = dict(f_solver="fixed_point_iter", f_max_iter=12, f_tol=1e-12, **config)
    params, z0, c = _problem(seed=13)
    out = []
    for make in (torchdeq.get_deq, get_deq):
        deq = make(**kw)
        deq.train()
        z_list, info = deq(_func(params), z0)
        loss = sum(((i + 1) * z * c).sum() for i, z in enumerate(z_list))
        out.append((z_list, torch.autograd.grad(loss, params), info))
    (z_ref, g_ref, info_ref), (z, g, info) = out
    assert len(z) == len(z_ref) > 1
    for a, b in zip(z, z_ref):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)
    _assert_grads_close(g, g_ref, rtol=1e-11)
    for key in ("abs_lowest", "rel_lowest", "nstep"):
        torch.testing.assert_close(info[key], info_ref[key].to(info[key].dtype), rtol=1e-11, atol=0)


# ---------------------------------------------------------------------------------------------
# Several sampled states (the sliced core): n_states, indexing, a grad per state
# ---------------------------------------------------------------------------------------------

def _run_states(deq, params, z0, c):
    """Every sampled state and the gradient of a loss on all of them (a fixed-point correction loss)."""
    deq.train(True)
    z_list, info = deq(_func(params), z0)
    loss = sum(((i + 1) * z * c).sum() for i, z in enumerate(z_list))
    return z_list, torch.autograd.grad(loss, params), info


STATE_CONFIGS = [
    pytest.param(dict(n_states=2), id="n_states2"),
    pytest.param(dict(n_states=3, grad=2, tau=0.7), id="n_states3-grad2"),
    pytest.param(dict(n_states=3, grad=[1, 3, 2], tau=0.8), id="n_states3-grad-per-state"),
    pytest.param(dict(n_states=2, ift=True), id="n_states2-ift"),
    pytest.param(dict(indexing=[100, 200], f_max_iter=300), id="indexing"),
    pytest.param(dict(indexing=[150], f_max_iter=300, grad=[2, 1], ift=True), id="indexing-ift"),
]


@pytest.mark.parametrize("config", STATE_CONFIGS)
@pytest.mark.parametrize("f_solver", ["fixed_point_iter", "anderson"])
def test_sampled_states_match_torchdeq(f_solver, config):
    """Every slice converges (tight tolerances), so each sampled state is the fixed point plus its
    own gradient steps in both libraries, which then agree as the single-state tests do."""
    kw = {**TIGHT, "f_solver": f_solver, **config}
    params, z0, c = _problem(seed=61)
    z_ref, g_ref, info_ref = _run_states(torchdeq.get_deq(**kw), params, z0, c)
    z, g, info = _run_states(get_deq(**kw), params, z0, c)
    assert len(z) == len(z_ref) > 1
    for a, b in zip(z, z_ref):
        torch.testing.assert_close(a, b, atol=Z_ATOL, rtol=0)
    _assert_grads_close(g, g_ref)


@pytest.mark.parametrize(
    "config,slices",
    [(dict(n_states=3), [2, 2, 2]), (dict(indexing=[1, 3]), [1, 2, 4]), (dict(n_states=2, grad=[2, 3], tau=0.6), [3, 3])],
)
def test_sampled_states_equal_explicit_unrolling(config, slices):
    """Slices that do not converge (simple_fixed_point_iter: tol 0), against the states unrolled by
    hand: slice i evaluates f ``slices[i]`` times from the previous state (detached), its best
    iterate is the last point evaluated (f is a contraction), and the state is f there (grad 1,
    tau 1: JFB) or ``grad`` damped steps from it; slice lengths as torchdeq's DEQSliced (7 // 3 = 2)."""
    kw = dict(f_solver="simple_fixed_point_iter", f_max_iter=7, **config)
    params, z0, c = _problem(seed=62)
    z, g, _ = _run_states(get_deq(**kw), params, z0, c)

    f = _func(params)
    grads = config.get("grad", 1)
    grads = grads if isinstance(grads, list) else [grads] * len(slices)
    tau = config.get("tau", 1.0)
    state, expected = z0, []
    for n, k in zip(slices, grads):
        with torch.no_grad():
            x = state
            for _ in range(n):  # torchdeq's simple_fixed_point_iter returns f after n evaluations
                x = f(x)
        for _ in range(k):
            x = (1 - tau) * x + tau * f(x)
        expected.append(x)
        state = x.detach()
    assert len(z) == len(expected)
    for a, b in zip(z, expected):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)
    loss = sum(((i + 1) * e * c).sum() for i, e in enumerate(expected))
    _assert_grads_close(g, torch.autograd.grad(loss, params), rtol=1e-12)


def test_sampled_states_bad_configuration():
    with pytest.raises(ValueError, match=r"indexing must be increasing positive steps, got \[5, 3\]"):
        get_deq(f_max_iter=10, indexing=[5, 3])
    with pytest.raises(ValueError, match=r"grad must have 1 entry or one per sampled state \(3\), got \[1, 2\]"):
        get_deq(n_states=3, grad=[1, 2])


def test_more_states_than_iterations_matches_torchdeq():
    """torchdeq accepts n_states > f_max_iter (slices of 0 iterations: only the gradient steps)."""
    kw = dict(n_states=5, f_max_iter=4, grad=2, tau=0.7)
    params, z0, c = _problem(seed=14)
    z_ref, g_ref, _ = _run_states(torchdeq.get_deq(**kw), params, z0, c)
    z, g, _ = _run_states(get_deq(**kw), params, z0, c)
    assert len(z) == len(z_ref) == 5
    for a, b in zip(z, z_ref):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)
    _assert_grads_close(g, g_ref, rtol=1e-12)


@pytest.mark.parametrize("keyword", ["f_solver", "b_solver"])
def test_unknown_solver_lists_valid(keyword):
    with pytest.raises(ValueError, match=rf"\b{keyword}\b.*newton") as info:
        get_deq(**{keyword: "newton"})
    for name in ("anderson", "broyden", "fixed_point_iter"):
        assert name in str(info.value)


def test_unknown_solver_kwarg_and_line_search_warn():
    """torchdeq's solvers ignore keywords they do not read (beta, threshold); compat warns once and
    ignores them. Broyden line search (ls=True) is not implemented: it warns and solves without it."""
    import deqfast.compat.utils as cu
    cu._warned.clear()
    params, z0, _ = _problem(seed=51)
    deq = get_deq(f_solver="broyden", **TIGHT)
    z_plain, _ = deq(_func(params), z0)
    for skw, name in ((dict(threshold=3), "threshold"), (dict(beta=0.5), "beta"), (dict(ls=True), "ls")):
        with pytest.warns(UserWarning, match=rf"'{name}'"):
            z, info = deq(_func(params), z0, solver_kwargs=skw)
        assert torch.equal(z[0], z_plain[0])


# ---------------------------------------------------------------------------------------------
# solver_kwargs pass through
# ---------------------------------------------------------------------------------------------


def _stats_triplet(info):
    return info["abs_lowest"], info["rel_lowest"], info["nstep"]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "f_solver,solver_kwargs,direct",
    [
        ("anderson", dict(m=3, lam=1e-2, tau=0.5, f_max_iter=7),
         lambda f, z0, tol: deqfast.solvers.anderson(f, z0, max_iter=7, tol=tol, stop_mode="abs", m=3, lam=1e-2, tau=0.5)),
        # torchdeq's damped fixed-point iteration iterates (and reports the residual of) the damped map.
        ("fixed_point_iter", dict(tau=0.5, f_max_iter=5),
         lambda f, z0, tol: deqfast.solvers.fixed_point_iteration(lambda z: 0.5 * f(z) + 0.5 * z, z0, max_iter=5,
                                                                   tol=tol, stop_mode="abs")),
    ],
)
def test_solver_kwargs_pass_through(f_solver, solver_kwargs, direct, train):
    """The call's solver_kwargs reach the solver: the statistics are those of deqfast's solver called
    with the translated keywords, and dropping any one of the keywords changes them."""
    kw = dict(f_solver=f_solver, ift=True, **TIGHT)
    params, z0, c = _problem(seed=61)
    f = _func(params)
    with torch.no_grad():
        _, expected = direct(f, z0, TIGHT["f_tol"])

    def stats_with(skw):
        deq = get_deq(**kw)
        deq.train(train)
        _, info = deq(f, z0, solver_kwargs=skw)
        return _stats_triplet(info)

    got = stats_with(solver_kwargs)
    # Unconverged, residuals decreasing: the lowest is at the last step (torchdeq's nstep: its step).
    assert got[2].tolist() == [float(solver_kwargs["f_max_iter"])] * B
    assert got[2].tolist() == expected.nstep.double().tolist()
    # torchdeq's relative residual has 1e-9 in its denominator, deqfast's none.
    torch.testing.assert_close(got[0], expected.residual, rtol=1e-12, atol=0)
    torch.testing.assert_close(got[1], expected.rel_residual, rtol=1e-8, atol=0)
    for key in solver_kwargs:
        dropped = stats_with({k: v for k, v in solver_kwargs.items() if k != key})
        assert not torch.equal(dropped[0], got[0]), f"dropping {key} changed nothing"

    # torchdeq takes the same solver_kwargs, and stops within the same budget.
    deq_ref = torchdeq.get_deq(**kw)
    deq_ref.train(train)
    _, info_ref = deq_ref(f, z0, solver_kwargs=dict(solver_kwargs))
    assert (info_ref["nstep"] <= solver_kwargs["f_max_iter"]).all()


# ---------------------------------------------------------------------------------------------
# backward_writer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("f_solver", SOLVERS)
def test_backward_writer_called_once_with_ift(f_solver):
    kw = dict(f_solver=f_solver, ift=True, **TIGHT)
    params, z0, c = _problem(seed=71)
    calls = {"torchdeq": [], "deqfast": []}
    for name, make in (("torchdeq", torchdeq.get_deq), ("deqfast", get_deq)):
        deq = make(**kw)
        deq.train()
        z_list, _ = deq(_func(params), z0, backward_writer=calls[name].append)
        assert calls[name] == []  # not before backward
        torch.autograd.grad((z_list[0] * c).sum(), params)
        assert len(calls[name]) == 1, name
    ref, info = calls["torchdeq"][0], calls["deqfast"][0]
    for key in ref:
        assert key in info, key
    for key in ("abs_lowest", "rel_lowest", "nstep"):
        assert info[key].shape == (B,), key
    # The backward solve (b_stop_mode "abs") converged to b_tol in both.
    assert (ref["abs_lowest"] < TIGHT["b_tol"]).all()
    assert (info["abs_lowest"] < TIGHT["b_tol"]).all(), info["abs_lowest"]


@pytest.mark.parametrize("b_solver", SOLVERS)
def test_backward_writer_reports_the_backward_solve(b_solver):
    """With few adjoint steps the writer sees that unconverged solve, not the converged forward, in
    torchdeq's form: traces of b_max_iter + 1 columns (Anderson's b_max_iter - 1), its step numbering.

    torchdeq's fixed-point adjoint starts at u = 0, so its step 1 records ‖g‖ (the residual at 0) and
    its step k the residual at u_{k-1}; deqfast starts at u_1 = g, and compat reports its evaluations
    as torchdeq's steps 2..b_max_iter: the same traces, from no extra VJP. Broyden makes the same
    iterates in both. The gradients agree too (the same u_k at the same b_max_iter)."""
    params, z0, c = _problem(seed=73)
    seen = {}
    for name, make in (("torchdeq", torchdeq.get_deq), ("deqfast", get_deq)):
        calls = []
        kw = dict(f_solver="fixed_point_iter", b_solver=b_solver, ift=True, **{**TIGHT, "b_max_iter": 4})
        deq = make(**kw)
        deq.train()
        z_list, forward_info = deq(_func(params), z0, backward_writer=calls.append)
        grads = torch.autograd.grad((z_list[0] * c).sum(), params)
        assert len(calls) == 1 and (forward_info["abs_lowest"] < TIGHT["f_tol"]).all()
        seen[name] = calls[0], grads
    (ref, ref_grads), (info, grads) = seen["torchdeq"], seen["deqfast"]
    assert (ref["abs_lowest"] > 1e-3).all()  # unconverged
    for key in ("abs_lowest", "rel_lowest", "nstep", "abs_trace", "rel_trace"):
        assert info[key].shape == ref[key].shape and info[key].dtype == ref[key].dtype, key
    assert ref["abs_trace"].shape == (B, 3 if b_solver == "anderson" else 5)
    if b_solver != "anderson":  # deqfast's Anderson is its own
        # J is taken at points 1e-9 apart: the residuals agree far below their size.
        for key in ("abs_lowest", "rel_lowest", "nstep", "abs_trace", "rel_trace"):
            torch.testing.assert_close(info[key], ref[key], rtol=1e-7, atol=0, msg=key)
        _assert_grads_close(grads, ref_grads)
    assert info.deqfast_stats is not None  # deqfast's own SolverStats of the adjoint solve


def test_backward_writer_not_called_without_ift():
    params, z0, c = _problem(seed=72)
    for make in (torchdeq.get_deq, get_deq):
        calls = []
        deq = make(f_solver="anderson", grad=2, tau=0.8, **TIGHT)
        deq.train()
        z_list, _ = deq(_func(params), z0, backward_writer=calls.append)
        torch.autograd.grad((z_list[0] * c).sum(), params)
        assert calls == []


# ---------------------------------------------------------------------------------------------
# A list of states (torchdeq's multi-resolution z)
# ---------------------------------------------------------------------------------------------

D1, SHAPE2 = 6, (2, 5)  # two states: (B, 6) and (B, 2, 5), 16 numbers per sample in all


def _list_problem(seed):
    params, _, _ = _problem(seed=seed, d=D1 + 10)
    g = torch.Generator().manual_seed(seed + 1000)
    zs = [torch.randn(B, D1, generator=g, dtype=DT), torch.randn(B, *SHAPE2, generator=g, dtype=DT)]
    cs = [torch.randn(B, D1, generator=g, dtype=DT), torch.randn(B, *SHAPE2, generator=g, dtype=DT)]
    W, U, b, x = params

    def func(z1, z2):
        assert z1.shape == (B, D1) and z2.shape == (B, *SHAPE2)
        out = torch.tanh(torch.cat([z1, z2.flatten(1)], 1) @ W.T + x @ U.T + b)
        return [out[:, :D1], out[:, D1:].reshape(B, *SHAPE2)]

    return params, func, zs, cs


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "config",
    [
        pytest.param(dict(f_solver="anderson", ift=True), id="anderson-ift"),
        pytest.param(dict(f_solver="fixed_point_iter", ift=True), id="fixed_point_iter-ift"),
        pytest.param(dict(f_solver="broyden", ift=True), id="broyden-ift"),
        pytest.param(dict(f_solver="anderson", grad=3, tau=0.6), id="anderson-grad3-tau0.6"),
    ],
)
def test_list_state_matches_torchdeq(config, train):
    kw = dict(**TIGHT, **config)
    params, func, zs, cs = _list_problem(seed=81)
    results = []
    for make in (torchdeq.get_deq, get_deq):
        deq = make(**kw)
        deq.train(train)
        with torch.set_grad_enabled(train):
            z_list, info = deq(func, zs)
        assert isinstance(z_list, list) and len(z_list) == 1
        out = z_list[0]
        assert isinstance(out, (list, tuple)) and len(out) == 2
        assert [t.shape for t in out] == [t.shape for t in zs]
        grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(out, cs)), params) if train else None
        results.append((out, grads, info))
    (out_ref, g_ref, info_ref), (out, g, info) = results
    for a, e in zip(out, out_ref):
        torch.testing.assert_close(a, e, atol=Z_ATOL, rtol=0)
    if train:
        _assert_grads_close(g, g_ref)
    _assert_info(info, info_ref, "abs")


# ---------------------------------------------------------------------------------------------
# get_deq(args): a program's whole configuration
# ---------------------------------------------------------------------------------------------

DEQ_ARGS = dict(f_solver="anderson", f_stop_mode="rel", grad=3, tau=0.6, **TIGHT)
UNRELATED = dict(lr=1e-3, epochs=10, model="mdeq", m=1, max_iter=1, solver="broyden", seed=3)


@pytest.mark.parametrize("container", ["namespace", "dict"])
def test_get_deq_from_args(container):
    def make_args():  # torchdeq writes keyword overrides into the object it is given: a fresh one each
        values = {**DEQ_ARGS, **UNRELATED}
        return argparse.Namespace(**values) if container == "namespace" else dict(values)

    params, z0, c = _problem(seed=91)
    z_ref, g_ref, _ = _run(torchdeq.get_deq(make_args()), True, params, z0, c)
    z, g, info = _run(get_deq(make_args()), True, params, z0, c)
    torch.testing.assert_close(z, z_ref, atol=Z_ATOL, rtol=0)
    _assert_grads_close(g, g_ref)
    _assert_info(info, None, "rel")
    # Same as passing the torchdeq keys as keywords, bit for bit: the unrelated ones were ignored.
    z_kw, g_kw, _ = _run(get_deq(**DEQ_ARGS), True, params, z0, c)
    assert torch.equal(z, z_kw)
    assert all(torch.equal(a, b) for a, b in zip(g, g_kw))

    # Keywords override args, as in torchdeq.
    z_ref, g_ref, _ = _run(torchdeq.get_deq(make_args(), grad=1, tau=1.0), True, params, z0, c)
    z, g, _ = _run(get_deq(make_args(), grad=1, tau=1.0), True, params, z0, c)
    torch.testing.assert_close(z, z_ref, atol=Z_ATOL, rtol=0)
    _assert_grads_close(g, g_ref)
