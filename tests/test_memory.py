"""1,000 training steps of a small DEQ model with flat memory, a failing solve in every step.

Flat: the resident set size (/proc/self/statm), the number of live torch.Tensor objects (the garbage
collector's view) and the Python-level allocations (tracemalloc) do not grow after a warm-up. Each
step's batch has one sample whose f turns NaN after its first evaluation: that sample's solve
fails (stats.failed, a RuntimeWarning, expected here and silenced), the loss leaves it out, and
the training goes on. The steps cycle through the backward modes that return f at the best finite
iterate (implicit with each adjoint solver, neumann, jfb).

DEQFAST_MEMORY_STEPS=N sets the number of steps (default 1,000).
"""
import gc
import os
import tracemalloc
import warnings

import pytest
import torch
from torch import nn

import deqfast

STEPS = int(os.environ.get("DEQFAST_MEMORY_STEPS", "1000"))
B, D = 6, 8
# Growth allowed after the warm-up. A leak of one (B, d) float64 tensor per step (384 bytes) over
# the measured 800 steps is 300 KiB of Python-visible memory or one tensor per step, both caught.
RSS_SLACK = 2 * 2 ** 20
TRACEMALLOC_SLACK = 64 * 2 ** 10
TENSOR_SLACK = 0


class PoisonedCell(nn.Module):
    """f(z, x) = tanh(W z + x + b), except that sample 0 gets NaN wherever its z is non-zero: its
    solve from z0 = 0 fails at the second evaluation, frozen at the finite z0."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(0.6 * W / torch.linalg.matrix_norm(W, 2))
        self.b = nn.Parameter(0.1 * torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, z, x):
        out = torch.tanh(z @ self.W.T + x + self.b)
        poison = torch.zeros(z.shape[0], 1, dtype=torch.bool)
        poison[0] = bool((z[0] != 0).any())
        return torch.where(poison, torch.full_like(out, float("nan")), out)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors():
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some torch module objects warns of deprecations
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc (Linux)")
def test_training_memory_is_flat_with_a_failing_solve_every_step():
    torch.manual_seed(0)
    cell = PoisonedCell()
    inject = nn.Linear(D, D, dtype=torch.float64)
    head = nn.Linear(D, 1, dtype=torch.float64)
    common = dict(max_iter=30, tol=1e-8, backward_max_iter=40, backward_tol=1e-8)
    layers = [deqfast.DEQ(cell, backward="implicit", backward_solver=s, **common)
              for s in ("fixed_point", "anderson", "broyden")]
    layers += [deqfast.DEQ(cell, backward="neumann", neumann_terms=3, **common),
               deqfast.DEQ(cell, backward="jfb", **common)]
    params = list(cell.parameters()) + list(inject.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    data = torch.Generator().manual_seed(1)

    def step(i):
        layer = layers[i % len(layers)]
        x = torch.randn(B, D, generator=data, dtype=torch.float64)
        y = torch.randn(B, 1, generator=data, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        out = head(layer(inject(x)))
        stats = layer.stats
        ok = ~stats.failed
        loss = nn.functional.mse_loss(out[ok], y[ok])
        loss.backward()
        opt.step()
        return stats, loss

    # the failing solve: warned, marked failed, and the rest of the batch trains
    with pytest.warns(RuntimeWarning, match="NaN"):
        stats, loss = step(0)
    assert stats.failed.tolist() == [True] + [False] * (B - 1)
    assert bool(stats.converged[1:].all()) and torch.isfinite(loss)

    warmup = max(20, STEPS // 10)
    checkpoints = sorted({warmup, 2 * warmup, STEPS // 2, (3 * STEPS) // 4, STEPS})
    rss, tensors = {}, {}
    failed_steps = 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*NaN", category=RuntimeWarning)
        for i in range(1, STEPS + 1):
            if i == warmup + 1:
                tracemalloc.start()
            stats, loss = step(i)
            failed_steps += bool(stats.failed[0]) and not bool(stats.failed[1:].any())
            if i == 2 * warmup:  # tracemalloc's own warm-up: caches that fill once are not leaks
                gc.collect()
                traced_start = tracemalloc.take_snapshot()
                traced_bytes_start = tracemalloc.get_traced_memory()[0]
            if i in checkpoints:
                tensors[i] = _live_tensors()
                rss[i] = _rss_bytes()
    gc.collect()
    traced_end = tracemalloc.take_snapshot()
    traced_bytes_end = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()

    assert failed_steps == STEPS + 1, "every step must have had exactly its one failing sample"
    assert all(torch.isfinite(p).all() for p in params), "a failed sample poisoned the parameters"
    base = checkpoints[1]  # after both warm-ups
    growth = {i: tensors[i] - tensors[base] for i in checkpoints if i >= base}
    assert max(growth.values()) <= TENSOR_SLACK, f"live tensors grew: {tensors}"
    rss_growth = {i: rss[i] - rss[base] for i in checkpoints if i >= base}
    assert max(rss_growth.values()) <= RSS_SLACK, f"RSS grew (bytes since step {base}): {rss_growth}"
    traced_growth = traced_bytes_end - traced_bytes_start
    top = "\n".join(str(s) for s in traced_end.compare_to(traced_start, "lineno")[:8])
    assert traced_growth <= TRACEMALLOC_SLACK, f"Python allocations grew by {traced_growth} bytes:\n{top}"
