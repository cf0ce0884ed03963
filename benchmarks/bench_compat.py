"""torchdeq 0.1.0 and deqfast.compat side by side on torchdeq programs' call patterns.

    python benchmarks/bench_compat.py [--repeats 10] [--quick]

The same model, built from the same seed, is trained with ``lib = torchdeq`` and with
``lib = deqfast.compat`` (only the import differs), alternating the two step by step so that both see
the same machine load. Reported per pattern and library: median wall time of a training step (forward,
loss, backward, optimizer step), mean forward nstep (torchdeq's definition: the step of the lowest
residual), the largest final abs/rel residual, the loss after the timed steps; and the eval-mode solve
time. Writes benchmarks/results/compat.json and compat.md. Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import torchdeq
import deqfast.compat as compat

LIBS = {"torchdeq": torchdeq, "deqfast.compat": compat}
F32 = torch.float32


class MDEQ(nn.Module):
    """MDEQ-style: two resolutions as a list state, weight norm reset every step, variational
    dropout, Anderson with the phantom gradient (grad 3, tau 0.6)."""

    def __init__(self, lib, c=16):
        super().__init__()
        self.lib = lib
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.hi = nn.Conv2d(c, c, 3, padding=1)
        self.lo = nn.Conv2d(c, c, 3, padding=1)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(4, c, affine=False)
        self.head = nn.Linear(2 * c, 10)
        self.drop = lib.VariationalDropout2d(dropout=0.1, token_first=False)
        lib.apply_norm(self, "weight_norm", filter_out=["stem", "head"])
        self.deq = lib.get_deq(f_solver="anderson", f_max_iter=18, f_tol=1e-3, f_stop_mode="rel", grad=3, tau=0.6)

    def forward(self, x):
        self.lib.reset_deq(self)
        u = self.stem(x)

        def f(z_hi, z_lo):
            hi = self.gn(torch.relu(self.drop(self.hi(z_hi)) + u))
            lo = self.gn(torch.relu(self.lo(z_lo) + self.down(z_hi)))
            return [hi, lo]

        B, C, H, W = u.shape
        z_out, info = self.deq(f, [torch.zeros_like(u), torch.zeros(B, C, H // 2, W // 2)])
        hi, lo = z_out[-1]
        return self.head(torch.cat([hi.mean((2, 3)), lo.mean((2, 3))], 1)), info


class SeqDEQ(nn.Module):
    """DEQ sequence-model style: (B, L, D) state, causal mixing, variational feature dropout,
    Anderson with IFT (adjoint by fixed-point iteration)."""

    def __init__(self, lib, d=64):
        super().__init__()
        self.lib = lib
        self.inp = nn.Linear(d, d)
        self.mix = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.ln = nn.LayerNorm(d)
        self.drop = lib.VariationalDropout1d(dropout=0.1)
        self.head = nn.Linear(d, d)
        self.deq = lib.get_deq(f_solver="anderson", f_max_iter=30, f_tol=1e-3, f_stop_mode="rel", ift=True,
                               b_max_iter=30, b_tol=1e-4, b_stop_mode="rel")

    def forward(self, emb):
        self.lib.reset_deq(self)
        u = self.inp(emb)
        steps = torch.arange(1, emb.shape[1] + 1, dtype=emb.dtype).view(1, -1, 1)

        def f(z):
            ctx = torch.cumsum(self.mix(z), 1) / steps
            return self.ln(self.drop(self.ff(torch.tanh(ctx + u))) + u)

        z_out, info = self.deq(f, torch.zeros_like(emb))
        return self.head(z_out[-1]), info


class Flow(nn.Module):
    """DEQ-Flow style: (hidden, flow) tuple state, fixed-point iteration, n_states = 2 with
    fp_correction(return_loss_values=True)."""

    def __init__(self, lib, c=32):
        super().__init__()
        self.lib = lib
        self.ctx = nn.Conv2d(4, c, 3, padding=1)
        self.gru = nn.Conv2d(2 * c + 2, c, 3, padding=1)
        self.head = nn.Conv2d(c, 2, 3, padding=1)
        self.deq = lib.get_deq(f_solver="fixed_point_iter", f_max_iter=24, f_tol=1e-3, n_states=2)

    def forward(self, frames):
        inp = self.ctx(frames)

        def update(net, flow):
            net = 0.5 * torch.tanh(self.gru(torch.cat([net, inp, flow], 1))) + 0.5 * net
            return net, flow + 0.1 * torch.tanh(self.head(net))

        z_out, info = self.deq(update, (torch.zeros_like(inp), torch.zeros_like(frames[:, :2])))
        return [flow for _, flow in z_out], info


def _data(name, g):
    if name == "mdeq":
        return torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    if name == "seq":
        return torch.randn(16, 32, 64, generator=g), torch.randn(16, 32, 64, generator=g)
    return torch.randn(8, 4, 24, 24, generator=g), torch.randn(8, 2, 24, 24, generator=g)


PATTERNS = {
    "mdeq": ("MDEQ image classification: list state, weight norm reset each step, Anderson, phantom grad",
             MDEQ, lambda out, y, lib: nn.functional.cross_entropy(out, y)),
    "seq": ("DEQ sequence model: (B, L, D) state, variational dropout, Anderson, IFT",
            SeqDEQ, lambda out, y, lib: (out - y).square().mean()),
    "flow": ("DEQ-Flow: tuple state, fixed-point iteration, n_states=2, fp_correction",
             Flow, lambda out, y, lib: lib.fp_correction(lambda p, t: (p - t).abs().mean(), (out, y),
                                                         return_loss_values=True)[0]),
}


def run_pattern(name, repeats, warmup):
    doc, Model, loss_fn = PATTERNS[name]
    g = torch.Generator().manual_seed(0)
    x, y = _data(name, g)
    models, opts = {}, {}
    for lib_name, lib in LIBS.items():
        torch.manual_seed(1)
        models[lib_name] = Model(lib)
        opts[lib_name] = torch.optim.Adam(models[lib_name].parameters(), lr=1e-3)
    times = {k: [] for k in LIBS}
    stats = {k: {"nstep": [], "abs": [], "rel": []} for k in LIBS}
    losses = {}
    for step in range(warmup + repeats):
        for lib_name, lib in LIBS.items():  # alternate: both see the same load
            model, opt = models[lib_name], opts[lib_name]
            model.train()
            torch.manual_seed(100 + step)
            t0 = time.perf_counter()
            out, info = model(x)
            loss = loss_fn(out, y, lib)
            opt.zero_grad()
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if step >= warmup:
                times[lib_name].append(dt)
                stats[lib_name]["nstep"].append(float(info["nstep"].mean()))
                stats[lib_name]["abs"].append(float(info["abs_lowest"].max()))
                stats[lib_name]["rel"].append(float(info["rel_lowest"].max()))
            losses[lib_name] = loss.item()
    eval_ts = {k: [] for k in LIBS}
    for model in models.values():
        model.eval()
    with torch.no_grad():
        for _ in range(repeats):
            for lib_name in LIBS:  # alternating, as in training
                t0 = time.perf_counter()
                models[lib_name](x)
                eval_ts[lib_name].append(time.perf_counter() - t0)
    eval_times = {k: statistics.median(v) for k, v in eval_ts.items()}
    rows = {}
    for lib_name in LIBS:
        rows[lib_name] = {
            "train_step_ms": 1e3 * statistics.median(times[lib_name]),
            "eval_forward_ms": 1e3 * eval_times[lib_name],
            "mean_nstep": statistics.mean(stats[lib_name]["nstep"]),
            "max_abs_lowest": max(stats[lib_name]["abs"]),
            "max_rel_lowest": max(stats[lib_name]["rel"]),
            "final_loss": losses[lib_name],
        }
    base, ours = rows["torchdeq"], rows["deqfast.compat"]
    return {"pattern": name, "description": doc, "rows": rows,
            "train_speedup": base["train_step_ms"] / ours["train_step_ms"],
            "eval_speedup": base["eval_forward_ms"] / ours["eval_forward_ms"]}


def machine():
    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "torchdeq": getattr(torchdeq, "__version__", "0.1.0"),
            "python": platform.python_version(), "extension": str(__import__("deqfast").extension_info())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 timed steps per pattern")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = ap.parse_args()
    torch.set_flush_denormal(True)
    repeats = 3 if a.quick else a.repeats
    results = {"machine": machine(), "repeats": repeats, "patterns": [run_pattern(p, repeats, a.warmup) for p in PATTERNS]}
    lines = [f"torchdeq {results['machine']['torchdeq']} vs deqfast.compat on {results['machine']['cpu']} "
             f"({results['machine']['cores']} cores, torch {results['machine']['torch']}, "
             f"{results['machine']['torch_threads']} threads), float32, median of {repeats} steps, same run, alternating.", "",
             "| pattern | library | train step (ms) | eval forward (ms) | mean nstep | max abs_lowest | max rel_lowest | loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in results["patterns"]:
        for lib_name, r in p["rows"].items():
            lines.append(f"| {p['pattern']} | {lib_name} | {r['train_step_ms']:.1f} | {r['eval_forward_ms']:.1f} | "
                         f"{r['mean_nstep']:.1f} | {r['max_abs_lowest']:.2e} | {r['max_rel_lowest']:.2e} | {r['final_loss']:.4f} |")
    lines.append("")
    for p in results["patterns"]:
        lines.append(f"* {p['pattern']}: {p['description']}. deqfast.compat {p['train_speedup']:.2f}x per training "
                     f"step, {p['eval_speedup']:.2f}x per eval forward.")
    text = "\n".join(lines)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "compat.json").write_text(json.dumps(results, indent=2))
    (a.out / "compat.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
