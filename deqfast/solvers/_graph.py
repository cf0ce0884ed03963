"""CUDA-graph replay of blocks of solver iterations between host checks (``cuda_graph=True``).

A block is the ``check_every`` iterations (f and the fused step) between two host convergence
checks. It reads its first iterate from a static buffer x_in and leaves its last in x_out. The
Anderson ring buffer makes a block depend on where it starts (its slots are k0 % m, ...), so one
graph is captured per k0 % m the solve meets -- at most m, each on first use (a capture records
the work without running it; the replay that follows runs it) -- and replayed whenever that phase
comes again. The history-filling iterations (n_filled < m) and at least one block run
eagerly first: they are the warm-up that lazy initialisations (cuBLAS handles, the allocator) need
before a capture. The replayed kernels are the eager ones on the same memory: the same bits.

Graphs live for one solve: f's captured inputs (e.g. the x a DEQ closes over) change between calls.
``capture`` and ``supported`` are module attributes so the tests can replace the CUDA graph with a
fake that runs the block eagerly on replay (tests/test_ops.py, on the CPU).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

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

    ``block(k0)`` runs iterations k0 .. k0 + check_every - 1 from ``x_in`` and copies the last
    iterate into ``x_out`` (two static buffers of the state's shape)."""

    def __init__(self, caller: str, block: Callable[[int], None], x_in: torch.Tensor, x_out: torch.Tensor,
                 check_every: int, m: int):
        self.caller, self.block, self.x_in, self.x_out = caller, block, x_in, x_out
        self.check_every, self.m = check_every, m
        self.replays: Dict[int, Callable[[], None]] = {}
        self.pool = None
        self.captures = 0

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


def maybe_graphs(enabled: bool, x: torch.Tensor, fused: bool, caller: str, block, x_in, x_out, check_every: int,
                 m: int) -> Optional[BlockGraphs]:
    """A BlockGraphs when ``cuda_graph=True`` applies (fused ops on a CUDA state), else None."""
    if not (enabled and fused and supported(x)):
        return None
    return BlockGraphs(caller, block, x_in, x_out, check_every, m)
