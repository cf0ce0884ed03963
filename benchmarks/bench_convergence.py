"""Benchmark 4: evaluations of f needed to reach a tolerance, deqfast vs torchdeq solvers.

On each cell of cells.py (random x, contractive at its fixed point: the measured spectral radius
of ∂f/∂z there is reported), every solver runs from the same random z0 with stop_mode "rel",
tol and max_iter as below, without grad:

* deqfast: fixed_point_iteration, anderson (m = 5, lam = 1e-4), broyden (m = 30, its default);
* torchdeq 0.1.0: fixed_point_iter, anderson_solver (m = 5, lam = 1e-4), broyden_solver
  (its default history: all max_iter updates).

Measured: batch calls of f until the solver returned (torchdeq stops when the worst sample has
converged, deqfast freezes each sample when it has, and stops when all have), the mean
per-sample evaluations deqfast reports (stats.nstep) or torchdeq's per-sample best step, whether
every sample reached tol (judged independently: ‖f(z) − z‖ / ‖f(z)‖ at the returned z), the
worst such residual, and the wall time to solution (median). The PNG plots, for each cell, the
worst relative residual of the batch at every evaluation of f.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

import cells
import common


def solvers(max_iter: int, tol: float) -> Dict[str, Optional[Callable]]:
    """name -> solve(f, z0) -> z (None: torchdeq not importable)."""
    import deqfast

    s = deqfast.solvers
    common_kw = dict(max_iter=max_iter, tol=tol, stop_mode="rel")
    out: Dict[str, Optional[Callable]] = {
        "deqfast fixed_point": lambda f, z0: s.fixed_point_iteration(f, z0, **common_kw),
        "deqfast anderson": lambda f, z0: s.anderson(f, z0, m=5, lam=1e-4, **common_kw),
        "deqfast broyden": lambda f, z0: s.broyden(f, z0, **common_kw),
    }
    torchdeq = common.torchdeq_module()
    names = {"torchdeq fixed_point_iter": "fixed_point_iter", "torchdeq anderson": "anderson",
             "torchdeq broyden": "broyden"}
    for name, key in names.items():
        if torchdeq is None:
            out[name] = None
            continue
        solver = torchdeq.solver.get_solver(key)
        extra = {"m": 5, "lam": 1e-4} if key == "anderson" else {}
        out[name] = (lambda solver, extra: lambda f, z0: solver(f, z0, **common_kw, **extra))(solver, extra)
    return out


def per_sample_steps(result) -> float:
    """Mean per-sample evaluations: deqfast stats.nstep, torchdeq info["nstep"]."""
    info = result[-1]
    nstep = info.nstep if hasattr(info, "nstep") else info["nstep"]
    return float(nstep.double().mean())


def rel_residuals(f: Callable, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        fz = f(z)
        return (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)


def measure(solve: Callable, problem, tol: float, cfg, repeats: int) -> dict:
    counter = common.CallCounter(problem.cell, trace=True)
    f = lambda z: counter(z, problem.x)  # noqa: E731
    counter.enabled = True
    with torch.no_grad():
        result = solve(f, problem.z0)
    counter.enabled = False
    z = result[0].reshape(problem.z0.shape)
    rel = rel_residuals(f, z)
    with torch.no_grad():
        seconds = common.time_function(lambda: solve(f, problem.z0), cfg.device, repeats=repeats, warmup=1,
                                       budget_s=cfg.pick(quick=2, cpu=10, cuda=10, cuda_quick=2))["median_s"]
    return {"f_calls": counter.calls["forward"], "mean_sample_steps": per_sample_steps(result),
            "all_converged": bool((rel < tol).all()), "worst_rel_residual": float(rel.max()),
            "time_ms": seconds * 1e3, "trace": counter.residuals}


def run_cell(problem, max_iter: int, tol: float, cfg, progress, repeats: int) -> dict:
    import deqfast

    f = lambda z: problem.cell(z, problem.x)  # noqa: E731
    with torch.no_grad():  # the fixed point, to measure the contraction there
        z_ref, _ = deqfast.solvers.anderson(f, problem.z0, max_iter=200, tol=1e-6)
    radius = cells.spectral_radius(f, z_ref)
    rows = {}
    for name, solve in solvers(max_iter, tol).items():
        rows[name] = None if solve is None else measure(solve, problem, tol, cfg, repeats)
        progress.advance(f"{problem.name}: {name}")
    return {"cell": problem.name, "sizes": problem.sizes, "params": problem.params,
            "spectral_radius_at_fixed_point": radius, "solvers": rows}


HEADERS = ["solver", "f calls", "mean steps/sample", "all < tol", "worst rel residual", "ms"]


def table_rows(res):
    return [[name] + ([None] * 5 if r is None else
                      [r["f_calls"], r["mean_sample_steps"], r["all_converged"], r["worst_rel_residual"], r["time_ms"]])
            for name, r in res["solvers"].items()]


def plot(results, path, plt, label: str, tol: float) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for ax, res in zip(axes[0], results):
        for name, r in res["solvers"].items():
            if r is None:
                continue
            style = "-" if name.startswith("deqfast") else "--"
            ax.plot(range(1, len(r["trace"]) + 1), r["trace"], style, label=name)
        ax.axhline(tol, color="k", lw=0.8, ls=":", label=f"tol {tol:g}")
        ax.set_yscale("log")
        ax.set_xlabel("evaluations of f")
        ax.set_ylabel("worst relative residual in the batch")
        ax.set_title(f"{res['cell']} (ρ(∂f/∂z) ≈ {res['spectral_radius_at_fixed_point']:.2f})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Convergence to rel tol {tol:g} ({label})", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)


def run(cfg, info: dict) -> dict:
    tol = 1e-4
    max_iter = 100
    repeats = cfg.pick(quick=5, cpu=9, cuda=10, cuda_quick=3)
    problems = cells.problems(cfg)
    progress = common.Progress(len(problems) * 6, "convergence")
    results = [run_cell(p, max_iter, tol, cfg, progress, repeats) for p in problems.values()]
    progress.close()

    label = common.device_label(info)
    sections = [
        common.table_section(
            f"{res['cell']} cell ({' '.join(f'{k}={v}' for k, v in res['sizes'].items())}), spectral radius at "
            f"the fixed point {res['spectral_radius_at_fixed_point']:.3f}, rel tol {tol:g}, max_iter {max_iter} ({label})",
            HEADERS, table_rows(res))
        for res in results
    ]
    sections.append((None, (
        "f calls: batch evaluations of f until the solver returned. mean steps/sample: deqfast's stats.nstep "
        "(each sample is frozen once it converges), torchdeq's per-sample step of its best iterate. all < tol: "
        "every sample's ‖f(z) − z‖/‖f(z)‖ at the returned z is below tol, checked here. ms: wall time to solution.")))
    common.write_markdown(cfg.out / "convergence.md", "Convergence: evaluations of f to reach tol", sections)
    result = {"benchmark": "convergence", "device_label": label, "tol": tol, "stop_mode": "rel", "max_iter": max_iter,
              "cells": results}
    common.write_json(cfg.out / "convergence.json", result)
    plt = common.pyplot()
    if plt is not None:
        plot(results, cfg.out / "convergence.png", plt, label, tol)
    return result


def replot(result: dict, out, plt) -> None:
    """Redraw convergence.png from convergence.json's contents (run.py --replot)."""
    plot(result["cells"], out / "convergence.png", plt, result["device_label"], result["tol"])
