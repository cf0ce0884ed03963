"""Benchmark 3: the seed's complexity table, measured.

The seed (implicit-differentiation-through-equilibria.md) states, for T iterations, k adjoint
steps and P parameters:

    BPTT                                 time O(TP)   space O(TP)
    implicit, k fixed-point / Neumann    time O(kP)   space O(P)
    zero-th order Neumann (JFB)          time O(P)    space O(P)

Measured here on the MLP cell f(z, x) = tanh(W2 relu(W1 z + b1) + x) (P ~ 2·width·hidden):

* BPTT: autograd through T plain unrolled steps z <- f(z, x);
* implicit: deqfast.fixed_point(solver="fixed_point", backward="implicit") with exactly k adjoint
  fixed-point steps (backward_max_iter = k, backward_tol = 0);
* JFB: deqfast.fixed_point(solver="fixed_point", backward="jfb").

All run exactly T forward iterations (tol = 0). For each: forward, backward and total time
(medians) and autograd memory (bytes of tensors saved for backward, distinct storages,
parameters and inputs excluded; on CUDA also the allocator peak), swept over T at fixed width,
and over the width (hence P) at fixed T. Note what "space" means in practice: the parameters
are stored once whatever T is; what BPTT stores per step is the activations (∝ batch · width),
so its memory is T times that of one step, and implicit's is one step's, independent of T.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch

import cells
import common

METHODS = ["BPTT", "implicit", "JFB"]


def forward_fn(method: str, T: int, k: int) -> Callable:
    import deqfast

    if method == "BPTT":
        return common.unrolled_forward(T)
    backward = "implicit" if method == "implicit" else "jfb"

    def forward(f, z0):
        return deqfast.fixed_point(f, z0, solver="fixed_point", max_iter=T, tol=0.0, backward=backward,
                                   backward_solver="fixed_point", backward_max_iter=k, backward_tol=0.0)[0]
    return forward


def measure_point(method: str, width: int, T: int, k: int, B: int, cfg, repeats: int) -> dict:
    problem = cells.make_problem("mlp", cfg.device, {"B": B, "d": width, "hidden": width})
    counter = common.CallCounter(problem.cell)
    f = lambda z: counter(z, problem.x)  # noqa: E731
    w = torch.randn(problem.z0.shape, generator=torch.Generator().manual_seed(3)).to(cfg.device)
    forward = forward_fn(method, T, k)
    params = list(problem.cell.parameters())

    def step(clock):
        for p in params:
            p.grad = None
        loss = (forward(f, problem.z0) * w).sum()
        clock.lap("forward")
        loss.backward()
        clock.lap("backward")

    exclude = [*params, problem.x, problem.z0, w]
    row = common.measure_step(step, cfg.device, counter, exclude)
    times = common.time_repeats(step, cfg.device, repeats=repeats, warmup=1,
                                budget_s=cfg.pick(quick=2, cpu=20, cuda=20, cuda_quick=2))
    row.update(method=method, width=width, params=problem.params, T=T, k=k, B=B,
               time_ms=times["total"]["median_s"] * 1e3, forward_ms=times["forward"]["median_s"] * 1e3,
               backward_ms=times["backward"]["median_s"] * 1e3, param_bytes=sum(p.numel() * p.element_size() for p in params))
    return row


def slope(xs: List[float], ys: List[float]) -> float:
    """Least-squares slope of log y against log x: the measured exponent."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-30)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / var if var else float("nan")


def summarise(rows: List[dict], key: str) -> Dict[str, dict]:
    """Per method: the measured exponents of time and memory in ``key`` (T or params)."""
    out = {}
    for method in METHODS:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r[key])
        xs = [r[key] for r in rs]
        out[method] = {"time_exponent": slope(xs, [r["time_ms"] for r in rs]),
                       "backward_time_exponent": slope(xs, [r["backward_ms"] for r in rs]),
                       "memory_exponent": slope(xs, [r["saved_bytes"] for r in rs])}
    return out


def sweep_table(rows: List[dict], key: str):
    """One row per swept value: memory and time of each method, BPTT / implicit memory ratio."""
    values = sorted({r[key] for r in rows})
    by = {(r["method"], r[key]): r for r in rows}
    headers = [key if key == "T" else "P (width)"]
    headers += [f"{m} saved MiB" for m in METHODS] + ["BPTT / implicit mem"]
    headers += [f"{m} ms (bwd)" for m in METHODS]
    table = []
    for v in values:
        rs = [by[(m, v)] for m in METHODS]
        first = v if key == "T" else f"{v} ({rs[0]['width']})"
        mem = [r["saved_bytes"] / 2 ** 20 for r in rs]
        table.append([first, *mem, mem[0] / mem[1] if mem[1] else None,
                      *[f"{r['time_ms']:.3g} ({r['backward_ms']:.3g})" for r in rs]])
    return headers, table


def exponent_table(summary_T, summary_P):
    headers = ["method", "seed: time, space", "time ~ T^a", "bwd time ~ T^a", "memory ~ T^a",
               "time ~ P^a", "memory ~ P^a"]
    seed = {"BPTT": "O(TP), O(TP)", "implicit": "O(kP), O(P)", "JFB": "O(P), O(P)"}
    rows = [[m, seed[m], summary_T[m]["time_exponent"], summary_T[m]["backward_time_exponent"],
             summary_T[m]["memory_exponent"], summary_P[m]["time_exponent"], summary_P[m]["memory_exponent"]]
            for m in METHODS]
    return headers, rows


# Per method: marker, colour, marker size, fill. implicit's large hollow squares stay visible around
# JFB's small filled triangles where both save the same bytes (the memory panels).
STYLE = {"BPTT": ("o", "C0", 6, True), "implicit": ("s", "C1", 9, False), "JFB": ("^", "C2", 5, True)}


def plot(rows_T, rows_P, path, plt, label: str, fixed: dict) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    for col, (rows, key, xlabel) in enumerate([(rows_T, "T", "forward iterations T"),
                                               (rows_P, "params", "parameters P")]):
        saved = {m: [r["saved_bytes"] for r in sorted((r for r in rows if r["method"] == m), key=lambda r: r[key])]
                 for m in METHODS}
        for method in METHODS:
            marker, color, size, filled = STYLE[method]
            rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r[key])
            xs = [r[key] for r in rs]
            face = color if filled else "none"
            axes[0][col].plot(xs, [r["time_ms"] for r in rs], marker + "-", color=color, ms=size, mfc=face,
                              label=f"{method} fwd+bwd")
            axes[0][col].plot(xs, [r["backward_ms"] for r in rs], marker + "--", color=color, ms=size, mfc="none",
                              alpha=0.7, label=f"{method} bwd")
            name = method
            if method == "JFB" and saved["JFB"] == saved["implicit"]:
                name = "JFB (the same bytes as implicit)"
            axes[1][col].plot(xs, [r["saved_bytes"] / 2 ** 20 for r in rs], marker + ("--" if method == "JFB" else "-"),
                              color=color, ms=size, mfc=face, lw=1.2 if method == "JFB" else 2.0,
                              zorder=3 if method == "JFB" else 2, label=name)
        if key == "params":  # for scale: what the weights themselves take (not in the autograd bytes)
            rs = sorted((r for r in rows if r["method"] == "BPTT"), key=lambda r: r[key])
            axes[1][col].plot([r[key] for r in rs], [r["param_bytes"] / 2 ** 20 for r in rs], "k:",
                              label="the parameters' own size\n(for scale; not counted above)")
        for row, ylabel in enumerate(["time per step, ms", "autograd memory, MiB"]):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            if key == "T":  # label the measured T values themselves, not powers of ten
                ax.set_xticks(sorted({r["T"] for r in rows}))
                ax.set_xticks([], minor=True)
                ax.set_xticklabels([str(t) for t in sorted({r["T"] for r in rows})])
    axes[0][0].set_title(f"vs T (width {fixed['width']}, k={fixed['k']})", fontsize=9)
    axes[0][1].set_title(f"vs P (T={fixed['T']}, k={fixed['k']})", fontsize=9)
    fig.suptitle(f"BPTT vs implicit vs JFB on the MLP cell, B={fixed['B']} ({label})", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)


def run(cfg, info: dict) -> dict:
    Ts = [5, 10, 20, 40]
    widths = cfg.pick(quick=[128, 256, 512, 1024], cpu=[256, 512, 1024, 2048], cuda=[256, 512, 1024, 2048, 4096],
                      cuda_quick=[512, 1024, 2048, 4096])
    width_T = cfg.pick(quick=256, cpu=512, cuda=1024)
    T_P = 20
    k = 10
    B = cfg.pick(quick=64, cpu=128, cuda=256)
    repeats = cfg.pick(quick=5, cpu=9, cuda=15, cuda_quick=5)
    progress = common.Progress(len(METHODS) * (len(Ts) + len(widths)), "complexity")
    rows_T, rows_P = [], []
    for T in Ts:
        for method in METHODS:
            rows_T.append(measure_point(method, width_T, T, k, B, cfg, repeats))
            progress.advance(f"T={T} {method}")
    for width in widths:
        for method in METHODS:
            rows_P.append(measure_point(method, width, T_P, k, B, cfg, repeats))
            progress.advance(f"width={width} {method}")
    progress.close()

    label = common.device_label(info)
    summary_T, summary_P = summarise(rows_T, "T"), summarise(rows_P, "params")
    h_T, t_T = sweep_table(rows_T, "T")
    h_P, t_P = sweep_table(rows_P, "params")
    h_e, t_e = exponent_table(summary_T, summary_P)
    title_T = f"vs T: MLP cell width {width_T}, B={B}, implicit with k={k} adjoint steps ({label})"
    title_P = f"vs P: MLP cell, T={T_P}, B={B}, k={k} ({label})"
    common.print_table(title_T, h_T, t_T)
    common.print_table(title_P, h_P, t_P)
    common.print_table("Measured exponents (log-log slopes) against the seed's table", h_e, t_e)
    common.write_markdown(cfg.out / "complexity.md", "The seed's complexity table, measured", [
        ("Measured exponents", common.format_table(h_e, t_e, markdown=True)),
        (title_T, common.format_table(h_T, t_T, markdown=True)),
        (title_P, common.format_table(h_P, t_P, markdown=True)),
        (None, "saved MiB: autograd memory (tensors saved for backward, distinct storages, parameters and inputs "
               "excluded). BPTT stores one step's activations per iteration, so its memory grows as T × (one step), "
               "the O(TP) row of the seed; implicit and JFB store one step whatever T is, the O(P) rows. Memory "
               "against P grows like the activations (∝ width) while P ∝ width²: the exponent in P is about 0.5 for "
               "every method, and what separates them is the factor T. Times: fwd+bwd (bwd) ms, medians."),
    ])
    fixed = {"width": width_T, "k": k, "T": T_P, "B": B}
    result = {"benchmark": "complexity", "device_label": label, "fixed": fixed, "rows_T": rows_T, "rows_P": rows_P,
              "exponents_T": summary_T, "exponents_P": summary_P}
    common.write_json(cfg.out / "complexity.json", result)
    plt = common.pyplot()
    if plt is not None:
        plot(rows_T, rows_P, cfg.out / "complexity.png", plt, label, fixed)
    return result


def replot(result: dict, out, plt) -> None:
    """Redraw complexity.png from complexity.json's contents (run.py --replot)."""
    plot(result["rows_T"], result["rows_P"], out / "complexity.png", plt, result["device_label"], result["fixed"])
