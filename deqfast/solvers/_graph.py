"""CUDA-graph replay of blocks of solver iterations between host checks (``cuda_graph=True``).

A block is the ``check_every`` iterations (f and the fused step) between two host convergence
checks. It reads its first iterate from a static buffer x_in and leaves its last in x_out. The
Anderson ring buffer makes a block depend on where it starts (its slots are k0 % m, ...), so one
graph is captured per k0 % m the solve meets -- at most m, each on first use (a capture records
the work without running it; the replay that follows runs it) -- and replayed whenever that phase
comes again. The history-filling iterations (n_filled < m) and at least one block run
eagerly first: they are the warm-up that lazy initialisations (cuBLAS handles, the allocator) need
before a capture. The replayed kernels are the eager ones on the same memory: the same bits.

A graph reads and writes fixed addresses: the solver's buffers (history, Gram, per-sample state,
workspace, x_in, x_out) and whatever f reads (e.g. the x a DEQ closes over, the parameters).
``fixed_point`` cannot know f's inputs, so its graphs live for one solve. ``DEQ(cuda_graph=True)``
can make them static (deqfast/layer.py): it keeps one :class:`BlockGraphs` per key and opens
:func:`reuse` around each solve; the solver then resets the buffers of the previous solve in place
and replays its graphs (no capture). ``capture`` and ``supported`` are module attributes so the
tests can replace the CUDA graph with a fake that runs the block eagerly on replay (tests/test_ops.py,
on the CPU).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Dict, Optional

import torch


def supported(x: torch.Tensor) -> bool:
    """Whether a graph-captured solve applies to this state: a CUDA tensor (elsewhere it is ignored)."""
    return x.device.type == "cuda"


def capture(fn: Callable[[], None], pool) -> Callable[[], None]:
    """fn captured in a CUDA graph in the memory pool ``pool``; returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph.replay


def new_pool():
    return torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None


class BlockGraphs:
    """Runs blocks of ``check_every`` iterations from captured graphs, one per phase k0 % m.

    The solver calls :meth:`prepare` once per solve and sets ``block``: ``block(k0)`` runs
    iterations k0 .. k0 + check_every - 1 from ``x_in`` and copies the last iterate into ``x_out``
    (two static buffers of the state's shape). Kept across solves (DEQ), the graphs captured by one
    solve are replayed by the next ones with the same signature.

    Attributes:
        captures: graphs captured so far (over all solves that used this object).
    """

    def __init__(self):
        self.signature = None
        self.buffers: Any = None  # the solver's static tensors (Anderson: history, Gram, state, workspace)
        self.x_in = self.x_out = None
        self.block: Optional[Callable[[int], None]] = None
        self.caller = ""
        self.check_every = self.m = 1
        self.replays: Dict[int, Callable[[], None]] = {}
        self.pool = None
        self.captures = 0

    def prepare(self, caller: str, signature: tuple, x: torch.Tensor, check_every: int, m: int,
                make_buffers: Callable[[], Any]):
        """This solve's static buffers, and whether they are those of an earlier solve (same
        signature: shape, dtype, device, and every number the captured kernels take), which the
        solver must then reset in place. A new signature drops the graphs and makes new buffers."""
        self.caller = caller
        if signature == self.signature:
            return self.buffers, True
        self.signature, self.check_every, self.m = signature, check_every, m
        self.buffers = make_buffers()
        self.x_in = torch.empty_like(x, memory_format=torch.contiguous_format)
        self.x_out = torch.empty_like(self.x_in)
        self.replays, self.pool = {}, None
        return self.buffers, False

    def run(self, k0: int, x: torch.Tensor) -> torch.Tensor:
        self.x_in.copy_(x)  # the graph reads its input at the captured address
        replay = self.replays.get(k0 % self.m)
        if replay is None:
            replay = self._capture(k0)
            self.replays[k0 % self.m] = replay
        replay()
        return self.x_out

    def _capture(self, k0: int) -> Callable[[], None]:
        if self.pool is None:
            self.pool = new_pool()
        try:
            # self.block is looked up when the work runs: on a GPU only at this capture; the tests'
            # fake graph runs the current solve's block at each replay and checks it reads the same memory.
            replay = capture(lambda: self.block(k0), self.pool)
        except RuntimeError as exc:
            raise RuntimeError(
                f"{self.caller}: cuda_graph=True could not capture f and the solver step in a CUDA graph ({exc}). "
                f"f must not synchronise with the host while it runs (no .item(), .cpu(), printing a tensor, "
                f"data-dependent shapes or Python branches on tensor values); pass cuda_graph=False for the "
                f"eager solve, which gives the same result"
            ) from exc
        self.captures += 1
        return replay


def graph_start(m: int, check_every: int) -> int:
    """The first iteration a captured block may start at: a multiple of check_every (a host check
    just happened), with the history full (n_filled = m from iteration m - 1 on) and at least one
    eager block before it (the warm-up)."""
    first = max(m - 1, check_every)
    return -(-first // check_every) * check_every


# The BlockGraphs a caller that keeps f's inputs static (DEQ) lends to the next solve.
_REUSE: contextvars.ContextVar[Optional[BlockGraphs]] = contextvars.ContextVar("deqfast_graph_reuse", default=None)


@contextlib.contextmanager
def reuse(graphs: BlockGraphs):
    """The solve run inside this block keeps its buffers and graphs in ``graphs`` (and replays
    those of an earlier solve there). The caller guarantees that f reads the same memory at every
    solve: its inputs copied into static tensors, its parameters unchanged (deqfast/layer.py)."""
    token = _REUSE.set(graphs)
    try:
        yield graphs
    finally:
        _REUSE.reset(token)


def take() -> Optional[BlockGraphs]:
    """The BlockGraphs lent by :func:`reuse`, to the first solve that asks (a solve nested inside f
    gets None), or None outside a reuse block."""
    graphs = _REUSE.get()
    if graphs is not None:
        _REUSE.set(None)
    return graphs
