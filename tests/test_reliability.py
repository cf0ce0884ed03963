"""Reliability fixes (issue 9): constants in the state's dtype, no anomaly from masked values,
history sized by what a solve can fill, nothing run for nothing, an inexact adjoint made visible."""
import warnings

import pytest
import torch

import deqfast
from deqfast import ops, reference

COMPILED = deqfast.extension_info()["compiled"]


@pytest.mark.parametrize("default", [torch.float16, torch.float32, torch.float64])
def test_ridge_is_built_in_the_state_accumulation_dtype(default):
    """λ = 1e-8 must reach a float64 solve as the float64 1e-8, whatever torch's default dtype
    (under float16 it rounds to 0, under float32 to 9.99999993922529e-09)."""
    lam = 1e-8
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        reference._weight_constants.cache_clear()
        filled, ridge, fallback = reference._weight_constants(4, 3, 1, lam, torch.float64, torch.device("cpu"))
    finally:
        torch.set_default_dtype(previous)
        reference._weight_constants.cache_clear()
    assert ridge.dtype == torch.float64 and fallback.dtype == torch.float64
    assert ridge.diagonal(dim1=1, dim2=2)[0].tolist() == [lam, lam, lam, 1.0]


@pytest.mark.skipif(not COMPILED, reason="deqfast._C is not compiled")
@pytest.mark.parametrize("default", [torch.float16, torch.float32])
def test_fused_equals_reference_in_float64_with_a_small_ridge(default, monkeypatch):
    g = torch.Generator().manual_seed(3)
    B, d = 4, 40
    W = torch.randn(d, d, generator=g, dtype=torch.float64)
    W = 0.95 * W / torch.linalg.matrix_norm(W, 2)
    c = torch.randn(B, d, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + c)  # noqa: E731
    kw = dict(m=6, lam=1e-8, tol=0.0, max_iter=12)
    z_fused, _ = deqfast.solvers.anderson(f, torch.zeros(B, d, dtype=torch.float64), **kw)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        reference._weight_constants.cache_clear()
        monkeypatch.setattr(ops, "use_fused", lambda *a, **k: False)
        z_ref, _ = deqfast.solvers.anderson(f, torch.zeros(B, d, dtype=torch.float64), **kw)
    finally:
        torch.set_default_dtype(previous)
        reference._weight_constants.cache_clear()
    torch.testing.assert_close(z_ref, z_fused, rtol=0, atol=1e-13)


@pytest.mark.parametrize("cell", ["tanh", "affine"])
@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_bptt_under_detect_anomaly_raises_no_false_alarm(solver, cell):
    """Masked-out values (empty history slots, frozen samples) must not produce NaN gradients that
    torch.where then discards: detect_anomaly sees those. The gradient equals the one without it."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(5, 5, generator=g, dtype=torch.float64)
    W = (0.5 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    x = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    if cell == "tanh":
        f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    else:  # Anderson and Broyden solve it exactly: zero residuals in the history
        f = lambda z: z @ W.T + x  # noqa: E731
    kw = dict(solver=solver, backward="bptt", max_iter=30, tol=1e-8, m=5)

    def grads():
        z, stats = deqfast.fixed_point(f, torch.zeros(3, 5, dtype=torch.float64), **kw)
        return torch.autograd.grad(z.square().sum(), [W, x])

    expected = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # detect_anomaly's own "enabled" warning
        with torch.autograd.detect_anomaly():
            got = grads()
    for a, b in zip(got, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_anderson_history_is_sized_by_what_the_solve_can_fill(path, monkeypatch):
    """m = 4000 with max_iter = 3 allocates 3 slots, and decides exactly as m = 3."""
    if path == "fused" and not COMPILED:
        pytest.skip("deqfast._C is not compiled")
    if path == "reference":
        monkeypatch.setattr(ops, "use_fused", lambda *a, **k: False)
    slots = []
    real = ops.anderson_history
    monkeypatch.setattr(ops, "anderson_history", lambda x, fx, F, G, slot, fused=None: (
        slots.append(F.shape[1]) or real(x, fx, F, G, slot, fused=fused)))
    real_one = ops.anderson_fused_step  # the fused path's one op call per step
    monkeypatch.setattr(ops, "anderson_fused_step", lambda x, fx, F, *rest: (
        slots.append(F.shape[1]) or real_one(x, fx, F, *rest)))
    g = torch.Generator().manual_seed(6)
    c = torch.randn(2, 7, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(0.7 * z.flip(1) + c)  # noqa: E731
    z_big, s_big = deqfast.solvers.anderson(f, torch.zeros(2, 7, dtype=torch.float64), m=4000, max_iter=3, tol=0.0)
    assert slots == [3, 3, 3]
    z_small, s_small = deqfast.solvers.anderson(f, torch.zeros(2, 7, dtype=torch.float64), m=3, max_iter=3, tol=0.0)
    assert torch.equal(z_big, z_small) and torch.equal(s_big.residual, s_small.residual)


def _runtime_warnings(records):
    return [r for r in records if issubclass(r.category, RuntimeWarning)]


def test_an_adjoint_stopped_far_from_tol_warns_how_far_and_what_to_change():
    """f = 0.999 z + b: the exact gradient of sum(z*) wrt b is 1 / (1 - 0.999) = 1000 per element;
    5 adjoint iterations give 1 + ... + 0.999^5 ~ 5.99. The warning says so, at the user's line."""
    b = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    z, stats = deqfast.fixed_point(lambda z: 0.999 * z + b, torch.zeros(3, 4, dtype=torch.float64),
                                   max_iter=200, tol=1e-12, backward_max_iter=5)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        z.sum().backward(); line = __import__("inspect").currentframe().f_lineno  # noqa: E702
    (w,) = _runtime_warnings(records)
    message = str(w.message)
    assert w.filename == __file__ and w.lineno == line
    assert "deqfast.fixed_point" in message and "backward_max_iter=5" in message
    assert "backward_tol=1e-06" in message and "3 of 3 samples" in message
    assert "backward_solver='anderson'" in message
    residual = float(stats.backward.rel_residual.max())
    assert f"{residual:.3g}" in message and residual > 1e-3
    assert float(b.grad.max()) < 10  # the inexact gradient the warning is about (exact: 1000)


@pytest.mark.parametrize("backward_solver", ["fixed_point", "anderson", "broyden"])
def test_a_converged_or_nearly_converged_adjoint_is_quiet(backward_solver):
    b = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        z, _ = deqfast.fixed_point(lambda z: 0.5 * z + b, torch.zeros(3, 4, dtype=torch.float64), tol=1e-12,
                                   backward_solver=backward_solver)
        z.sum().backward()
        # A modest miss: 0.5^k after k steps, stopped within 10x of backward_tol.
        z, stats = deqfast.fixed_point(lambda z: 0.5 * z + b, torch.zeros(3, 4, dtype=torch.float64), tol=1e-12,
                                       backward_max_iter=17, backward_tol=2e-6)
        z.sum().backward()
    assert not _runtime_warnings(records), [str(r.message) for r in records]
    if backward_solver == "fixed_point":
        assert not stats.backward.converged.any()  # the second solve did miss backward_tol
    torch.testing.assert_close(b.grad[0, 0].item(), 4.0, rtol=1e-4, atol=0)


def _nan_cell(z):
    return torch.where(torch.tensor([True, False])[:, None], torch.full_like(z, float("nan")), 0.5 * z + 1)


@pytest.mark.parametrize("entry,expected", [
    ("fixed_point", "deqfast.fixed_point"),
    ("DEQ", "deqfast.DEQ"),
    ("DEQ_in_sequential", "deqfast.DEQ"),
    ("anderson", "deqfast.solvers.anderson"),
    ("fixed_point_iteration", "deqfast.solvers.fixed_point_iteration"),
    ("broyden", "deqfast.solvers.broyden"),
])
@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_warnings_point_at_the_user_line_and_name_the_entry(entry, expected, solver):
    if entry in ("anderson", "fixed_point_iteration", "broyden") and solver != "anderson":
        pytest.skip("one run per solver entry")
    z0 = torch.zeros(2, 3)
    layer = deqfast.DEQ(lambda z, x: _nan_cell(z), solver=solver)
    model = torch.nn.Sequential(torch.nn.Identity(), layer)
    import inspect
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        here = inspect.currentframe
        if entry == "fixed_point":
            line = here().f_lineno + 1
            deqfast.fixed_point(_nan_cell, z0, solver=solver)
        elif entry == "DEQ":
            line = here().f_lineno + 1
            layer(z0)
        elif entry == "DEQ_in_sequential":
            line = here().f_lineno + 1
            model(z0)
        else:
            line = here().f_lineno + 1
            getattr(deqfast.solvers, entry)(_nan_cell, z0)
    (w,) = _runtime_warnings(records)
    assert w.filename == __file__ and w.lineno == line, (w.filename, w.lineno, line)
    assert str(w.message).startswith(expected + " ("), str(w.message)


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("solver", ["anderson", "fixed_point_iteration", "broyden"])
@pytest.mark.parametrize("shape", [(0, 4), (0, 2, 3)])
def test_solvers_on_an_empty_batch_return_empty_results(solver, shape, path, monkeypatch):
    if path == "fused" and not COMPILED:
        pytest.skip("deqfast._C is not compiled")
    if path == "reference":
        monkeypatch.setattr(ops, "use_fused", lambda *a, **k: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, stats = getattr(deqfast.solvers, solver)(lambda z: 0.5 * z + 1, torch.zeros(shape), max_iter=5)
    assert z.shape == shape
    for name in ("nstep", "residual", "rel_residual", "converged", "failed"):
        assert getattr(stats, name).shape == (0,), name


@pytest.mark.parametrize("backward", ["implicit", "neumann", "jfb", "phantom", "bptt"])
@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_an_empty_batch_gives_an_empty_result_and_empty_gradients(solver, backward):
    """As torch layers do: B = 0 in, B = 0 out, and the gradient of the empty result is empty
    (zero for parameters)."""
    x = torch.randn(0, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    layer = deqfast.DEQ(lambda z, x: torch.tanh(w * z + x), solver=solver, backward=backward)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = layer(x)
        z.sum().backward()
    assert z.shape == (0, 2, 3) and z.requires_grad
    assert layer.stats.batch_size == 0 and layer.stats.converged.shape == (0,)
    assert layer.stats.summary().startswith("0/0 converged")
    assert x.grad.shape == (0, 2, 3)
    assert w.grad is not None and w.grad.item() == 0.0


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("backward", ["implicit", "neumann", "jfb", "phantom", "bptt"])
@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden"])
def test_samples_of_no_element_are_solved_as_the_solvers_solve_them(solver, backward, per_sample):
    """A (B, 0) state: the solvers take it (trivially converged, tests/test_solvers.py); fixed_point
    and DEQ crashed on it (an IndexError from amax in the norms of the returned f(z*), or from
    Anderson's recorded step under bptt). Now the same: converged, empty result, zero gradients."""
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x = torch.zeros(3, 0, dtype=torch.float64, requires_grad=True)
    layer = deqfast.DEQ(lambda z, x: torch.tanh(w * z + x), solver=solver, backward=backward, per_sample=per_sample)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = layer(x)
        if backward == "bptt" and not z.requires_grad:  # the solver's output is z0 itself: no graph
            z = z + 0 * w
        z.sum().backward()
    assert z.shape == (3, 0)
    assert layer.stats.converged.tolist() == [True] * 3 and layer.stats.residual.tolist() == [0.0] * 3
    assert (x.grad is None or x.grad.shape == (3, 0)) and (w.grad is None or w.grad.item() == 0.0)
    if layer.stats.backward is not None:
        assert bool(layer.stats.backward.converged.all())


def test_jacobian_penalty_of_samples_of_no_element_is_zero():
    penalty = deqfast.jacobian_penalty(lambda z: 0.5 * z, torch.zeros(3, 0))
    assert penalty.tolist() == [0.0, 0.0, 0.0]
