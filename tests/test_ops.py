"""The fused ops (deqfast._C) against the pure-PyTorch reference, op by op and whole solves.

Skipped where the extension is not compiled (DEQFAST_DISABLE_EXTENSION=1 runs the rest of the
suite on the reference alone); CUDA cases are marked and shown as skipped without a GPU.
"""
import pytest
import torch
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

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


class _MemoryTrace(TorchDispatchMode):
    """Records what a block of work reads: per op, its name and arguments, a tensor made before the
    block as ("in", address, shape, strides, dtype), one in memory allocated inside it as ("tmp",
    the allocation's rank). A CUDA graph replays exactly this: the same kernels with the same
    numbers on the same memory."""

    def __init__(self):
        super().__init__()
        self.ops, self.made = [], {}  # made: storage address -> rank of the allocation inside the block

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        def describe(a):
            if not isinstance(a, torch.Tensor):
                return a
            rank = self.made.get(a.untyped_storage().data_ptr())
            if rank is not None:
                return ("tmp", rank, a.storage_offset(), tuple(a.shape), a.stride())
            return ("in", a.data_ptr(), tuple(a.shape), a.stride(), a.dtype)

        kwargs = kwargs or {}
        inputs = _pytree.tree_flatten((args, kwargs))[0]
        self.ops.append((str(func), tuple(describe(a) for a in inputs)))
        out = func(*args, **kwargs)
        read = {a.untyped_storage().data_ptr() for a in inputs if isinstance(a, torch.Tensor)}
        for i, o in enumerate(_pytree.tree_flatten(out)[0]):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in read:  # new memory, not a view
                self.made[o.untyped_storage().data_ptr()] = (len(self.ops), i)
        return out


def _fake_graphs(monkeypatch):
    """Replace the CUDA graph by a fake whose replay runs the current solve's block eagerly (capture
    runs nothing) and fails when that block would not do what the captured graph does: other ops,
    other numbers, or a tensor at another address than at capture (a stale address: the graph would
    read memory the solve no longer writes). The capture is recorded at its first replay, which
    follows it at once (_graph.BlockGraphs.run)."""
    from deqfast.solvers import _graph

    log = {"captures": 0, "replays": 0}

    def capture(fn, pool):
        log["captures"] += 1
        captured = []

        def replay():
            log["replays"] += 1
            with _MemoryTrace() as trace:
                fn()
            if not captured:
                captured.append(trace.ops)
            elif trace.ops != captured[0]:
                diff = next(i for i, (a, b) in enumerate(zip(trace.ops + [None], captured[0] + [None])) if a != b)
                pytest.fail(f"a replay differs from its captured graph at op {diff}: "
                            f"{(trace.ops + [None])[diff]} instead of {(captured[0] + [None])[diff]}")

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


def test_fake_graph_catches_a_replay_of_stale_memory(monkeypatch):
    """The fake graph above must fail where a real one would replay stale addresses: graphs kept
    across solves whose f reads a new tensor. f reading the same tensor, updated in place, is fine."""
    from deqfast.solvers import _graph

    f, z0 = _contraction_problem()
    c = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = lambda c: (lambda z: f(z) + 0.1 * c)
    log = _fake_graphs(monkeypatch)
    kept = _graph.BlockGraphs()
    options = dict(m=3, check_every=2, max_iter=20, tol=0.0, cuda_graph=True)
    with _graph.reuse(kept):
        deqfast.solvers.anderson(g(c), z0, **options)
    captures = log["captures"]
    c.mul_(-0.5)  # the same memory, new values: the kept graphs read them
    with _graph.reuse(kept):
        z, _ = deqfast.solvers.anderson(g(c), z0 + 0.1, **options)
    assert log["captures"] == captures == kept.captures > 0
    assert torch.equal(z, deqfast.solvers.anderson(g(c), z0 + 0.1, **dict(options, cuda_graph=False))[0])
    with _graph.reuse(kept), pytest.raises(pytest.fail.Exception, match="differs from its captured graph"):
        deqfast.solvers.anderson(g(c.clone()), z0, **options)  # a new tensor: the graph would read the old one


class _ModeCell(torch.nn.Module):
    """tanh(W z + U x + b), b halved in eval mode: a Python branch a captured graph bakes in."""

    def __init__(self, d=24, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.W = torch.nn.Parameter(0.8 * W / torch.linalg.matrix_norm(W, 2))
        self.U = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(d, generator=g, dtype=torch.float64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + (self.b if self.training else 0.5 * self.b))


def _same_solve(layer_g, layer_e, x, z0):
    """layer_g (cuda_graph=True) gives layer_e's output, stats and gradients, bit for bit."""
    x = x.detach().requires_grad_()
    z_g, z_e = layer_g(x, z0), layer_e(x, z0)
    assert torch.equal(z_g, z_e)
    for name in ("nstep", "residual", "rel_residual", "converged", "failed"):
        assert torch.equal(getattr(layer_g.stats, name), getattr(layer_e.stats, name)), name
    inputs = [x] + list(layer_g.cell.parameters())
    for a, b in zip(torch.autograd.grad(z_g.sin().sum(), inputs), torch.autograd.grad(z_e.sin().sum(), inputs)):
        assert torch.equal(a, b)
    return z_g


def test_deq_cuda_graph_replays_its_graphs_across_calls(monkeypatch):
    cell = _ModeCell()
    options = dict(m=4, check_every=3, max_iter=30, tol=0.0)
    layer_g, layer_e = deqfast.DEQ(cell, cuda_graph=True, **options), deqfast.DEQ(cell, **options)
    log = _fake_graphs(monkeypatch)
    g = torch.Generator().manual_seed(5)
    rand = lambda: torch.randn(6, 24, generator=g, dtype=torch.float64)
    z1 = _same_solve(layer_g, layer_e, rand(), None)
    captures = layer_g.graph_captures
    assert captures == log["captures"] == 4  # every phase k0 % m of 30 iterations, blocks of 3
    returned = z1.clone(), layer_g.stats.nstep.clone(), layer_g.stats.residual.clone()
    stats1 = layer_g.stats
    for _ in range(3):  # new x and z0, the same key: the graphs are replayed, nothing captured
        replays = log["replays"]
        _same_solve(layer_g, layer_e, rand(), rand())
        assert layer_g.graph_captures == log["captures"] == captures and log["replays"] > replays
    assert torch.equal(z1, returned[0]) and torch.equal(stats1.nstep, returned[1])  # nothing returned aliases
    assert torch.equal(stats1.residual, returned[2])  # the buffers the next solve reuses

    with torch.no_grad():
        cell.W.mul_(0.9)  # an optimiser's step: the same addresses, the same key
    _same_solve(layer_g, layer_e, rand(), rand())
    assert layer_g.graph_captures == captures
    layer_g.eval(), layer_e.eval()  # the cell's Python branch changes: a new key
    _same_solve(layer_g, layer_e, rand(), rand())
    assert layer_g.graph_captures == 2 * captures
    layer_g.train(), layer_e.train()  # the first key again, still kept
    _same_solve(layer_g, layer_e, rand(), rand())
    assert layer_g.graph_captures == 2 * captures
    cell.b = torch.nn.Parameter(cell.b.detach() + 0.1)  # a parameter replaced by a new tensor: a new key
    _same_solve(layer_g, layer_e, rand(), rand())
    assert layer_g.graph_captures == 3 * captures
    layer_g.float(), layer_e.float()  # a new dtype (and new parameters)
    _same_solve(layer_g, layer_e, rand().float(), rand().float())
    assert layer_g.graph_captures == 4 * captures == log["captures"]
    assert len(layer_g._graphs) == 4
    layer_g.graph_cache_size = 2  # the least recently used keys go
    _same_solve(layer_g, layer_e, rand().float(), None)
    assert len(layer_g._graphs) == 2 and layer_g.graph_captures == 4 * captures


class _LinearCell(torch.nn.Module):
    """tanh(lin(z) + x): nn.Linear casts its weight itself, the cast autocast caches."""

    def __init__(self, d):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def test_deq_cuda_graph_under_autocast_reads_no_cached_cast(monkeypatch):
    """Autocast caches a parameter's cast until the caller's autocast region ends: a kept graph
    that read the cache would read freed memory at the next call (the fake graph sees the address)."""
    torch.manual_seed(0)
    cell = _LinearCell(16)
    options = dict(m=3, check_every=2, max_iter=16, tol=0.0)
    layer_g, layer_e = deqfast.DEQ(cell, cuda_graph=True, **options), deqfast.DEQ(cell, **options)
    log = _fake_graphs(monkeypatch)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.randn(5, 16, generator=g)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(layer_g(x), layer_e(x))
    assert layer_g.graph_captures == log["captures"] > 0


class _PairCell(torch.nn.Module):
    """A two-part state [(B, 10), (B, 6)] and a pair of inputs, around a TanhCell of width 16."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, z, x):
        z = torch.cat(z, 1)
        return [self.cell(z, x[0] + x[1])[:, :10], self.cell(z, x[0] - x[1])[:, 10:]]


def test_deq_cuda_graph_other_inputs_and_per_solve_graphs(monkeypatch):
    import copy

    from conftest import TanhCell

    cell = TanhCell(d=16, d_in=8)
    options = dict(m=3, check_every=2, max_iter=20, tol=1e-12)
    log = _fake_graphs(monkeypatch)
    g = torch.Generator().manual_seed(6)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)

    # x a tuple of tensors and z a list of two parts: static copies of each
    layer_g, layer_e = deqfast.DEQ(_PairCell(cell), cuda_graph=True, **options), deqfast.DEQ(_PairCell(cell), **options)
    for _ in range(3):
        x, z0 = (rand(5, 8), rand(5, 8)), [rand(5, 10), rand(5, 6)]
        z_g, z_e = layer_g(x, z0), layer_e(x, z0)
        assert all(torch.equal(a, b) for a, b in zip(z_g, z_e)) and torch.equal(layer_g.stats.nstep, layer_e.stats.nstep)
        assert layer_g.graph_captures == log["captures"] > 0
    start = log["captures"]

    # A z0 so large that the solve is rescaled (its f reads a scale of this call): graphs for this solve only
    # (tol=0: the rescaled solve, whose tiny residuals underflow, runs to max_iter)
    layer_g, layer_0 = deqfast.DEQ(cell, cuda_graph=True, **dict(options, tol=0.0)), deqfast.DEQ(cell, **dict(options, tol=0.0))
    layer_e = deqfast.DEQ(cell, **options)
    x, zeros = rand(5, 8), torch.zeros(5, 16, dtype=torch.float64)
    for z0 in (zeros, torch.full((5, 16), 1e200, dtype=torch.float64), zeros):
        assert torch.equal(layer_g(x, z0), layer_0(x, z0))
    assert 0 < layer_g.graph_captures < log["captures"] - start

    # A cell that is not a module, and fixed_point: f's inputs unknown, graphs captured per solve
    for solve in (lambda x: deqfast.DEQ(lambda z, x: cell(z, x), cuda_graph=True, **options)(x, zeros),
                  lambda x: deqfast.fixed_point(lambda z: cell(z, x), zeros, cuda_graph=True, **options)[0]):
        for x in (rand(5, 8), rand(5, 8)):
            captured = log["captures"]
            assert torch.equal(solve(x), layer_e(x, zeros))
            assert log["captures"] > captured

    copied = copy.deepcopy(layer_g)  # the graphs are not copied
    assert len(layer_g._graphs) == 1 and len(copied._graphs) == 0
    assert torch.equal(copied(x, zeros), layer_0(x, zeros))

    # backward_warm_start keeps the solver's history until backward: two forwards, then their backwards
    layer_w = deqfast.DEQ(cell, cuda_graph=True, backward_warm_start=True, **options)
    eager_w = deqfast.DEQ(cell, backward_warm_start=True, **options)
    xs = [rand(5, 8).requires_grad_() for _ in range(2)]
    z_g, z_e = [layer_w(x, zeros) for x in xs], [eager_w(x, zeros) for x in xs]
    for i in (0, 1):
        assert torch.equal(torch.autograd.grad(z_g[i].sum(), xs[i])[0], torch.autograd.grad(z_e[i].sum(), xs[i])[0])

    # backward="bptt" without autograd: the solver's own result is returned, which must not be the
    # buffers the next call reuses
    layer_b = deqfast.DEQ(cell, cuda_graph=True, backward="bptt", **options)
    with torch.no_grad():
        z1 = layer_b(rand(5, 8), zeros)
        kept = z1.clone()
        x = rand(5, 8)
        assert torch.equal(layer_b(x, zeros), deqfast.DEQ(cell, backward="bptt", **options)(x, zeros))
    assert torch.equal(z1, kept) and layer_b.graph_captures > 0


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
