"""The fused ops (deqfast._C) against the pure-PyTorch reference, op by op and whole solves.

Skipped where the extension is not compiled (DEQFAST_DISABLE_EXTENSION=1 runs the rest of the
suite on the reference alone); CUDA cases are marked and shown as skipped without a GPU.
"""
import pytest
import torch

import deqfast
from deqfast import ops, reference
from deqfast.reference import SampleState

pytestmark = pytest.mark.skipif(not deqfast.extension_info()["compiled"], reason="deqfast._C is not compiled/enabled")

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not (torch.cuda.is_available() and deqfast.extension_info()["cuda"]), reason="needs a CUDA device and CUDA build")])]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Relative tolerance of fused vs reference per state dtype: sums in another order, and for
# half states one rounding of the mixed result.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
SHAPES = [(1, 1, 1), (3, 7, 2), (2, 5000, 5), (4, 4096, 3), (2, 8193, 4)]  # (B, d, m); 4096 = one chunk


def _poison_allocator(like, count=4):
    """On CUDA, leave NaN-filled blocks of ``like``'s size in the caching allocator, so that the
    outputs an op allocates start as NaN and an element it fails to write shows up in the parity
    check (the CPU allocator returns memory to the system; there parity on fresh memory must do)."""
    if like.device.type == "cuda":
        blocks = [torch.full_like(like, float("nan")) for _ in range(count)]
        del blocks


def _close(actual, expected, dtype):
    rtol = RTOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * expected.double().abs().max().item() + 1e-30)


def _random_history(B, d, m, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)
    x, fx = rand(B, d), rand(B, d)
    F, G = rand(B, m, d), rand(B, m, d)
    return x, fx, F, G


def _random_state(x, seed, tol=0.5, rel=True):
    """A state with random best residuals, some samples already converged."""
    g = torch.Generator().manual_seed(seed)
    state = SampleState(x, tol, "rel" if rel else "abs")
    B = x.shape[0]
    state.best_x = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype).to(x.device)
    state.residual = (torch.rand(B, generator=g, dtype=torch.float64) * 50).to(state.residual)
    state.rel_residual = (torch.rand(B, generator=g, dtype=torch.float64) * 2).to(state.rel_residual)
    state.nstep = torch.randint(0, 9, (B,), generator=g).to(x.device)
    state.converged = (torch.arange(B) % 3 == 2).to(x.device)
    return state


def _clone_state(state):
    c = SampleState(state.best_x, state.tol, "rel" if state.rel else "abs")
    for name in ("best_x", "residual", "rel_residual", "nstep", "converged", "failed"):
        setattr(c, name, getattr(state, name).clone())
    return c


def _assert_state_close(fused, ref, dtype):
    _close(fused.best_x, ref.best_x, dtype)
    _close(fused.residual, ref.residual, dtype)
    _close(fused.rel_residual, ref.rel_residual, dtype)
    assert torch.equal(fused.nstep, ref.nstep)
    assert torch.equal(fused.converged, ref.converged) and torch.equal(fused.failed, ref.failed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,m", SHAPES)
def test_anderson_history_matches_reference(device, dtype, B, d, m):
    x, fx, F, G = _random_history(B, d, m, dtype, device, seed=B * d + m)
    slot = m - 1
    F_ref, G_ref, partials_ref = reference.anderson_history(x, fx, F.clone(), G.clone(), slot)
    _poison_allocator(partials_ref)
    partials = torch.ops.deqfast.anderson_history(x, fx, F, G, slot)
    assert partials.shape == (B, ops.num_chunks(d), m + 1)
    assert torch.equal(F, F_ref) and torch.equal(G, G_ref)
    _close(partials.sum(dim=1), partials_ref.sum(dim=1), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,m", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_anderson_step_matches_reference(device, dtype, B, d, m, tau):
    x, fx, F, G = _random_history(B, d, m, dtype, device, seed=7 * B + d)
    slot = m - 1
    acc = reference.accumulation_dtype(dtype)
    F, G, partials = reference.anderson_history(x, fx, F, G, slot)
    gram = torch.bmm(G.to(acc), G.to(acc).transpose(1, 2))
    state = _random_state(x, seed=d)
    state_ref, gram_ref = _clone_state(state), gram.clone()
    gram_ref, next_ref = reference.anderson_step(x, F, G, gram_ref, partials, state_ref, m, slot, 1e-3, tau)
    # poison what the op must write: an unwritten element would stay NaN
    gram[:, slot, :] = float("nan")
    gram[:, :, slot] = float("nan")
    _poison_allocator(x)
    gram, x_next = ops.anderson_step(x, F, G, gram, partials.clone(), state, m, slot, 1e-3, tau)
    _assert_state_close(state, state_ref, dtype)
    _close(gram, gram_ref, dtype)
    # the mix amplifies the sums' rounding by the weights' size; compare on the step's scale
    scale = (F.double().abs().max() + 1).item()
    rtol = RTOL[dtype] * 50
    torch.testing.assert_close(x_next.double(), next_ref.double(), rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,m", SHAPES)
@pytest.mark.parametrize("tau,with_offset", [(1.0, False), (0.6, False), (1.0, True)])
def test_fixed_point_step_matches_reference(device, dtype, B, d, m, tau, with_offset):
    x, fx, F, _ = _random_history(B, d, 1, dtype, device, seed=3 * d + B)
    offset = F[:, 0].contiguous() if with_offset else None
    state = _random_state(x, seed=B, rel=d % 2 == 0, tol=1.0)
    state_ref = _clone_state(state)
    next_ref = reference.fixed_point_step(x, fx, offset, state_ref, tau)
    _poison_allocator(x)
    x_next = ops.fixed_point_step(x, fx, offset, state, tau)
    _assert_state_close(state, state_ref, dtype)
    _close(x_next, next_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_sample_is_flagged_and_not_spread(device):
    x, fx, F, G = _random_history(4, 300, 3, torch.float32, device, seed=1)
    fx[2, 17] = float("nan")
    state = SampleState(x, 1e-6, "rel")
    F, G, partials = ops.anderson_history(x, fx, F, G, 0)
    gram = torch.zeros(4, 3, 3, device=device)
    gram, x_next = ops.anderson_step(x, F, G, gram, partials, state, 1, 0, 1e-4, 1.0)
    assert state.failed.tolist() == [False, False, True, False]
    assert torch.isfinite(x_next[[0, 1, 3]]).all()
    assert torch.equal(x_next[2], x[2])  # the failed sample stays at its best (initial) iterate


@pytest.mark.parametrize("device", DEVICES)
def test_singular_history_falls_back_to_a_plain_step(device):
    B, d, m = 2, 64, 4
    x = torch.randn(B, d, device=device)
    g = torch.randn(B, d, device=device)
    F = (x + g).unsqueeze(1).repeat(1, m, 1).contiguous()  # every slot the same residual: Gram of rank 1
    G = g.unsqueeze(1).repeat(1, m, 1).contiguous()
    state = SampleState(x, 0.0, "abs")
    F, G, partials = ops.anderson_history(x, x + g, F, G, 1)
    gram = torch.bmm(G, G.transpose(1, 2))
    _, x_next = ops.anderson_step(x, F, G, gram, partials, state, m, 1, 0.0, 1.0)
    assert torch.isfinite(x_next).all()
    torch.testing.assert_close(x_next, x + g, rtol=1e-5, atol=1e-5)  # any weights summing to 1 give x + g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])
def test_fused_solve_equals_reference_solve(device, solver, monkeypatch):
    g = torch.Generator().manual_seed(5)
    B, d = 5, 300
    W = torch.randn(d, d, generator=g, dtype=torch.float64)
    W = (0.9 * W / torch.linalg.matrix_norm(W, 2)).to(device)
    c = torch.randn(B, d, generator=g, dtype=torch.float64).to(device)
    f = lambda z: torch.tanh(z @ W.T + c)
    fn = deqfast.solvers.anderson if solver == "anderson" else deqfast.solvers.fixed_point_iteration
    z_fused, s_fused = fn(f, torch.zeros_like(c), tol=1e-10, max_iter=200)
    monkeypatch.setattr(ops, "use_fused", lambda *a, **k: False)
    z_ref, s_ref = fn(f, torch.zeros_like(c), tol=1e-10, max_iter=200)
    torch.testing.assert_close(z_fused, z_ref, rtol=0, atol=1e-9)
    assert s_fused.converged.all() and s_ref.converged.all()
    assert (s_fused.nstep - s_ref.nstep).abs().max() <= 1


@pytest.mark.parametrize("device", DEVICES)
def test_fused_ops_are_deterministic(device):
    x, fx, F, G = _random_history(3, 9000, 4, torch.float32, device, seed=11)
    outs = []
    for _ in range(2):
        F2, G2 = F.clone(), G.clone()
        partials = torch.ops.deqfast.anderson_history(x, fx, F2, G2, 2)
        gram = torch.bmm(G2, G2.transpose(1, 2))
        state = SampleState(x, 1e-8, "rel")
        _, x_next = ops.anderson_step(x, F2, G2, gram, partials, state, 4, 2, 1e-4, 0.8)
        outs.append((partials, gram, x_next, state.residual))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


class _Counted:
    """Stands in for an op packet (and its .default overload), counting calls."""

    def __init__(self, packet):
        self.packet, self.calls = packet, 0
        self.default = self

    def __call__(self, *args):
        self.calls += 1
        return self.packet.default(*args)


@pytest.mark.parametrize("solver", ["anderson", "fixed_point"])
def test_solver_calls_one_fused_op_every_iteration(solver, monkeypatch):
    names = ["anderson_fused_step", "anderson_history", "anderson_step"] if solver == "anderson" else ["fixed_point_step"]
    counted = {name: _Counted(getattr(torch.ops.deqfast, name)) for name in names}
    for name, c in counted.items():
        monkeypatch.setattr(torch.ops.deqfast, name, c)
    fn = deqfast.solvers.anderson if solver == "anderson" else deqfast.solvers.fixed_point_iteration
    _, stats = fn(lambda z: 0.5 * z + 1, torch.randn(2, 8), tol=0.0, max_iter=10)
    expected = {name: 0 for name in names}
    expected[names[0]] = 10  # one dispatcher crossing per Anderson step: both passes in one op
    assert {name: c.calls for name, c in counted.items()} == expected and stats.nstep.tolist() == [10, 10]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("B,d,m,n_filled,tau", [(3, 50, 4, 4, 1.0), (2, 8193, 5, 3, 0.7), (4, 300, 32, 17, 1.0), (0, 5, 2, 1, 1.0)])
def test_fused_step_gives_the_two_call_bits(device, dtype, B, d, m, n_filled, tau):
    x, fx, F, G = _random_history(B, d, m, dtype, device, seed=d + m)
    slot = n_filled - 1
    acc = reference.accumulation_dtype(dtype)
    gram = torch.bmm(G.to(acc), G.to(acc).transpose(1, 2))
    state = _random_state(x, seed=4)
    s2, F2, G2, gram2 = _clone_state(state), F.clone(), G.clone(), gram.clone()
    partials = torch.ops.deqfast.anderson_history(x, fx, F2, G2, slot)
    gram2, expected = ops.anderson_step(x, F2, G2, gram2, partials, s2, n_filled, slot, 1e-3, tau, fused=True)
    workspace = ops.AndersonWorkspace(x, m)
    _poison_allocator(x)
    out = ops.anderson_fused_step(x, fx, F, G, gram, state, workspace, n_filled, slot, 1e-3, tau)
    assert torch.equal(out, expected)
    assert torch.equal(F, F2) and torch.equal(G, G2) and torch.equal(gram, gram2)
    for name in ("best_x", "residual", "rel_residual", "nstep", "converged", "failed"):
        assert torch.equal(getattr(state, name), getattr(s2, name)), name


def test_fused_step_rejects_overlapping_outputs_and_bad_buffers():
    x, fx, F, G = _random_history(2, 40, 3, torch.float32, "cpu", seed=1)
    state = SampleState(x, 1e-3, "rel")
    gram = torch.zeros(2, 3, 3)
    ws = ops.AndersonWorkspace(x, 3)
    with pytest.raises(RuntimeError, match="single memory location"):
        ops.anderson_fused_step(x, fx, F, F, gram, state, ws, 1, 0, 1e-4, 1.0)  # F is G
    with pytest.raises(RuntimeError, match="single memory location"):
        ops.anderson_fused_step(x, F.view(-1)[:80].view(2, 40), F, G, gram, state, ws, 1, 0, 1e-4, 1.0)  # fx in F
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.deqfast.anderson_history(F.view(-1)[:80].view(2, 40), fx, F, G, 0)  # x inside F
    ws.partials = torch.empty(2, 2, 4)
    with pytest.raises(RuntimeError, match="partials must be a"):
        ops.anderson_fused_step(x, fx, F, G, gram, state, ws, 1, 0, 1e-4, 1.0)
    ws = ops.AndersonWorkspace(x, 3)
    ws.flags = torch.empty(2, 2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="flags must be a contiguous"):
        ops.anderson_fused_step(x, fx, F, G, gram, state, ws, 1, 0, 1e-4, 1.0)


def test_fused_anderson_solve_survives_f_returning_its_argument():
    """f = identity hands back the buffer the step reads: the solve must not write over it."""
    z0 = torch.randn(3, 20)
    z, stats = deqfast.solvers.anderson(lambda z: z, z0, tol=1e-6, max_iter=5)
    assert torch.equal(z, z0) and stats.converged.all()
    calls = []
    z, _ = deqfast.solvers.anderson(lambda z: calls.append(z) or calls[0], z0, tol=0.0, max_iter=6)  # an old buffer back
    torch.testing.assert_close(z, z0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, fx, F, G = _random_history(3, 50, 4, torch.float32, device, seed=2)
    state = _random_state(x, seed=3)
    partials = torch.ops.deqfast.anderson_history(x, fx, F.clone(), G.clone(), 1)
    gram = torch.bmm(G, G.transpose(1, 2))
    st = lambda: (state.best_x.clone(), state.residual.clone(), state.rel_residual.clone(), state.nstep.clone(),
                  state.converged.clone(), state.failed.clone())
    torch.library.opcheck(torch.ops.deqfast.anderson_history.default, (x, fx, F.clone(), G.clone(), 1))
    torch.library.opcheck(torch.ops.deqfast.anderson_step.default,
                          (x, F, G, gram.clone(), partials, *st(), 4, 1, 1e-4, 0.9, 1e-3, True))
    torch.library.opcheck(torch.ops.deqfast.fixed_point_step.default, (x, fx, None, *st(), 1.0, 1e-3, False))
    ws = ops.AndersonWorkspace(x, 4)
    torch.library.opcheck(torch.ops.deqfast.anderson_fused_step.default,
                          (x, fx, F.clone(), G.clone(), gram.clone(), ws.partials, ws.alpha, ws.flags, *st(),
                           4, 1, 1e-4, 0.9, 1e-3, True))
    torch.library.opcheck(torch.ops.deqfast.fixed_point_step.default, (x, fx, G[:, 0].contiguous(), *st(), 0.5, 1e-3, True))


def test_op_errors_name_the_argument():
    x = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="fx must be a contiguous tensor like x"):
        torch.ops.deqfast.anderson_history(x, torch.randn(2, 6), torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), 0)
    with pytest.raises(RuntimeError, match=r"slot must be in \[0, m\)"):
        torch.ops.deqfast.anderson_history(x, x, torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), 3)
    state = SampleState(x, 1e-3, "rel")
    with pytest.raises(RuntimeError, match="nstep must be"):
        torch.ops.deqfast.fixed_point_step(x, x, None, state.best_x, state.residual, state.rel_residual,
                                           state.nstep.int(), state.converged, state.failed, 1.0, 1e-3, True)


def test_fused_step_traces_under_torch_compile_without_graph_breaks():
    x, fx, F, G = _random_history(2, 300, 3, torch.float32, "cpu", seed=21)
    state = SampleState(x, 1e-6, "rel")

    def step(x, fx, F, G, gram, best_x, residual, rel, nstep, converged, failed):
        partials = torch.ops.deqfast.anderson_history(x, fx, F, G, 1)
        return torch.ops.deqfast.anderson_step(x, F, G, gram, partials, best_x, residual, rel, nstep, converged,
                                               failed, 2, 1, 1e-4, 1.0, 1e-6, True)

    args = lambda: (x, fx, F.clone(), G.clone(), torch.zeros(2, 3, 3), state.best_x.clone(), state.residual.clone(),
                    state.rel_residual.clone(), state.nstep.clone(), state.converged.clone(), state.failed.clone())
    eager_args, compiled_args = args(), args()
    expected = step(*eager_args)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled_args)
    torch.testing.assert_close(compiled, expected)
    for a, b in zip(compiled_args, eager_args):  # the in-place updates happen under compile too
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_fused_solve_with_non_contiguous_states(device, layout):
    g = torch.Generator().manual_seed(8)
    w = torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64)
    w = (0.05 * w).to(device)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64).to(device)
    f = lambda z: torch.tanh(torch.nn.functional.conv2d(z, w, padding=1) + x)
    z0 = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64).to(device)
    odd = z0.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else z0.transpose(2, 3).contiguous().transpose(2, 3)
    assert not odd.is_contiguous() and torch.equal(odd, z0)
    for solver in (deqfast.solvers.anderson, deqfast.solvers.fixed_point_iteration):
        z_ref, s_ref = solver(f, z0, tol=1e-12, max_iter=100)
        z_odd, s_odd = solver(f, odd, tol=1e-12, max_iter=100)
        torch.testing.assert_close(z_odd, z_ref, rtol=0, atol=1e-12)
        assert torch.equal(s_odd.nstep, s_ref.nstep) and s_odd.converged.all()


def _contraction_problem(B=4, d=50, seed=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=dtype)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)
    c = torch.randn(B, d, generator=g, dtype=dtype)
    return (lambda z: torch.tanh(z @ W.T + c)), torch.zeros(B, d, dtype=dtype)


def _fake_graphs(monkeypatch):
    """Replace the CUDA graph by a fake whose replay runs the block eagerly (capture runs nothing)."""
    from deqfast.solvers import _graph

    log = {"captures": 0, "replays": 0}

    def capture(fn, pool):
        log["captures"] += 1

        def replay():
            log["replays"] += 1
            fn()

        return replay

    monkeypatch.setattr(_graph, "supported", lambda x: True)
    monkeypatch.setattr(_graph, "capture", capture)
    monkeypatch.setattr(_graph, "new_pool", lambda: None)
    return log


@pytest.mark.parametrize("m,check_every,max_iter,tol", [(5, 4, 50, 0.0), (3, 3, 40, 1e-9), (4, 2, 23, 0.0), (1, 1, 10, 0.0),
                                                        (5, 4, 200, 1e-10)])
def test_cuda_graph_solve_control_flow_gives_the_eager_bits(monkeypatch, m, check_every, max_iter, tol):
    f, z0 = _contraction_problem()
    z_e, s_e = deqfast.solvers.anderson(f, z0, m=m, check_every=check_every, max_iter=max_iter, tol=tol)
    log = _fake_graphs(monkeypatch)
    z_g, s_g = deqfast.solvers.anderson(f, z0, m=m, check_every=check_every, max_iter=max_iter, tol=tol, cuda_graph=True)
    assert torch.equal(z_g, z_e)
    for name in ("nstep", "residual", "rel_residual", "converged", "failed"):
        assert torch.equal(getattr(s_g, name), getattr(s_e, name)), name
    if tol == 0.0:  # no early stop: every block from the first graphed one on is replayed
        from deqfast.solvers._graph import graph_start

        starts = list(range(graph_start(m, check_every), max_iter - check_every + 1, check_every))
        assert log["replays"] == len(starts) > 0
        assert log["captures"] == len({k0 % m for k0 in starts})


def test_cuda_graph_capture_failure_names_the_fallback(monkeypatch):
    from deqfast.solvers import _graph

    f, z0 = _contraction_problem()
    monkeypatch.setattr(_graph, "supported", lambda x: True)
    monkeypatch.setattr(_graph, "new_pool", lambda: None)

    def capture(fn, pool):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(_graph, "capture", capture)
    with pytest.raises(RuntimeError, match=r"could not capture f.*cuda_graph=False"):
        deqfast.fixed_point(f, z0, max_iter=30, tol=0.0, check_every=2, cuda_graph=True)


def test_cuda_graph_is_ignored_on_the_cpu(monkeypatch):
    from deqfast.solvers import _graph

    monkeypatch.setattr(_graph, "capture", lambda fn, pool: pytest.fail("captured a graph on the CPU"))
    f, z0 = _contraction_problem()
    z_e, s_e = deqfast.fixed_point(f, z0, max_iter=30, tol=1e-8, check_every=2)
    z_g, s_g = deqfast.fixed_point(f, z0, max_iter=30, tol=1e-8, check_every=2, cuda_graph=True)
    assert torch.equal(z_g, z_e) and torch.equal(s_g.nstep, s_e.nstep)
    layer = deqfast.DEQ(lambda z, x: f(z) + 0 * x, cuda_graph=True, max_iter=20)
    assert torch.equal(layer(z0), deqfast.DEQ(lambda z, x: f(z) + 0 * x, max_iter=20)(z0))


def test_cuda_graph_keyword_errors():
    f, z0 = _contraction_problem()
    with pytest.raises(ValueError, match="cuda_graph=True is implemented for solver='anderson' only"):
        deqfast.fixed_point(f, z0, solver="broyden", cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be a bool, got str"):
        deqfast.DEQ(lambda z, x: z, cuda_graph="yes")


def test_fused_available_falls_back_when_no_kernel_image_fits_the_device(monkeypatch):
    from deqfast import _extension

    reason = "no deqfast kernel image runs on CUDA device 0 (sm_120): no kernel image is available"

    class FakeC:
        def has_cuda(self):
            return True

        def cuda_kernel_status(self, index):
            return reason if index == 0 else ""

    monkeypatch.setattr(_extension, "load_extension", lambda: FakeC())
    monkeypatch.setattr(_extension, "_cuda_devices", {})
    with pytest.warns(RuntimeWarning, match="reference is used on that device"):
        assert not _extension.fused_available(torch.device("cuda", 0))
    assert not _extension.fused_available(torch.device("cuda", 0))  # asked once, cached
    assert _extension.fused_available(torch.device("cuda", 1))
    assert _extension.extension_info()["cuda_devices"] == {0: reason}
