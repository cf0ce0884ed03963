"""Time deqfast's fused Anderson step on the CPU alone, and a forced Anderson solve, per iteration.

    python benchmarks/bench_fused_step.py [--sizes 8x4096,64x512,4x65536] [--m 5] [--reps 7]
        [--stat median|min] [--clock wall|cpu]

For each B x d (fp32): ``step`` = one deqfast::anderson_fused_step call on a full history
(n_filled = m, slots turning), median over repeats of a block of calls; ``solve`` = a forced
deqfast.solvers.anderson solve (tol = 0, T = 30) of f(z) = sin(3z + c) (bench_overhead.py's f)
per iteration; ``f`` = that f alone; ``overhead`` = solve − f. Prints one JSON line per size
(µs), so that two builds can be compared by running this script alternately under each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import deqfast  # noqa: E402
from deqfast import ops  # noqa: E402
from deqfast.reference import SampleState  # noqa: E402


def median_time(fn, inner: int, reps: int) -> float:
    """Median over ``reps`` blocks of ``inner`` calls, µs per call (``--stat min``: the fastest block,
    steadier than the median on a shared machine)."""
    fn()
    times = []
    clock = time.process_time if CLOCK == "cpu" else time.perf_counter
    for _ in range(reps):
        t0 = clock()
        for _ in range(inner):
            fn()
        times.append((clock() - t0) / inner)
    return (min(times) if STAT == "min" else statistics.median(times)) * 1e6


STAT = "median"
CLOCK = "wall"


def measure(B: int, d: int, m: int, reps: int, T: int = 30) -> dict:
    g = torch.Generator().manual_seed(0)
    c = torch.randn(B, d, generator=g)
    f = lambda z: torch.sin(torch.add(c, z, alpha=3.0))  # noqa: E731
    z0 = torch.zeros(B, d)
    # The step alone: a full history, every sample active (tol = 0), slots turning.
    x = torch.randn(B, d, generator=g)
    fx = f(x)
    F = torch.randn(B, m, d, generator=g)
    G = torch.randn(B, m, d, generator=g) * 0.1
    gram = torch.einsum("bid,bjd->bij", G, G).contiguous()
    state = SampleState(x, 0.0, "rel")
    ws = ops.AndersonWorkspace(x, m)
    k = [0]

    def step():
        ops.anderson_fused_step(x, fx, F, G, gram, state, ws, m, k[0] % m, 1e-4, 1.0)
        k[0] += 1

    inner = max(5, int(4000 / max(1, B * d // 1000)))
    t_step = median_time(step, inner, reps)
    t_f = median_time(lambda: f(z0), inner, reps)
    solve = lambda: deqfast.solvers.anderson(f, z0, max_iter=T, tol=0.0, m=m, lam=1e-4)  # noqa: E731
    t_solve = median_time(solve, max(1, inner // T), reps) / T
    return {"size": f"{B}x{d}", "m": m, "step_us": round(t_step, 2), "f_us": round(t_f, 2),
            "iteration_us": round(t_solve, 2), "overhead_us": round(t_solve - t_f, 2),
            "threads": torch.get_num_threads(), "stat": STAT, "clock": CLOCK}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8x4096,64x512,4x65536")
    p.add_argument("--m", type=int, default=5)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--stat", choices=("median", "min"), default="median")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the process's CPU time (with 1 thread, the time it ran: steady on a busy machine)")
    a = p.parse_args()
    global STAT, CLOCK
    STAT, CLOCK = a.stat, a.clock
    for s in a.sizes.split(","):
        B, d = (int(v) for v in s.split("x"))
        print(json.dumps(measure(B, d, a.m, a.reps)), flush=True)


if __name__ == "__main__":
    main()
