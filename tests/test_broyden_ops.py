"""Broyden's fused ops (deqfast::broyden_direction, deqfast::broyden_update) against the pure-PyTorch
reference of deqfast.solvers.broyden and a dense float64 oracle, op by op and whole solves.

Skipped where the extension is not compiled (DEQFAST_DISABLE_EXTENSION=1); CUDA cases are marked.
"""
import importlib

import pytest
import torch

import deqfast
from deqfast import ops

broyden_module = importlib.import_module("deqfast.solvers.broyden")  # the module, not the function

pytestmark = pytest.mark.skipif(not deqfast.extension_info()["compiled"], reason="deqfast._C is not compiled/enabled")

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not (torch.cuda.is_available() and deqfast.extension_info()["cuda"]), reason="needs a CUDA device and CUDA build")])]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance (to the largest |value|) of fused vs reference: sums in another order, and for
# half states a rounding of the result here or there.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
F64 = torch.float64
# (B, d, m, filled, slot): filled < m, filled = 0, m = 1, d not a multiple of any vector width, several
# chunks (4096) with a short last one, slot < filled (the ring wraps) and slot = filled.
CASES = [(3, 7, 4, 2, 2), (2, 5000, 5, 5, 3), (4, 8193, 3, 0, 0), (1, 1, 1, 1, 0), (3, 10, 1, 0, 0),
         (2, 33, 6, 6, 0), (5, 4096, 2, 1, 1)]


def _acc(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _random(B, d, m, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype).to(device)
    # U, V scaled so that H = −I + Σ U_i V_iᵀ is O(1)
    return rand(B, m, d) / d ** 0.5, rand(B, m, d), rand(B, d), rand(B, d), rand(B, d)


def _close(actual, expected, dtype):
    rtol = RTOL[dtype]
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale + 1e-30)


def _dense_H(U, V, filled):
    """H = −I + Σ_{i<filled} U_i V_iᵀ per sample, (B, d, d) in float64."""
    B, _, d = U.shape
    H = -torch.eye(d, dtype=F64).expand(B, d, d).clone()
    for i in range(filled):
        H += U[:, i].double().unsqueeze(2) * V[:, i].double().unsqueeze(1)
    return H


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,m,filled,slot", CASES)
def test_direction_matches_reference_and_dense_oracle(device, dtype, B, d, m, filled, slot):
    U, V, x, _, _ = _random(B, d, m, dtype, device, seed=B * d + m + filled)
    got = ops.broyden_direction(U, V, x, filled)
    assert got.dtype == dtype and got.shape == (B, d) and got.is_contiguous()
    _close(got, broyden_module._h_times(U, V, x, filled, _acc(dtype)), dtype)
    got_t = ops.broyden_direction(V, U, x, filled)  # the transpose
    _close(got_t, broyden_module._h_times(V, U, x, filled, _acc(dtype)), dtype)
    if dtype == F64:  # the float64 oracle: the dense H (small d), else the low-rank form by einsum
        Uc, Vc, xc = U.cpu()[:, :filled], V.cpu()[:, :filled], x.cpu()
        if d <= 300:
            H = _dense_H(Uc, Vc, filled)
            want, want_t = (H @ xc.unsqueeze(2)).squeeze(2), (H.transpose(1, 2) @ xc.unsqueeze(2)).squeeze(2)
        else:
            want = torch.einsum("bid,bi->bd", Uc, torch.einsum("bid,bd->bi", Vc, xc)) - xc
            want_t = torch.einsum("bid,bi->bd", Vc, torch.einsum("bid,bd->bi", Uc, xc)) - xc
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_t.cpu(), want_t, rtol=1e-12, atol=1e-12)


def _update_inputs(B, d, m, filled, dtype, device, seed):
    U, V, _, dx, dg = _random(B, d, m, dtype, device, seed)
    accept = torch.ones(B, dtype=torch.bool, device=device)
    if B >= 2:
        accept[1] = False  # frozen or restarted: dropped
    if B >= 3:
        dg[2] = 0  # v · dg = 0: dropped
    if B >= 4:
        dx[3, d // 2] = float("inf")  # non-finite u, v: dropped
    return U, V, dx, dg, accept


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,m,filled,slot", CASES)
def test_update_matches_reference(device, dtype, B, d, m, filled, slot):
    U, V, dx, dg, accept = _update_inputs(B, d, m, filled, dtype, device, seed=3 * B + d + m)
    U_ref, V_ref = U.clone(), V.clone()
    broyden_module._update(dx, dg, U_ref, V_ref, accept, filled, slot, _acc(dtype))
    U_got, V_got = U.clone(), V.clone()
    assert ops.broyden_update(dx, dg, U_got, V_got, accept, filled, slot) is None
    _close(U_got, U_ref, dtype)
    _close(V_got, V_ref, dtype)
    # only slot `slot` changes
    others = [i for i in range(m) if i != slot]
    assert torch.equal(U_got[:, others], U[:, others]) and torch.equal(V_got[:, others], V[:, others])
    for b in range(1, min(B, 4)):  # the dropped updates
        want_u = U[b, slot] if slot < filled else torch.zeros_like(U[b, slot])
        want_v = V[b, slot] if slot < filled else torch.zeros_like(V[b, slot])
        assert torch.equal(U_got[b, slot], want_u) and torch.equal(V_got[b, slot], want_v), b


@pytest.mark.parametrize("B,d,m,filled,slot", [(3, 7, 4, 2, 2), (2, 300, 3, 3, 1), (1, 1, 1, 0, 0)])
def test_update_matches_dense_float64_oracle(B, d, m, filled, slot):
    U, V, _, dx, dg = _random(B, d, m, F64, "cpu", seed=11 + d)
    H = _dense_H(U, V, filled)
    v = (H.transpose(1, 2) @ dx.unsqueeze(2)).squeeze(2)
    u = (dx - (H @ dg.unsqueeze(2)).squeeze(2)) / (v * dg).sum(1, keepdim=True)
    ops.broyden_update(dx, dg, U, V, torch.ones(B, dtype=torch.bool), filled, slot)
    torch.testing.assert_close(U[:, slot], u, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(V[:, slot], v, rtol=1e-11, atol=1e-12)
    # the secant equation of the updated inverse: H_new Δg = Δx (when nothing older was overwritten)
    if slot >= filled:
        H_new = _dense_H(U, V, filled + 1)
        torch.testing.assert_close((H_new @ dg.unsqueeze(2)).squeeze(2), dx, rtol=1e-10, atol=1e-10)


def test_ops_reject_bad_input_with_clear_messages():
    U, V, x, dx, dg = _random(2, 6, 3, F64, "cpu", seed=0)
    accept = torch.ones(2, dtype=torch.bool)
    direction = torch.ops.deqfast.broyden_direction.default
    update = torch.ops.deqfast.broyden_update.default
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        direction(U, V, x.t().contiguous().t(), 1)
    with pytest.raises(RuntimeError, match="U must be a contiguous"):
        direction(U.transpose(0, 1).contiguous().transpose(0, 1), V, x, 1)
    with pytest.raises(RuntimeError, match="V must be a contiguous tensor like"):
        direction(U, V.float(), x, 1)
    with pytest.raises(RuntimeError, match=r"filled must be in \[0, m\] = \[0, 3\], got 4"):
        direction(U, V, x, 4)
    with pytest.raises(RuntimeError, match="dg must be a contiguous tensor like dx"):
        update(dx, dg[:, :5], U, V, accept, 1, 1)
    with pytest.raises(RuntimeError, match="accept must be a contiguous"):
        update(dx, dg, U, V, accept.float(), 1, 1)
    with pytest.raises(RuntimeError, match=r"slot must be in \[0, min\(filled, m - 1\)\] = \[0, 1\], got 2"):
        update(dx, dg, U, V, accept, 1, 2)
    with pytest.raises(RuntimeError, match="U must be a contiguous"):
        update(dx, dg, U[:, :2], V[:, :2], accept, 1, 1)
    # a written buffer that aliases an input
    U1, V1 = torch.zeros(1, 2, 6, dtype=F64), torch.zeros(1, 2, 6, dtype=F64)
    with pytest.raises(RuntimeError, match="unsupported operation"):
        update(U1[:, 0], dg[:1], U1, V1, accept[:1], 1, 1)
    # the ops.py wrappers make non-contiguous vectors contiguous: the same result
    xt = torch.randn(6, 2, dtype=F64).t()
    torch.testing.assert_close(ops.broyden_direction(U, V, xt, 2), ops.broyden_direction(U, V, xt.contiguous(), 2),
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    U, V, x, dx, dg = _random(3, 37, 4, torch.float32, device, seed=5)
    accept = torch.tensor([True, False, True], device=device)
    torch.library.opcheck(torch.ops.deqfast.broyden_direction.default, (U, V, x, 2))
    torch.library.opcheck(torch.ops.deqfast.broyden_direction.default, (U, V, x, 0))
    torch.library.opcheck(torch.ops.deqfast.broyden_update.default, (dx, dg, U.clone(), V.clone(), accept, 2, 2))
    torch.library.opcheck(torch.ops.deqfast.broyden_update.default, (dx, dg, U.clone(), V.clone(), accept, 4, 1))


# ---------------------------------------------------------------------------------------------
# Whole solves: fused vs reference vs a float64 oracle.
# ---------------------------------------------------------------------------------------------

def _cell(B, d, dtype, device, seed=0):
    """z = a_b tanh(W z + c_b): a contraction, a different rate per sample (they finish apart)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=F64)
    W = W / torch.linalg.matrix_norm(W, 2)
    a = 0.3 + 0.65 * torch.rand(B, 1, generator=g, dtype=F64)
    c = torch.randn(B, d, generator=g, dtype=F64)
    W, a, c = (t.to(dtype).to(device) for t in (W, a, c))
    return lambda z: a * torch.tanh(z @ W.T + c), W, a, c


def _solve(path, f, z0, monkeypatch, **kw):
    with monkeypatch.context() as patch:
        if path == "reference":
            patch.setattr(ops, "use_fused", lambda *a, **k: False)
        return deqfast.solvers.broyden(f, z0, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("m", [3, 30])
def test_fused_solve_equals_reference_solve(device, dtype, m, monkeypatch):
    B, d = 5, 48
    f, *_ = _cell(B, d, dtype, device)
    z0 = torch.zeros(B, d, dtype=dtype, device=device)
    tol = 1e-11 if dtype == F64 else 1e-5
    calls = {"direction": 0, "step": 0}
    real_direction, real_step = ops.broyden_direction, ops.broyden_fused_step

    def direction(*a):
        calls["direction"] += 1
        return real_direction(*a)

    def step(*a):
        calls["step"] += 1
        return real_step(*a)

    with monkeypatch.context() as patch:
        patch.setattr(ops, "broyden_direction", direction)
        patch.setattr(ops, "broyden_fused_step", step)
        z_f, s_f = _solve("fused", f, z0, monkeypatch, max_iter=40, tol=tol, m=m)
    # the first step's direction, then one fused step per iteration
    assert calls["direction"] == 1 and calls["step"] > 0, "the fused path was not taken"
    z_r, s_r = _solve("reference", f, z0, monkeypatch, max_iter=40, tol=tol, m=m)
    assert s_f.converged.all() and s_r.converged.all()
    assert len(set(s_r.nstep.tolist())) > 1, "samples should finish at different steps (freezing exercised)"
    rtol = 1e-9 if dtype == F64 else 1e-4
    torch.testing.assert_close(z_f, z_r, rtol=rtol, atol=rtol)
    # the same iterates up to rounding: the same number of steps, or one off for a float32 test at the edge
    slack = 0 if dtype == F64 else 1
    assert (s_f.nstep - s_r.nstep).abs().max() <= slack
    torch.testing.assert_close(s_f.residual, s_r.residual, rtol=1e-6 if dtype == F64 else 0.5, atol=tol * 1e-3)


def test_fused_solve_matches_dense_float64_broyden_and_the_fixed_point(monkeypatch):
    """Every iterate (forced T evaluations, tol 0, the ring of m = 3 wrapping) equals the dense float64
    Broyden of tests/test_broyden_speed_semantics.py; solved tightly, z is the fixed point that a dense
    Newton solve finds."""
    from test_broyden_speed_semantics import _dense_broyden, _problem

    f, z0 = _problem(3, 10)
    T = 12
    for m in (3, 30):
        _, trace = _dense_broyden(f, z0, T, m)
        residuals = []

        def traced(z):
            fz = f(z)
            residuals.append((fz - z).norm(dim=1))
            return fz

        _solve("fused", traced, z0, monkeypatch, max_iter=T, tol=0.0, m=m)
        torch.testing.assert_close(torch.stack(residuals, dim=1), trace, rtol=1e-9, atol=1e-12)
    # Newton on g(z) = f(z) − z with the dense Jacobian, per sample, to machine precision.
    z_star = z0.clone()
    for _ in range(30):
        for b in range(z0.shape[0]):
            fb = lambda z: f(torch.cat([z_star[:b], z.unsqueeze(0), z_star[b + 1:]]))[b]
            J = torch.autograd.functional.jacobian(fb, z_star[b])
            z_star[b] = z_star[b] - torch.linalg.solve(J - torch.eye(10, dtype=F64), fb(z_star[b]) - z_star[b])
    z, stats = _solve("fused", f, z0, monkeypatch, max_iter=60, tol=1e-13, m=30)
    assert stats.converged.all()
    torch.testing.assert_close(z, z_star, rtol=1e-11, atol=1e-11)


def test_fused_solve_restarts_like_the_reference(monkeypatch):
    """A sample that blows up goes back to its best point, and its history is cleared: the fused path
    restarts at the same evaluations as the reference (deqfast.solvers.broyden's restart), float64.
    The map is chaotic under Broyden (rounding differences grow ~10x per few steps: 1e-12 at step 18,
    ~1e-5 at step 35), so the traces are compared to 1e-3, and the restarts exactly."""
    g = torch.Generator().manual_seed(4)
    B, d = 3, 20
    # A map whose secant model misleads: an oscillating component with a strong non-linearity.
    A = torch.randn(d, d, generator=g, dtype=F64) * 0.9 / d ** 0.5
    c = torch.randn(B, d, generator=g, dtype=F64)
    f = lambda z: torch.sin(3 * z) @ A.T + 0.9 * torch.tanh(z) ** 3 + c
    z0 = torch.zeros(B, d, dtype=F64)
    trace = {}
    for path in ("fused", "reference"):
        seen = []

        def traced(z):
            fz = f(z)
            seen.append((fz - z).norm(dim=1))
            return fz

        _solve(path, traced, z0, monkeypatch, max_iter=40, tol=1e-12, m=4)
        trace[path] = torch.stack(seen, dim=1)
    assert trace["fused"].shape == trace["reference"].shape

    def restarts(t):  # (sample, evaluation) where ‖g‖ exceeded 1e3 × its least ‖g‖ so far (the rule)
        return (t > 1e3 * torch.cummin(t, dim=1).values).nonzero().tolist()

    assert len(restarts(trace["reference"])) >= 3, "the problem is meant to make Broyden restart"
    assert restarts(trace["fused"]) == restarts(trace["reference"])
    torch.testing.assert_close(trace["fused"], trace["reference"], rtol=1e-3, atol=0)


def test_fused_update_keeps_a_frozen_samples_slots():
    """A frozen (not accepted) sample keeps every slot it had when the ring wraps over them."""
    U, V, _, dx, dg = _random(2, 9, 3, F64, "cpu", seed=8)
    U0, V0 = U.clone(), V.clone()
    accept = torch.tensor([True, False])
    for slot in range(3):
        ops.broyden_update(dx, dg, U, V, accept, 3, slot)
    assert torch.equal(U[1], U0[1]) and torch.equal(V[1], V0[1])
    assert not torch.equal(U[0], U0[0])


def test_cpu_ops_give_the_same_bits_at_any_thread_count_and_batch():
    """Fixed-order per-sample sums: 1 or 2 threads, and a sample alone or in a batch, the same bits."""
    U, V, x, dx, dg = _random(4, 9000, 3, torch.float32, "cpu", seed=21)
    accept = torch.ones(4, dtype=torch.bool)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            U1, V1 = U.clone(), V.clone()
            ops.broyden_update(dx, dg, U1, V1, accept, 3, 1)
            results.append((ops.broyden_direction(U, V, x, 3), U1, V1))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    alone = ops.broyden_direction(U[2:3].contiguous(), V[2:3].contiguous(), x[2:3], 3)
    assert torch.equal(alone[0], results[0][0][2])
    U2, V2 = U[2:3].clone(), V[2:3].clone()
    ops.broyden_update(dx[2:3], dg[2:3], U2, V2, accept[2:3], 3, 1)
    assert torch.equal(U2[0], results[0][1][2]) and torch.equal(V2[0], results[0][2][2])


# ---------------------------------------------------------------------------------------------
# deqfast::broyden_fused_step: one whole iteration after f in one op call.
# ---------------------------------------------------------------------------------------------

def _fused_step_inputs(B, d, m, filled, dtype, device, seed):
    """An iteration's inputs with a sample in each situation: 0 active (improves its restart point),
    1 done before (frozen), 2 failing now (NaN in f), 3 converging now (f(x) = x), 4 blowing up
    (back to its restart point, pending), 5 restarted before (pending: cleared at a host check)."""
    from deqfast.reference import SampleState
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype).to(device)  # noqa: E731
    U, V = rand(B, m, d) / d ** 0.5, rand(B, m, d)
    x, gx, x_next, fx_next = rand(B, d), rand(B, d), rand(B, d), rand(B, d)
    acc = _acc(dtype)
    state = SampleState(rand(B, d), 1e-3, "rel")
    state.residual.fill_(10.0)
    state.rel_residual.fill_(10.0)
    state.nstep.fill_(3)
    work = ops.BroydenWorkspace(x, gx, torch.full((B,), 1e30, dtype=acc, device=device))
    work.restart_x.copy_(rand(B, d))
    work.restart_g.copy_(rand(B, d))
    if B > 1:
        state.converged[1] = True
    if B > 2:
        fx_next[2, d // 2] = float("nan")
    if B > 3:
        fx_next[3] = x_next[3]
    if B > 4:
        work.restart_sq[4] = 1e-12
    if B > 5:
        work.pending[5] = True
    return x_next, fx_next, work, U, V, state


def _clone_work(work):
    copy = object.__new__(ops.BroydenWorkspace)
    for name in ops.BroydenWorkspace.__slots__:
        setattr(copy, name, getattr(work, name).clone())
    return copy


def _step_tensors(out, work, U, V, state):
    return {"out": out, "U": U, "V": V, **{n: getattr(work, n) for n in ops.BroydenWorkspace.__slots__},
            **{n: getattr(state, n) for n in ("best_x", "residual", "rel_residual", "nstep", "converged", "failed")}}


def _per_op_step(x_next, fx_next, work, U, V, state, filled, slot, clear):
    """The solver's step over the two per-op fused ops (the path before deqfast::broyden_fused_step)."""
    return broyden_module._step(x_next, fx_next, work, U, V, state, filled, slot, clear, _acc(x_next.dtype),
                                h_times=ops.broyden_direction, update=ops.broyden_update)


# (B, d, m, filled, slot): the first update, every situation with filled < m, several chunks with the ring
# wrapping, the longest CUDA history, a row longer than the reference's sum chunk (16384 elements).
STEP_CASES = [(1, 1, 1, 0, 0), (6, 7, 4, 2, 2), (6, 5000, 3, 3, 1), (6, 40, 32, 31, 31), (2, 20000, 2, 1, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,m,filled,slot", STEP_CASES)
@pytest.mark.parametrize("clear", [False, True])
def test_fused_step_equals_the_per_op_step_bitwise_and_the_reference(device, dtype, B, d, m, filled, slot, clear):
    if d > 10000 and dtype != torch.float32:
        pytest.skip("the long row once, in float32")
    inputs = _fused_step_inputs(B, d, m, filled, dtype, device, seed=B + d + m + filled)
    x_next, fx_next, work, U, V, state = inputs
    runs = {}
    for path in ("fused", "per_op", "reference"):
        w, U_, V_, s = _clone_work(work), U.clone(), V.clone(), state.clone()
        if path == "fused":
            out = ops.broyden_fused_step(x_next, fx_next, w, U_, V_, s, filled, slot, clear)
        elif path == "per_op":
            out = _per_op_step(x_next, fx_next, w, U_, V_, s, filled, slot, clear)
        else:
            out = broyden_module._step(x_next, fx_next, w, U_, V_, s, filled, slot, clear, _acc(dtype))
        runs[path] = _step_tensors(out, w, U_, V_, s)
    for name, got in runs["fused"].items():  # the same bits as the per-op path (NaN where f failed)
        torch.testing.assert_close(got, runs["per_op"][name], rtol=0, atol=0, equal_nan=True, msg=name)
    for name, got in runs["fused"].items():  # the reference: up to the order of the sums
        want = runs["reference"][name]
        if got.is_floating_point():
            _close(torch.nan_to_num(got), torch.nan_to_num(want), dtype)
        else:
            assert torch.equal(got, want), name
    got = runs["fused"]
    assert got["out"].is_contiguous() and not got["out"].isnan().any()
    if B > 5:  # the situations arose
        assert got["converged"].tolist()[:4] == [False, True, False, True] and got["failed"].tolist()[:4] == [False, False, True, False]
        assert got["pending"].tolist()[4:6] == [not clear, not clear]
        assert torch.equal(got["x"][4], work.restart_x[4])  # back to its restart point
        assert torch.equal(got["restart_x"][0], x_next[0])  # a new least ‖g‖
        assert torch.equal(got["out"][1], state.best_x[1])  # frozen
        n = min(filled + 1, m)
        assert bool((got["U"][5, :n] == 0).all()) == clear


@pytest.mark.parametrize("device", DEVICES)
def test_fused_step_opcheck(device):
    for clear in (False, True):
        x_next, fx_next, work, U, V, state = _fused_step_inputs(6, 37, 4, 2, torch.float32, device, seed=5)
        args = (x_next, fx_next, work.x, work.gx, U, V, work.restart_x, work.restart_g, work.restart_sq, work.pending,
                state.best_x, state.residual, state.rel_residual, state.nstep, state.converged, state.failed, 2, 2, clear,
                1e-3, True)
        torch.library.opcheck(torch.ops.deqfast.broyden_fused_step.default, args)


def test_fused_step_rejects_bad_input_with_clear_messages():
    x_next, fx_next, work, U, V, state = _fused_step_inputs(3, 6, 3, 1, F64, "cpu", seed=0)
    step = torch.ops.deqfast.broyden_fused_step.default

    def call(**change):
        a = dict(x_next=x_next, fx_next=fx_next, x=work.x, gx=work.gx, U=U, V=V, restart_x=work.restart_x,
                 restart_g=work.restart_g, restart_sq=work.restart_sq, pending=work.pending, best_x=state.best_x,
                 best_residual=state.residual, best_rel=state.rel_residual, nstep=state.nstep,
                 converged=state.converged, failed=state.failed, filled=1, slot=1, clear=False, tol=1e-3, rel_mode=True)
        a.update(change)
        return step(*a.values())

    with pytest.raises(RuntimeError, match="fx_next must be a contiguous tensor like x"):
        call(fx_next=fx_next.float())
    with pytest.raises(RuntimeError, match="restart_g must be a contiguous tensor like x"):
        call(restart_g=work.restart_g[:, :5])
    with pytest.raises(RuntimeError, match=r"restart_sq must be a contiguous \(3,\) Double"):
        call(restart_sq=work.restart_sq.float())
    with pytest.raises(RuntimeError, match=r"pending must be a contiguous \(3,\) Bool"):
        call(pending=work.pending.long())
    with pytest.raises(RuntimeError, match="U must be a contiguous"):
        call(U=U[:, :2])
    with pytest.raises(RuntimeError, match=r"slot must be in \[0, min\(filled, m - 1\)\] = \[0, 1\], got 2"):
        call(slot=2)
    with pytest.raises(RuntimeError, match="unsupported operation"):  # a written buffer aliasing an input
        call(x=x_next)
    with pytest.raises(RuntimeError, match="unsupported operation"):  # two written buffers that alias
        call(restart_x=work.x)


def _restart_problem():
    g = torch.Generator().manual_seed(4)
    B, d = 3, 20
    A = torch.randn(d, d, generator=g, dtype=F64) * 0.9 / d ** 0.5
    c = torch.randn(B, d, generator=g, dtype=F64)
    return (lambda z: torch.sin(3 * z) @ A.T.to(z.dtype) + 0.9 * torch.tanh(z) ** 3 + c.to(z.dtype)), torch.zeros(B, d, dtype=F64)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("check_every", [1, 3])
def test_fused_solve_equals_the_per_op_solve_bitwise(dtype, check_every, monkeypatch):
    """Whole solves (restarts and their clearing included): the one-op path gives the same iterates,
    result and stats, bit for bit, as the solver's step over the two per-op fused ops."""
    problems = [_restart_problem(), (_cell(5, 48, dtype, "cpu")[0], torch.zeros(5, 48, dtype=F64))]
    for f, z0 in problems:
        z0 = z0.to(dtype)
        runs = []
        for path in ("fused", "per_op"):
            trace = []

            def traced(z):
                trace.append(z.clone())
                return f(z)

            with monkeypatch.context() as patch:
                if path == "per_op":
                    patch.setattr(ops, "broyden_fused_step", _per_op_step)
                z, stats = deqfast.solvers.broyden(traced, z0, max_iter=40, tol=1e-12, m=4, check_every=check_every)
            runs.append((trace, z, stats))
        (t_f, z_f, s_f), (t_p, z_p, s_p) = runs
        assert len(t_f) == len(t_p) and all(torch.equal(a, b) for a, b in zip(t_f, t_p))
        assert torch.equal(z_f, z_p)
        for name in ("nstep", "residual", "rel_residual", "converged", "failed"):
            assert torch.equal(getattr(s_f, name), getattr(s_p, name)), name
    # the first problem restarts (the clearing is exercised): ‖g‖ beyond 1e3 × its least so far
    f, z0 = problems[0]
    norms = []
    deqfast.solvers.broyden(lambda z: (lambda fz: (norms.append((fz - z).norm(dim=1)), fz)[1])(f(z)), z0.to(dtype),
                            max_iter=40, tol=1e-12, m=4, check_every=check_every)
    t = torch.stack(norms, dim=1)
    assert (t > 1e3 * torch.cummin(t, dim=1).values).any()
