"""Benchmark: compaction, DEQ(cell, compact=True), on a batch whose samples converge at different speeds.

The cell is an MLP cell whose output is scaled per sample by s_b, spread evenly from 0.3 to 0.97
over the batch (s_b rides in x's last column, so it is gathered with the sample):
f(z, x) = s_b · tanh(W2 W1 z + x) with W2 W1 orthogonal (W1: d → hidden, orthonormal columns) and
x ~ 0.5 N(0, 1), nearly linear: sample b contracts at a rate close to s_b, so the fast samples
converge in a few steps and the slowest take many more.

Per solve (forward only, no grad; Anderson m = 5, lam 1e-4, tol 1e-5 "rel", max_iter 100):

* rows evaluated: samples passed through the cell, summed over its calls (f work);
* f calls, time per solve (median of repeats), worst relative residual at the result;
* deqfast compact=False, deqfast compact=True, torchdeq 0.1.0 anderson_solver (which evaluates the
  whole batch until every sample has converged).
"""
from __future__ import annotations

import torch
from torch import nn

import common

SIZES = {"cpu": {"B": 64, "d": 512, "hidden": 1024}, "quick": {"B": 32, "d": 256, "hidden": 512},
         "cuda": {"B": 256, "d": 1024, "hidden": 2048}}
TOL, MAX_ITER, M = 1e-5, 100, 5


class SpreadCell(nn.Module):
    def __init__(self, d: int, hidden: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d, bias=False)
        with torch.no_grad():
            # fc2 fc1 = R, orthogonal: fc1 has orthonormal columns Q, fc2 = R Qᵀ.
            q, _ = torch.linalg.qr(torch.randn(hidden, d))
            r, _ = torch.linalg.qr(torch.randn(d, d))
            self.fc1.weight.copy_(q)
            self.fc2.weight.copy_(r @ q.T)
        self.rows = 0

    def forward(self, z, x):
        self.rows += z.shape[0]
        return x[:, -1:] * torch.tanh(self.fc2(self.fc1(z)) + x[:, :-1])


def make(sizes, device):
    B, d = sizes["B"], sizes["d"]
    cell = SpreadCell(d, sizes["hidden"]).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([0.5 * torch.randn(B, d, generator=g), torch.linspace(0.3, 0.97, B).unsqueeze(1)], dim=1).to(device)
    z0 = torch.zeros(B, d, device=device)
    return cell, x, z0


def methods():
    import deqfast
    out = {}
    for compact in (False, True):
        layer_kw = dict(solver="anderson", m=M, lam=1e-4, tol=TOL, max_iter=MAX_ITER, compact=compact)
        out[f"deqfast compact={compact}"] = lambda cell, x, z0, kw=layer_kw: deqfast.DEQ(cell, **kw)(x, z0)
    torchdeq = common.torchdeq_module()
    if torchdeq is not None:
        anderson = torchdeq.solver.get_solver("anderson")
        out["torchdeq anderson"] = lambda cell, x, z0: anderson(lambda z: cell(z, x), z0, max_iter=MAX_ITER, tol=TOL,
                                                                 stop_mode="rel", m=M, lam=1e-4)[0]
    return out


def run(cfg, info: dict) -> dict:
    sizes = SIZES["cuda"] if cfg.cuda else SIZES["quick" if cfg.quick else "cpu"]
    cell, x, z0 = make(sizes, cfg.device)
    repeats = cfg.pick(quick=3, cpu=7, cuda=15, cuda_quick=5)
    rows = []
    with torch.no_grad():
        for name, solve in methods().items():
            cell.rows = 0
            calls = [0]
            original = cell.forward

            def counted(z, xx):
                calls[0] += 1
                return original(z, xx)

            cell.forward = counted
            z = solve(cell, x, z0)
            cell.forward = original
            rows_evaluated = cell.rows
            fz = cell(z, x)
            rel = ((fz - z).norm(dim=1) / fz.norm(dim=1)).max().item()
            seconds = common.time_function(lambda: solve(cell, x, z0), cfg.device, repeats=repeats, warmup=1)
            rows.append({"method": name, "rows_evaluated": rows_evaluated, "f_calls": calls[0],
                         "solve_ms": seconds["median_s"] * 1e3, "solve_ms_min": seconds["min_s"] * 1e3,
                         "worst_rel_residual": rel})
    base = rows[0]
    for r in rows:
        r["rows_over_compact_false"] = r["rows_evaluated"] / base["rows_evaluated"]
        r["time_over_compact_false"] = r["solve_ms"] / base["solve_ms"]
    label = common.device_label(info)
    title = (f"Compaction: one solve, B={sizes['B']} d={sizes['d']} hidden={sizes['hidden']}, per-sample contraction "
             f"0.3..0.97, Anderson m={M}, tol {TOL} rel, fp32, {label}")
    headers = ["method", "rows evaluated", "f calls", "rows / compact=False", "solve ms", "time / compact=False",
               "worst rel residual"]
    table = [[r["method"], r["rows_evaluated"], r["f_calls"], r["rows_over_compact_false"], r["solve_ms"],
              r["time_over_compact_false"], r["worst_rel_residual"]] for r in rows]
    section = common.table_section(title, headers, table)
    note = ("rows evaluated: samples passed through the cell over all its calls, including deqfast's final f(z*) on the "
            "whole batch. compact=True evaluates a sample until the host check after it converged (every evaluation "
            "on the CPU). torchdeq runs its whole batch until the slowest sample converges. Times: median of "
            f"{repeats} solves, no grad.")
    result = {"benchmark": "compaction", "device_label": label, "sizes": sizes, "tol": TOL, "m": M, "rows": rows}
    common.write_json(cfg.out / "compaction.json", result)
    common.write_markdown(cfg.out / "compaction.md", "Compaction: f work and time per solve", [section, (None, note)])
    return result
