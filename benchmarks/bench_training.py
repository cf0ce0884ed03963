"""Benchmark 2: one training step (forward solve + backward) per backward mode.

For each cell of cells.py (conv, MLP, transformer-style) at this run's size, one step is
``z = layer(x); loss = <z, w>; loss.backward()`` (w random), with T forced forward iterations
(tol = 0) and, where the backward iterates, T forced adjoint iterations (backward_tol = 0), so
that every method does the work benchmarks/README.md's anchor describes ("30 forward iterations and 30
backward iterations"). Methods:

* deqfast, Anderson forward (m = 5), each backward mode: implicit (fixed-point adjoint, T steps),
  neumann (5 terms), jfb, phantom (5 steps, tau 0.5), bptt (through the Anderson iterations);
* torchdeq 0.1.0: get_deq(f_solver="anderson", ift=True, b_solver="fixed_point_iter") with the
  same T, m, lam and tolerances 0 (when importable);
* BPTT: autograd through T plain unrolled steps z <- f(z, x);
* compute floor: T evaluations of f without grad + one with grad + T VJPs + one backward to the
  parameters (what any implicit-gradient step must do at least), and T evaluations of f alone.

Measured per method: time (median of repeats; forward and backward split), autograd memory
(bytes of the tensors saved for backward, each distinct storage once, parameters and inputs
excluded, split into saved during forward and during backward; on CUDA also the peak of the
caching allocator above the baseline), forward f evaluations, f evaluations inside backward,
and VJPs through f (counted by an identity probe on f's output; the final backward to the
parameters counts as one).

A second table per cell, backward_warm_start: not forced, but to tolerance (forward tol 1e-4,
backward_tol 1e-6, deqfast's defaults), the implicit adjoint from zero against the one started and
preconditioned from the forward's history (Anderson m = 5, m = 10; Broyden m = 10), with the
fixed-point adjoint (the default), the Anderson adjoint and the Broyden adjoint: VJPs to reach backward_tol (mean
per sample, from stats.backward.nstep), backward time (median), and each gradient's relative error
against a float64 reference (the same cell in float64, forward tol 1e-11, plain adjoint to 1e-12).
Its last row is the Krylov reference: the adjoint from zero by Anderson with more memory than steps
(GMRES on the linear adjoint system), the fewest VJPs any method from zero that sees J only through
VJPs reaches -- what bounds the cells' ratios.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

import cells
import common

BACKWARD_MODES = ["implicit", "neumann", "jfb", "phantom", "bptt"]


def deqfast_step(mode: str, T: int, m: int) -> Callable:
    import deqfast

    kwargs = dict(solver="anderson", max_iter=T, tol=0.0, m=m, lam=1e-4, backward=mode,
                  backward_solver="fixed_point", backward_max_iter=T, backward_tol=0.0,
                  neumann_terms=5, phantom_steps=5, phantom_tau=0.5)

    def forward(f, z0):
        return deqfast.fixed_point(f, z0, **kwargs)[0]

    return forward


def torchdeq_step(T: int, m: int) -> Optional[Callable]:
    torchdeq = common.torchdeq_module()
    if torchdeq is None:
        return None
    deq = torchdeq.get_deq(f_solver="anderson", f_max_iter=T, f_tol=0.0, f_stop_mode="abs",
                           b_solver="fixed_point_iter", b_max_iter=T, b_tol=0.0, b_stop_mode="abs", ift=True)
    deq.train()

    def forward(f, z0):
        z_list, _ = deq(f, z0, solver_kwargs={"m": m, "lam": 1e-4})
        return z_list[-1]

    return forward


def methods(T: int, m: int) -> Dict[str, Optional[Callable]]:
    """name -> forward(f, z0) -> z with a graph to backpropagate (None: not available)."""
    # These calls run deqfast's fused ops once they are compiled for the device (machine.json and
    # the table titles say which path ran: common.deqfast_fused_available).
    out: Dict[str, Optional[Callable]] = {f"deqfast {mode}": deqfast_step(mode, T, m) for mode in BACKWARD_MODES}
    out["torchdeq anderson+ift"] = torchdeq_step(T, m)
    out["BPTT (unrolled)"] = common.unrolled_forward(T)
    return out


def make_training_step(forward: Callable, f: Callable, problem, w: torch.Tensor) -> Callable:
    params = list(problem.cell.parameters())

    def step(clock):
        for p in params:
            p.grad = None
        z = forward(f, problem.z0)
        loss = (z * w).sum()
        clock.lap("forward")
        loss.backward()
        clock.lap("backward")

    return step


def make_floor_step(f: Callable, problem, w: torch.Tensor, T: int) -> Callable:
    """T f without grad, one f with grad, T VJPs (retain_graph), one backward to the parameters."""
    params = list(problem.cell.parameters())

    def step(clock):
        for p in params:
            p.grad = None
        with torch.no_grad():
            z = problem.z0
            for _ in range(T):
                z = f(z)
        z_leaf = z.requires_grad_()
        fz = f(z_leaf)
        clock.lap("forward")
        v = w
        for _ in range(T):
            v = torch.autograd.grad(fz, z_leaf, v, retain_graph=True)[0]
        fz.backward(v)
        clock.lap("backward")

    return step


def make_f_alone_step(f: Callable, problem, T: int) -> Callable:
    def step(clock):
        with torch.no_grad():
            z = problem.z0
            for _ in range(T):
                z = f(z)
        clock.lap("forward")

    return step


def measure(step: Callable, counter, problem, w, cfg, repeats: int, warmup: int) -> dict:
    exclude = [*problem.cell.parameters(), *problem.cell.buffers(), problem.x, problem.z0, w]
    result = common.measure_step(step, cfg.device, counter, exclude)
    times = common.time_repeats(step, cfg.device, repeats=repeats, warmup=warmup, budget_s=cfg.pick(quick=3, cpu=30, cuda=30, cuda_quick=3))
    result["time_ms"] = times["total"]["median_s"] * 1e3
    result["time_ms_min"] = times["total"]["min_s"] * 1e3
    result["forward_ms"] = times["forward"]["median_s"] * 1e3
    result["backward_ms"] = times["backward"]["median_s"] * 1e3 if "backward" in times else None
    result["repeats"] = len(times["total"]["samples"])
    return result


def run_cell(problem, T: int, m: int, cfg, progress, repeats: int, warmup: int) -> dict:
    counter = common.CallCounter(problem.cell)
    f = lambda z: counter(z, problem.x)  # noqa: E731
    g = torch.Generator(device="cpu").manual_seed(2)
    w = torch.randn(problem.z0.shape, generator=g).to(cfg.device)
    rows = {}
    steps = {name: (None if fwd is None else make_training_step(fwd, f, problem, w)) for name, fwd in methods(T, m).items()}
    steps["compute floor"] = make_floor_step(f, problem, w, T)
    steps[f"{T} f alone (no grad)"] = make_f_alone_step(f, problem, T)
    for name, step in steps.items():
        rows[name] = None if step is None else measure(step, counter, problem, w, cfg, repeats, warmup)
        progress.advance(f"{problem.name}: {name}")
    floor, bptt = rows["compute floor"], rows["BPTT (unrolled)"]
    for r in rows.values():
        if r is None:
            continue
        r["time_over_floor"] = r["time_ms"] / floor["time_ms"]
        r["saved_over_bptt"] = r["saved_bytes"] / bptt["saved_bytes"] if bptt["saved_bytes"] else None
        peak, bptt_peak = r["cuda_peak_extra_bytes"], bptt["cuda_peak_extra_bytes"]
        r["cuda_peak_over_bptt"] = peak / bptt_peak if peak is not None and bptt_peak else None
    return {"cell": problem.name, "sizes": problem.sizes, "params": problem.params, "T": T, "m": m, "methods": rows}


# (forward solver, m, adjoint solver); each from zero and warm-started.
WARM_CONFIGS = [("anderson", 5, "fixed_point"), ("anderson", 10, "fixed_point"), ("broyden", 10, "fixed_point"),
                ("anderson", 5, "anderson"), ("anderson", 10, "anderson"), ("broyden", 10, "anderson"),
                ("anderson", 10, "broyden"), ("broyden", 10, "broyden")]
# The adjoint from zero by Anderson with a memory longer than the steps it takes: for a linear
# system that is GMRES (Walker & Ni 2011), the fewest VJPs any Krylov method from zero can reach.
KRYLOV_M = 64


def _param_grads(problem, w, **kwargs):
    """Gradients of <z*, w> for the parameters, with the forward and backward stats."""
    import deqfast
    params = list(problem.cell.parameters())
    z, stats = deqfast.fixed_point(lambda z: problem.cell(z, problem.x), problem.z0, **kwargs)
    grads = torch.autograd.grad((z * w).sum(), params)
    return torch.cat([g.reshape(-1) for g in grads]), stats


def warm_start_cell(problem, cfg, repeats: int) -> dict:
    """The adjoint to backward_tol from zero vs backward_warm_start, per forward and adjoint solver
    (see above), and the Krylov reference: the adjoint from zero by full-memory Anderson."""
    import copy
    g = torch.Generator(device="cpu").manual_seed(2)
    w = torch.randn(problem.z0.shape, generator=g).to(cfg.device)
    ref_problem = copy.copy(problem)
    ref_problem.cell = copy.deepcopy(problem.cell).double()
    ref_problem.x, ref_problem.z0 = problem.x.double(), problem.z0.double()
    reference, _ = _param_grads(ref_problem, w.double(), solver="anderson", m=10, max_iter=500, tol=1e-11,
                                backward_max_iter=3000, backward_tol=1e-12)
    params = list(problem.cell.parameters())
    runs = [(solver, m, backward_solver, warm) for solver, m, backward_solver in WARM_CONFIGS for warm in (False, True)]
    runs.append(("anderson", 5, f"anderson m{KRYLOV_M}", False))
    rows = []
    for solver, m, backward_solver, warm in runs:
        kwargs = dict(solver=solver, m=m, max_iter=100, tol=1e-4, backward_tol=1e-6, backward_max_iter=500,
                      backward_solver="anderson" if backward_solver.startswith("anderson") else backward_solver,
                      backward_warm_start=warm)
        if backward_solver == f"anderson m{KRYLOV_M}":
            kwargs["m"] = KRYLOV_M  # the forward too (one m for both); its NFE is not compared here
        grad, stats = _param_grads(problem, w, **kwargs)

        def step(clock):
            z, _ = deqfast_fixed_point()(lambda z: problem.cell(z, problem.x), problem.z0, **kwargs)
            loss = (z * w).sum()
            clock.lap("forward")
            torch.autograd.grad(loss, params)
            clock.lap("backward")

        times = common.time_repeats(step, cfg.device, repeats=repeats, warmup=1,
                                    budget_s=cfg.pick(quick=3, cpu=20, cuda=20, cuda_quick=3))
        rows.append({"solver": solver, "m": m, "backward_solver": backward_solver, "warm_start": warm,
                     "forward_nfe": float(stats.nstep.double().mean()),
                     "vjps": float(stats.backward.nstep.double().mean()),
                     "backward_converged": float(stats.backward.converged.double().mean()),
                     "forward_ms": times["forward"]["median_s"] * 1e3,
                     "backward_ms": times["backward"]["median_s"] * 1e3,
                     "grad_rel_error": float((grad.double() - reference).norm() / reference.norm())})
    return {"cell": problem.name, "rows": rows}


def deqfast_fixed_point():
    import deqfast
    return deqfast.fixed_point


WARM_HEADERS = ["forward", "adjoint", "start", "fwd NFE", "VJPs to backward_tol", "fixed-point from zero / this",
                "same adjoint from zero / this", "converged", "bwd ms", "bwd ms same adjoint from zero / this",
                "grad rel err vs float64"]


def warm_table_rows(cell_result):
    rows = cell_result["rows"]

    def zero(r):
        """The run from zero with r's forward solver and m and the adjoint named."""
        return next(p for p in rows if (p["solver"], p["m"], p["backward_solver"], p["warm_start"])
                    == (r["solver"], r["m"], r["backward_solver"], False))

    out = []
    for r in rows:
        baseline = next((p for p in rows if (p["solver"], p["m"], p["backward_solver"], p["warm_start"])
                         == (r["solver"], r["m"], "fixed_point", False)), rows[0])
        same = zero(r)
        out.append([f"{r['solver']} m{r['m']}", r["backward_solver"], "warm start" if r["warm_start"] else "from zero",
                    r["forward_nfe"], r["vjps"], baseline["vjps"] / r["vjps"], same["vjps"] / r["vjps"],
                    r["backward_converged"], r["backward_ms"], same["backward_ms"] / r["backward_ms"],
                    r["grad_rel_error"]])
    return out


HEADERS = ["method", "ms", "fwd ms", "bwd ms", "x floor", "saved MiB", "x BPTT", "peak MiB (cuda)",
           "fwd NFE", "f in bwd", "VJPs"]


def table_rows(cell_result):
    rows = []
    for name, r in cell_result["methods"].items():
        if r is None:
            rows.append([name] + [None] * (len(HEADERS) - 1))
            continue
        peak = r["cuda_peak_extra_bytes"]
        rows.append([name, r["time_ms"], r["forward_ms"], r["backward_ms"], r["time_over_floor"],
                     r["saved_bytes"] / 2 ** 20, r["saved_over_bptt"], None if peak is None else peak / 2 ** 20,
                     r["nfe_forward"], r["f_calls_in_backward"], r["vjps"]])
    return rows


def plot_label(name: str) -> str:
    """Axis label of a method: deqfast's modes by name; the two BPTTs told apart (deqfast's mode
    differentiates through the solver's iterations, the baseline through a plain loop)."""
    return {"deqfast bptt": "bptt (deqfast solver)", "BPTT (unrolled)": "bptt (plain unrolled loop)",
            "torchdeq anderson+ift": "torchdeq anderson+ift"}.get(name, name.replace("deqfast ", ""))


def plot(results, path, plt, label: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [n for n in results[0]["methods"] if not n.endswith("(no grad)")]
    width = 0.8 / len(results)
    for i, res in enumerate(results):
        ms = res["methods"]
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, [ms[n]["time_over_floor"] if ms[n] else 0 for n in names], width, label=res["cell"])
        axes[1].bar(xs, [ms[n]["saved_over_bptt"] or 0 if ms[n] else 0 for n in names], width, label=res["cell"])
    for ax, ylabel in zip(axes, ["step time / compute floor", "autograd memory / unrolled bptt"]):
        ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(names))])
        ax.set_xticklabels([plot_label(n) for n in names], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle(f"Training step, T={results[0]['T']} forward + backward iterations ({label})", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, path)


def run(cfg, info: dict) -> dict:
    T = 30
    m = 5
    repeats = cfg.pick(quick=7, cpu=11, cuda=20, cuda_quick=5)
    warmup = cfg.pick(quick=1, cpu=2, cuda=3, cuda_quick=1)  # the measured call before the timed ones also warms up
    problems = cells.problems(cfg)
    n_methods = len(methods(T, m)) + 2
    progress = common.Progress(len(problems) * n_methods, "training")
    results = [run_cell(p, T, m, cfg, progress, repeats, warmup) for p in problems.values()]
    progress.close()

    label = common.device_label(info)
    sections = [
        common.table_section(
            f"Training step, {res['cell']} cell ({' '.join(f'{k}={v}' for k, v in res['sizes'].items())}, "
            f"P={res['params']}), T={T}, deqfast {info['deqfast_path']}, {label}",
            HEADERS, table_rows(res))
        for res in results
    ]
    sections.append((None, (
        "x floor: time / compute floor (T f no-grad + 1 f + T VJPs + 1 backward, same run). saved MiB: bytes autograd "
        "saves for backward (distinct storages, parameters and inputs excluded; forward + backward phases), the "
        "memory a backward mode costs; on CUDA the allocator peak is given too. fwd NFE / f in bwd / VJPs: counted "
        "calls of f in forward, calls of f inside backward (torchdeq re-runs f there), vector-Jacobian products "
        "through f (the final backward to the parameters counts as one).")))
    warm_results = [warm_start_cell(p, cfg, cfg.pick(quick=3, cpu=5, cuda=10, cuda_quick=3)) for p in problems.values()]
    for res in warm_results:
        sections.append(common.table_section(
            f"backward_warm_start, {res['cell']} cell: adjoint to backward_tol 1e-6 (forward tol 1e-4), {label}",
            WARM_HEADERS, warm_table_rows(res)))
    sections.append((None, (
        "VJPs to backward_tol: mean per sample (stats.backward.nstep). fixed-point from zero / this: the default "
        "adjoint's VJPs (fixed-point iteration from zero, same forward) over this row's; same adjoint from zero / "
        "this: the same adjoint solver's from zero. The last row, Anderson with a memory of "
        f"{KRYLOV_M} from zero, is GMRES-equivalent: the fewest VJPs any Krylov method from zero reaches, so a "
        "ratio it cannot reach says the cell's Jacobian leaves no room for it. grad rel err: ‖∇θ − ∇θ(float64 reference)‖/‖∇θ(reference)‖, the reference solved in float64 to "
        "1e-11 / 1e-12; both rows of a pair share the forward tolerance, which dominates it.")))
    result = {"benchmark": "training", "device_label": label, "deqfast_path": info["deqfast_path"], "T": T, "m": m, "repeats": repeats, "cells": results,
              "warm_start": warm_results}
    common.write_json(cfg.out / "training.json", result)
    common.write_markdown(cfg.out / "training.md", "Training step: time, autograd memory, NFE", sections)
    plt = common.pyplot()
    if plt is not None:
        plot(results, cfg.out / "training.png", plt, label)
    return result


def replot(result: dict, out, plt) -> None:
    """Redraw training.png from training.json's contents (run.py --replot)."""
    plot(result["cells"], out / "training.png", plt, result["device_label"])
