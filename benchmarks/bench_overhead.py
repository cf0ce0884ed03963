"""Benchmark 1: Anderson solver overhead per iteration, against torchdeq and the memory floor.

What is measured, for each (B, d, m):

* iteration time = time of one forced solve of T iterations (tol = 0, so every solver runs
  exactly T evaluations of f; checked by counting them) / T, median over repeats;
* f time = median time of one call of f alone on a typical iterate f(z0) (|z| <= 1, as in the solve);
* overhead = iteration time − f time: what the solver itself costs per iteration;
* floor = (2m + 3)·N·s bytes / copy bandwidth (benchmarks/README.md: the two passes over memory
  one Anderson step needs at least), with the bandwidth of a large tensor copy measured in the
  same run (bytes read + written); every ratio is to that floor;
* host synchronisations per iteration (CUDA only, torch.cuda.set_sync_debug_mode; None on CPU);
* operators dispatched per iteration, f's own excluded (TorchDispatchMode): each is at least one
  kernel launch on a GPU, the proxy for benchmarks/README.md's "<= 3 launches" target.

f(z) = sin(3z + c) with random c: cheap, elementwise, bounded and expanding (|f'| up to 3), so no
solver converges within the forced iterations (the final relative residual is reported to show
it) and the iterates never drift into denormals. (f = 0.5·z + c, benchmarks/README.md's anchor, is
affine: Anderson solves it in a few steps and then iterates on residuals near zero.)

On CUDA one more row per size, deqfast_fused_graphed: the fused step with the host out of the
loop. m iterations (f, pass A, pass B; one turn of the ring buffer, so the slots repeat) are
captured in one CUDA graph after the history is full and replayed; f alone is captured and
replayed the same way, and overhead = iteration − f as above. It measures the kernels against
the floor whatever the Python loop costs: at small sizes the eager solve is bound by the host's
time per iteration, not the GPU's. Before timing, one replay is checked against the same turn
run eagerly from the same state.

Columns: deqfast reference (the pure-PyTorch deqfast.solvers.anderson), deqfast fused (when the
extension is compiled for the device, ``common.deqfast_fused_available``; None otherwise), and
torchdeq 0.1.0's anderson_solver when importable. When the fused path is active in this process,
the reference column is measured in a child process started with DEQFAST_DISABLE_EXTENSION=1
(same sizes, data and thread count; overheads against this run's f time and floor).

A second table, Broyden: deqfast.solvers.broyden against torchdeq 0.1.0's broyden_solver at equal
evaluations of f (T = 30 each, tol = 0; torchdeq's max_iter = T − 1, since it evaluates f once
before its first step; both keep every update, m = T), time per solve and per evaluation, at this
table's sizes plus 8 x 30720 (issue 11's measurement).

A third table, host time: each solver's overhead per iteration at B = d = 1 (T = 200 forced
iterations), where the state is a single number and what is left is the Python loop, the op
dispatch and the host checks: the time an eager solve on a GPU spends per iteration on the host,
whatever the kernels cost (benchmarks/README.md: at 256 x 512 the fused floor is 1.8 µs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional

import torch

import common

# (B, d, m): the four sizes of benchmarks/README.md on CUDA, scaled down on the CPU.
SIZES_CUDA = [(32, 65536, 5), (256, 512, 5), (16, 131072, 5), (8, 1048576, 6)]
SIZES_CPU = [(8, 4096, 5), (64, 512, 5), (4, 65536, 5)]


def make_f(B: int, d: int, device: torch.device, seed: int = 0) -> Callable:
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = torch.randn(B, d, generator=g).to(device)
    return lambda z: torch.sin(torch.add(c, z, alpha=3.0))


def deqfast_anderson(f, z0, T, m):
    import deqfast
    return deqfast.solvers.anderson(f, z0, max_iter=T, tol=0.0, m=m, lam=1e-4)


def solver_impls(device: torch.device) -> Dict[str, Optional[Callable]]:
    """name -> solve(f, z0, T, m), or None where that implementation is not available here.

    deqfast.solvers.anderson runs the fused ops when they are compiled for ``device`` ("deqfast
    fused"), else the pure-PyTorch reference. In the first case the reference is None here and
    ``reference_in_subprocess`` measures it.
    """
    fused = common.deqfast_fused_available(device)
    impls: Dict[str, Optional[Callable]] = {
        "deqfast_reference": None if fused else deqfast_anderson,
        "deqfast_fused": deqfast_anderson if fused else None,
        "torchdeq": None,
    }
    torchdeq = common.torchdeq_module()
    if torchdeq is not None:
        anderson = torchdeq.solver.get_solver("anderson")
        impls["torchdeq"] = lambda f, z0, T, m: anderson(f, z0, max_iter=T, tol=0.0, stop_mode="abs", m=m, lam=1e-4)
    return impls


def final_rel_residual(f: Callable, z: torch.Tensor) -> float:
    with torch.no_grad():
        fz = f(z)
        return float(((fz - z).norm(dim=1) / fz.norm(dim=1)).max())


def measure_impl(solve: Callable, f: Callable, z0: torch.Tensor, T: int, m: int, cfg, repeats: int,
                 f_ops: int) -> dict:
    """Iteration time, f evaluations and host syncs of one implementation on one problem."""
    calls = [0]

    def counted(z):
        calls[0] += 1
        return f(z)

    with torch.no_grad():
        out = solve(counted, z0, T, m)  # warm-up and NFE count
        z = out[0]
        seconds = common.time_function(lambda: solve(f, z0, T, m), cfg.device, repeats=repeats, warmup=1)
        syncs = common.count_host_syncs(lambda: solve(f, z0, T, m), cfg.device)
        ops = common.count_aten_ops(lambda: solve(f, z0, T, m))
    return {
        "ops_per_iteration": (ops - calls[0] * f_ops) / T,
        "iteration_us": seconds["median_s"] / T * 1e6,
        "iteration_us_min": seconds["min_s"] / T * 1e6,
        "nfe": calls[0],
        "final_rel_residual": final_rel_residual(f, z.reshape(z0.shape)),
        "host_syncs_per_iteration": None if syncs is None else syncs / T,
    }


def _cuda_graph_capture(fn: Callable[[], None]) -> Callable[[], None]:
    """fn captured in a CUDA graph (after a warm-up call on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure_graphed(f: Callable, z0: torch.Tensor, m: int, cfg, repeats: int, capture=None) -> dict:
    """Iteration and f times of the fused Anderson step replayed from a CUDA graph (see the module
    docstring). ``capture(fn) -> replay``: a CUDA graph by default; the tests pass one that runs fn
    eagerly, to check the buffer logic on the CPU."""
    from deqfast import ops
    from deqfast.reference import SampleState

    capture = capture or _cuda_graph_capture
    B, d = z0.shape
    lam = 1e-4
    with torch.no_grad():
        x_static = z0.clone()
        F = torch.zeros(B, m, d, dtype=z0.dtype, device=z0.device)
        G = torch.zeros_like(F)
        gram = torch.zeros(B, m, m, dtype=torch.float32, device=z0.device)
        state = SampleState(x_static, 0.0, "rel")  # tol 0: no sample freezes, every step is done in full

        def steps(n_filled_at, count: int) -> None:
            x = x_static
            for j in range(count):
                fx = f(x)
                _, _, partials = ops.anderson_history(x, fx, F, G, j % m, fused=True)
                _, x = ops.anderson_step(x, F, G, gram, partials, state, n_filled_at(j), j % m, lam, 1.0, fused=True)
            x_static.copy_(x)

        steps(lambda j: j + 1, m)  # fill the history: from here on every turn is the same m steps
        turn = lambda: steps(lambda j: m, m)
        live = [x_static, F, G, gram, state.best_x, state.residual, state.rel_residual, state.nstep,
                state.converged, state.failed]
        snapshot = [t.clone() for t in live]
        replay = capture(turn)  # the capture's warm-up call advances the state: restore it
        for t, saved in zip(live, snapshot):
            t.copy_(saved)
        turn()
        expected = x_static.clone()
        for t, saved in zip(live, snapshot):
            t.copy_(saved)
        replay()
        common.synchronize(cfg.device)
        max_diff = float((x_static - expected).abs().max())
        iteration_s = common.time_function(replay, cfg.device, repeats=repeats, warmup=2)["median_s"] / m

        y_static = f(z0)

        def f_turn() -> None:
            y = y_static
            for _ in range(m):
                y = f(y)
            y_static.copy_(y)

        f_s = common.time_function(capture(f_turn), cfg.device, repeats=repeats, warmup=2)["median_s"] / m
    return {"iteration_us": iteration_s * 1e6, "f_us": f_s * 1e6, "replay_vs_eager_max_abs_diff": max_diff,
            "iterations_per_replay": m}


def make_problem(B: int, d: int, device: torch.device):
    """f and a random z0, the same in every process (fixed seeds)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    return make_f(B, d, device), torch.randn(B, d, generator=g).to(device)


def measure_size(B: int, d: int, m: int, T: int, bandwidth: float, impls, cfg, repeats: int,
                 reference: Optional[dict] = None) -> dict:
    """One row: f time, floor and each implementation's figures (``reference``: the reference's
    measure_impl result from a child process, when it could not run here)."""
    f, z0 = make_problem(B, d, cfg.device)
    with torch.no_grad():
        # f alone on a typical iterate (|z| <= 1, as inside the solve): sin costs more on the wide
        # random z0 (argument reduction), which made overhead = iteration - f too small at large d.
        z_typical = f(z0)
        f_us = common.time_function(lambda: f(z_typical), cfg.device, repeats=repeats, warmup=3, inner=10)["median_s"] * 1e6
        f_ops = common.count_aten_ops(lambda: f(z0))
    floor_bytes = (2 * m + 3) * B * d * z0.element_size()
    floor_us = floor_bytes / bandwidth * 1e6
    row = {"B": B, "d": d, "m": m, "T": T, "f_us": f_us, "floor_bytes": floor_bytes, "floor_us": floor_us}
    for name, solve in impls.items():
        if solve is None:
            row[name] = reference if name == "deqfast_reference" else None
        else:
            row[name] = measure_impl(solve, f, z0, T, m, cfg, repeats, f_ops)
        r = row[name]
        if r is None:
            continue
        r["overhead_us"] = r["iteration_us"] - f_us
        r["overhead_over_floor"] = r["overhead_us"] / floor_us
        row[name] = r
    if cfg.cuda and row.get("deqfast_fused") is not None:
        try:
            g = measure_graphed(f, z0, m, cfg, repeats)
            g["overhead_us"] = g["iteration_us"] - g["f_us"]
            g["overhead_over_floor"] = g["overhead_us"] / floor_us
            row["deqfast_fused_graphed"] = g
        except Exception as exc:  # a failed capture must not cost the rest of the run
            print(f"(deqfast_fused_graphed at B{B} d{d}: {type(exc).__name__}: {exc})")
            row["deqfast_fused_graphed"] = {"error": f"{type(exc).__name__}: {exc}"}
    tdq = row.get("torchdeq")
    for name in ("deqfast_reference", "deqfast_fused"):
        x = row.get(name)
        row[f"torchdeq_over_{name}"] = tdq["overhead_us"] / x["overhead_us"] if tdq and x else None
    return row


def reference_in_subprocess(sizes, T: int, repeats: int, cfg) -> List[Optional[dict]]:
    """measure_impl of the pure-PyTorch reference for every size, in a child process where
    DEQFAST_DISABLE_EXTENSION=1 (deqfast reads it when it first loads the extension)."""
    job = {"sizes": sizes, "T": T, "repeats": repeats, "device": str(cfg.device), "threads": torch.get_num_threads()}
    env = {**os.environ, "DEQFAST_DISABLE_EXTENSION": "1"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--reference-worker", json.dumps(job)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"(reference column: the child process failed: {proc.stderr.strip()[-500:]})")
        return [None] * len(sizes)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _reference_worker(job: dict) -> None:
    """Child process: print the reference's measure_impl results for job["sizes"] as JSON."""
    device = torch.device(job["device"])
    common.fix_malloc_thresholds()  # as run.py does for the parent
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    torch.set_num_threads(job["threads"])
    cfg = common.Config(device=device, quick=False, out=None)
    out = []
    for B, d, m in job["sizes"]:
        f, z0 = make_problem(B, d, device)
        with torch.no_grad():
            f_ops = common.count_aten_ops(lambda: f(z0))
        out.append(measure_impl(deqfast_anderson, f, z0, job["T"], m, cfg, job["repeats"], f_ops))
    print(json.dumps(out))


BROYDEN_EXTRA_CPU = [(8, 30720)]


def broyden_impls() -> Dict[str, Optional[Callable]]:
    """name -> solve(f, z0, T) doing exactly T evaluations of f (checked by counting)."""
    import deqfast
    impls: Dict[str, Optional[Callable]] = {
        "deqfast": lambda f, z0, T: deqfast.solvers.broyden(f, z0, max_iter=T, tol=0.0, m=T),
        "torchdeq": None,
    }
    torchdeq = common.torchdeq_module()
    if torchdeq is not None:
        broyden = torchdeq.solver.get_solver("broyden")
        impls["torchdeq"] = lambda f, z0, T: broyden(f, z0, max_iter=T - 1, tol=0.0, stop_mode="abs")
    return impls


def _count_and_time(solve: Callable, f: Callable, z0: torch.Tensor, T: int, cfg, repeats: int):
    """(evaluations of f in one solve(f, z0, T), counted; common.time_function's timing of it)."""
    calls = [0]

    def counted(z):
        calls[0] += 1
        return f(z)

    solve(counted, z0, T)
    return calls[0], common.time_function(lambda: solve(f, z0, T), cfg.device, repeats=repeats, warmup=1)


def measure_broyden(B: int, d: int, T: int, cfg, repeats: int) -> dict:
    f, z0 = make_problem(B, d, cfg.device)
    row = {"B": B, "d": d, "T": T}
    with torch.no_grad():
        z_typical = f(z0)
        row["f_us"] = common.time_function(lambda: f(z_typical), cfg.device, repeats=repeats, warmup=3, inner=10)["median_s"] * 1e6
        for name, solve in broyden_impls().items():
            if solve is None:
                row[name] = None
                continue
            nfe, seconds = _count_and_time(solve, f, z0, T, cfg, repeats)
            row[name] = {"nfe": nfe, "solve_ms": seconds["median_s"] * 1e3, "solve_ms_min": seconds["min_s"] * 1e3,
                         "per_evaluation_us": seconds["median_s"] / nfe * 1e6,
                         "overhead_per_evaluation_us": seconds["median_s"] / nfe * 1e6 - row["f_us"]}
    mine, theirs = row["deqfast"], row.get("torchdeq")
    row["torchdeq_over_deqfast"] = theirs["solve_ms"] / mine["solve_ms"] if theirs else None
    return row


HOST_T = 200


def host_impls() -> Dict[str, Optional[Callable]]:
    """name -> solve(f, z0, T) doing exactly T evaluations of f (checked by counting)."""
    import deqfast
    impls: Dict[str, Optional[Callable]] = {
        "deqfast anderson (m 5)": lambda f, z0, T: deqfast.solvers.anderson(f, z0, max_iter=T, tol=0.0, m=5, lam=1e-4),
        "deqfast fixed_point": lambda f, z0, T: deqfast.solvers.fixed_point_iteration(f, z0, max_iter=T, tol=0.0),
        "deqfast broyden (m 5)": lambda f, z0, T: deqfast.solvers.broyden(f, z0, max_iter=T, tol=0.0, m=5),
    }
    torchdeq = common.torchdeq_module()
    if torchdeq is not None:
        anderson = torchdeq.solver.get_solver("anderson")
        fixed_point = torchdeq.solver.get_solver("fixed_point_iter")
        impls["torchdeq anderson (m 5)"] = lambda f, z0, T: anderson(f, z0, max_iter=T, tol=0.0, stop_mode="abs", m=5,
                                                                    lam=1e-4)
        impls["torchdeq fixed_point_iter"] = lambda f, z0, T: fixed_point(f, z0, max_iter=T, tol=0.0, stop_mode="abs")
    return impls


def measure_host(cfg, repeats: int) -> List[dict]:
    """Overhead per iteration at B = d = 1 (see the module docstring): iteration − f, µs."""
    f, z0 = make_problem(1, 1, cfg.device)
    rows = []
    with torch.no_grad():
        z_typical = f(z0)
        f_us = common.time_function(lambda: f(z_typical), cfg.device, repeats=repeats, warmup=3, inner=50)["median_s"] * 1e6
        for name, solve in host_impls().items():
            nfe, seconds = _count_and_time(solve, f, z0, HOST_T, cfg, repeats)
            iteration_us = seconds["median_s"] / HOST_T * 1e6
            rows.append({"solver": name, "nfe": nfe, "f_us": f_us, "iteration_us": iteration_us,
                         "overhead_us": iteration_us - f_us})
    return rows


HOST_HEADERS = ["solver", "evaluations", "f µs", "iteration µs", "host overhead µs"]


def host_table_rows(rows):
    return [[r["solver"], r["nfe"], r["f_us"], r["iteration_us"], r["overhead_us"]] for r in rows]


BROYDEN_HEADERS = ["B x d", "solver", "evaluations", "f µs", "solve ms", "per evaluation µs", "overhead/evaluation µs",
                   "torchdeq/this"]


def broyden_table_rows(rows):
    out = []
    for r in rows:
        for name in ("deqfast", "torchdeq"):
            x = r.get(name)
            if x is None:
                continue
            out.append([f"{r['B']}x{r['d']}", name, x["nfe"], r["f_us"], x["solve_ms"], x["per_evaluation_us"],
                        x["overhead_per_evaluation_us"],
                        r["torchdeq"]["solve_ms"] / x["solve_ms"] if r.get("torchdeq") else None])
    return out


IMPLS = ["deqfast_reference", "deqfast_fused", "torchdeq"]
GRAPHED = "deqfast_fused_graphed"
HEADERS = ["B x d, m", "solver", "f µs", "floor µs", "iteration µs", "overhead µs", "overhead/floor",
           "torchdeq/this", "ops/it", "syncs/it", "final rel res"]


def table_rows(rows):
    """One line per (size, implementation); absent implementations show as —."""
    out = []
    for r in rows:
        tdq = r.get("torchdeq")
        for name in IMPLS:
            x = r.get(name)
            size = f"{r['B']}x{r['d']} m{r['m']}"
            if x is None:
                out.append([size, name, r["f_us"], r["floor_us"]] + [None] * 7)
                continue
            out.append([size, name, r["f_us"], r["floor_us"], x["iteration_us"], x["overhead_us"],
                        x["overhead_over_floor"], tdq["overhead_us"] / x["overhead_us"] if tdq else None,
                        x["ops_per_iteration"], x["host_syncs_per_iteration"], x["final_rel_residual"]])
        g = r.get(GRAPHED)
        if g is not None and "error" not in g:  # CUDA only; its own f time, in a graph too
            out.append([size, GRAPHED, g["f_us"], r["floor_us"], g["iteration_us"], g["overhead_us"],
                        g["overhead_over_floor"], tdq["overhead_us"] / g["overhead_us"] if tdq else None,
                        None, 0, None])
    return out


def plot(rows, path, plt, label: str) -> None:
    """Bars of overhead / floor per size and implementation, each labelled with its value (the
    log axis spans two decades; ticks at 1, 2 and 5 of each)."""
    ticker = plt.matplotlib.ticker
    names = [n for n in IMPLS if any(r.get(n) for r in rows)]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(rows))]
        ys = [r[name]["overhead_over_floor"] if r.get(name) else float("nan") for r in rows]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, labels=[f"{y:.2g}×" if y == y else "" for y in ys], fontsize=7, padding=2)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="floor (overhead = floor)")
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"B{r['B']} d{r['d']} m{r['m']}" for r in rows])
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(range(1, 10))))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(True, axis="y", which="major", alpha=0.3)
    top = max((r[n]["overhead_over_floor"] for r in rows for n in names if r.get(n)), default=1.0)
    # A log axis shows positive ratios only: on a busy machine the overhead (iteration − f, two
    # noisy times) can come out negative; the table shows it, the bar is left out of the scale.
    bottom = min((r[n]["overhead_over_floor"] for r in rows for n in names
                  if r.get(n) and r[n]["overhead_over_floor"] > 0), default=1.0)
    ax.set_ylim(min(bottom, 1.0) / 1.5, max(top, 1.0) * 2.0)  # room for the value labels
    ax.set_ylabel("overhead per iteration / byte floor (log)")
    ax.set_title(f"Anderson overhead per iteration ({label})", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    common.save_figure(fig, path)


def run(cfg, info: dict) -> dict:
    sizes = SIZES_CUDA if cfg.cuda else SIZES_CPU
    T = 30
    repeats = cfg.pick(quick=15, cpu=31, cuda=25, cuda_quick=9)
    impls = solver_impls(cfg.device)
    bandwidth = common.copy_bandwidth(cfg.device, nbytes=cfg.pick(quick=128, cpu=256, cuda=1024, cuda_quick=512) * 2 ** 20)
    references = [None] * len(sizes)
    if impls["deqfast_reference"] is None:
        print("(deqfast's fused ops are active: measuring the reference column in a child process)")
        references = reference_in_subprocess(sizes, T, repeats, cfg)
    progress = common.Progress(len(sizes), "overhead")
    rows = []
    for (B, d, m), reference in zip(sizes, references):
        rows.append(measure_size(B, d, m, T, bandwidth, impls, cfg, repeats, reference))
        progress.advance(f"B{B} d{d}")
    progress.close()

    broyden_sizes = [(B, d) for B, d, _ in sizes] + ([] if cfg.cuda else BROYDEN_EXTRA_CPU)
    broyden_rows = [measure_broyden(B, d, T, cfg, cfg.pick(quick=5, cpu=9, cuda=15, cuda_quick=5))
                    for B, d in broyden_sizes]

    host_rows = measure_host(cfg, cfg.pick(quick=5, cpu=9, cuda=9, cuda_quick=5))

    label = common.device_label(info)
    title = f"Anderson overhead per iteration, µs (T={T} forced iterations, fp32, {label}, copy {bandwidth / 1e9:.1f} GB/s)"
    common.print_table(title, HEADERS, table_rows(rows))
    result = {"benchmark": "overhead", "device_label": label, "T": T, "repeats": repeats,
              "copy_bandwidth_GBps": bandwidth / 1e9, "f": "sin(3z + c)", "lam": 1e-4, "rows": rows,
              "broyden_rows": broyden_rows, "host_T": HOST_T, "host_rows": host_rows}
    broyden_title = f"Broyden at equal evaluations (T={T}, tol 0, every update kept), fp32, {label}"
    common.print_table(broyden_title, BROYDEN_HEADERS, broyden_table_rows(broyden_rows))
    host_title = f"Host time per iteration at B = d = 1 (T={HOST_T} forced iterations, fp32, {label})"
    common.print_table(host_title, HOST_HEADERS, host_table_rows(host_rows))
    common.write_json(cfg.out / "overhead.json", result)
    note = ("overhead = iteration − f; floor = (2m+3)·N·4 bytes at the copy bandwidth measured in this run. "
            "deqfast_reference = deqfast.solvers.anderson on the pure-PyTorch path; deqfast_fused = the same call "
            "with the compiled ops (— when not compiled for this device); torchdeq = torchdeq 0.1.0 anderson_solver. "
            "deqfast_fused_graphed (CUDA): m fused iterations captured in one CUDA graph and replayed, f time "
            "from f replayed the same way (the kernels without the host loop; syncs 0: a capture fails on any). "
            "torchdeq/this: torchdeq's overhead over this solver's. ops/it: operators dispatched per iteration "
            "besides f's (each >= 1 kernel launch on a GPU). syncs/it: host synchronisations per iteration (CUDA "
            "only). final rel res: worst ‖f(z) − z‖/‖f(z)‖ after the forced iterations (far above any usual tol: "
            "no solver converged, as intended).")
    common.write_markdown(cfg.out / "overhead.md", "Solver overhead per iteration",
                          [(None, title), (None, common.format_table(HEADERS, table_rows(rows), markdown=True)),
                           (None, note), ("Broyden", broyden_title),
                           (None, common.format_table(BROYDEN_HEADERS, broyden_table_rows(broyden_rows), markdown=True)),
                           (None, "deqfast = deqfast.solvers.broyden (m = T: every update kept, as torchdeq does); "
                                  "torchdeq = torchdeq 0.1.0 broyden_solver (max_iter = T − 1: it evaluates f once "
                                  "before its first step). Equal evaluations, counted. torchdeq/this: torchdeq's "
                                  "solve time over this one's."),
                           ("Host time", host_title),
                           (None, common.format_table(HOST_HEADERS, host_table_rows(host_rows), markdown=True)),
                           (None, "A state of one number: what is left of an iteration is the Python loop, the op "
                                  "dispatch and the host checks (check_every = 1 on the CPU), i.e. the host time an "
                                  "eager solve spends per iteration on any device. host overhead = iteration − f.")])
    plt = common.pyplot()
    if plt is not None:
        plot(rows, cfg.out / "overhead.png", plt, label)
    return result


def replot(result: dict, out, plt) -> None:
    """Redraw overhead.png from overhead.json's contents (run.py --replot)."""
    plot(result["rows"], out / "overhead.png", plt, result["device_label"])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--reference-worker":
    _reference_worker(json.loads(sys.argv[2]))
