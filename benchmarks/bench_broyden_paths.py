"""Broyden solve time on the fused ops vs the pure-PyTorch reference vs torchdeq 0.1.0, interleaved.

    python benchmarks/bench_broyden_paths.py [rounds]

bench_overhead.py's Broyden problem (f = sin(c + 3 z), float32, T = 30 evaluations, tol 0, m = T, as
torchdeq keeps every update) at its sizes, in one process: each round times one solve of each path,
the order rotated per round so that all three see the same machine load. "reference" is
deqfast.solvers.broyden with ops.use_fused forced False, the path DEQFAST_DISABLE_EXTENSION=1 takes.
Prints medians and minima (ms) and torchdeq's median over each path's; writes nothing, asserts nothing.
"""
from __future__ import annotations

import sys
import time

import torch

import bench_overhead
import common
import deqfast
from deqfast import ops

T = 30
SIZES = [(8, 4096), (64, 512), (4, 65536), (8, 30720)]


def main(rounds: int) -> None:
    real_use_fused = ops.use_fused
    torchdeq = common.torchdeq_module()
    tdq = torchdeq.solver.get_solver("broyden") if torchdeq is not None else None

    def run(name, f, z0):
        if name == "torchdeq":
            return tdq(f, z0, max_iter=T - 1, tol=0.0, stop_mode="abs")
        ops.use_fused = real_use_fused if name == "fused" else (lambda *a, **k: False)
        try:
            return deqfast.solvers.broyden(f, z0, max_iter=T, tol=0.0, m=T)
        finally:
            ops.use_fused = real_use_fused

    names = ["fused", "reference"] + (["torchdeq"] if tdq is not None else [])
    print("torch", torch.__version__, "threads", torch.get_num_threads(), "|", deqfast.extension_info()["reason"])
    with torch.no_grad():
        for B, d in SIZES:
            f, z0 = bench_overhead.make_problem(B, d, torch.device("cpu"))
            nfe = {}
            for name in names:
                calls = [0]

                def counted(z):
                    calls[0] += 1
                    return f(z)

                run(name, counted, z0)
                nfe[name] = calls[0]
            times = {n: [] for n in names}
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    t0 = time.perf_counter()
                    run(name, f, z0)
                    times[name].append(time.perf_counter() - t0)
            med = {n: sorted(v)[len(v) // 2] * 1e3 for n, v in times.items()}
            print(f"{B} x {d}: evaluations {nfe}")
            for n in names:
                ratio = f"   torchdeq/this {med['torchdeq'] / med[n]:.2f}" if "torchdeq" in med else ""
                print(f"   {n:10s} median {med[n]:8.1f} ms   min {min(times[n]) * 1e3:8.1f} ms{ratio}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
