"""Time to a target training loss on the digits demo: deqfast vs torchdeq vs BPTT, one machine, one run.

    python benchmarks/bench_time_to_loss.py [--epochs 20] [--target 0.05] [--out benchmarks/results]

The digits classifier of digits_demo.py (embed 64 -> 256, f(z, x) = tanh(0.9 W z + x) with W
spectrally normalised, linear head; Adam lr 2e-3, batch 64, the same data split, seed and batch
order for every method) trained with:

* deqfast implicit: Anderson (m 5, max_iter 30, tol 1e-4), fixed-point adjoint to 1e-4 (the demo's);
* deqfast jfb: the same forward, Jacobian-free backward;
* torchdeq 0.1.0: get_deq(f_solver="anderson", ift=True, b_solver="fixed_point_iter") with the same
  limits and tolerances;
* BPTT: deqfast backward="bptt", autograd through the same Anderson iterations.

The training loss (mean over an epoch's minibatches) is logged against the wall time spent in
training steps (evaluation excluded). Time to target: the first epoch whose mean loss is at or
below --target.

Second task, the conv cell of cells.py (the training benchmark's, at its --quick size B4 C16 16x16):
z* = DEQ(conv cell)(x) regressed onto a fixed random target (MSE), one fixed batch, Adam lr 3e-3,
--conv-steps steps per method, same four methods (same limits; torchdeq's and BPTT's the same
solver). Target: --conv-target x the initial loss (the same initial model for every method).
Writes time_to_loss.{json,md,png}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
import deqfast  # noqa: E402
from digits_demo import TanhCell, load_data  # noqa: E402

LIMITS = dict(max_iter=30, tol=1e-4, backward_max_iter=50, backward_tol=1e-4)


class Net(nn.Module):
    def __init__(self, method: str, width: int = 256, gamma: float = 0.9):
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.cell = TanhCell(width, gamma)
        self.head = nn.Linear(width, 10)
        self.method = method
        if method == "torchdeq":
            import torchdeq
            self.deq = torchdeq.get_deq(f_solver="anderson", f_max_iter=LIMITS["max_iter"], f_tol=LIMITS["tol"],
                                        f_stop_mode="rel", b_solver="fixed_point_iter",
                                        b_max_iter=LIMITS["backward_max_iter"], b_tol=LIMITS["backward_tol"],
                                        b_stop_mode="rel", ift=True)
        else:
            backward = {"deqfast implicit": "implicit", "deqfast jfb": "jfb", "BPTT": "bptt"}[method]
            self.deq = deqfast.DEQ(self.cell, solver="anderson", m=5, backward=backward, **LIMITS)

    def forward(self, x):
        u = self.embed(x)
        with parametrize.cached():
            self.cell.linear.weight  # noqa: B018 - a differentiable weight cached for the whole solve
            if self.method == "torchdeq":
                z_list, _ = self.deq(lambda z: self.cell(z, u), torch.zeros_like(u), solver_kwargs={"m": 5, "lam": 1e-4})
                z = z_list[-1]
            else:
                z = self.deq(u)
        return self.head(z)


def train(method: str, data, epochs: int, seed: int = 0):
    X, y = data[0], data[1]
    torch.manual_seed(seed)
    model = Net(method)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    wall, curve = 0.0, []
    for epoch in range(epochs):
        order = torch.randperm(X.shape[0], generator=g)
        losses = []
        t0 = time.perf_counter()
        for i in range(0, X.shape[0], 64):
            idx = order[i:i + 64]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss))
        wall += time.perf_counter() - t0
        curve.append({"epoch": epoch + 1, "wall_s": wall, "train_loss": sum(losses) / len(losses)})
    return curve


def conv_step_fn(method: str, problem):
    cell = problem.cell
    if method == "torchdeq":
        import torchdeq
        deq = torchdeq.get_deq(f_solver="anderson", f_max_iter=LIMITS["max_iter"], f_tol=LIMITS["tol"], f_stop_mode="rel",
                               b_solver="fixed_point_iter", b_max_iter=LIMITS["backward_max_iter"],
                               b_tol=LIMITS["backward_tol"], b_stop_mode="rel", ift=True)
        return lambda x, z0: deq(lambda z: cell(z, x), z0, solver_kwargs={"m": 5, "lam": 1e-4})[0][-1]
    backward = {"deqfast implicit": "implicit", "deqfast jfb": "jfb", "BPTT": "bptt"}[method]
    layer = deqfast.DEQ(cell, solver="anderson", m=5, backward=backward, **LIMITS)
    return lambda x, z0: layer(x, z0)


def train_conv(method: str, steps: int, seed: int = 0):
    import copy
    import cells
    problem = cells.make_problem("conv", torch.device("cpu"), cells.SIZES["conv"][2], seed=seed)
    problem.cell = copy.deepcopy(problem.cell)
    g = torch.Generator().manual_seed(seed + 7)
    target = torch.randn(problem.z0.shape, generator=g)
    forward = conv_step_fn(method, problem)
    opt = torch.optim.Adam(problem.cell.parameters(), lr=3e-3)
    wall, curve = 0.0, []
    for step in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = (forward(problem.x, problem.z0) - target).square().mean()
        loss.backward()
        opt.step()
        wall += time.perf_counter() - t0
        curve.append({"step": step + 1, "wall_s": wall, "train_loss": float(loss.detach())})
    return curve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--target", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--conv-steps", type=int, default=40)
    p.add_argument("--conv-target", type=float, default=0.9, help="fraction of the initial loss")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    common.fix_malloc_thresholds()
    info = common.machine_info(torch.device("cpu"))
    data = load_data(0, 0.25)
    methods = ["deqfast implicit", "deqfast jfb", "torchdeq", "BPTT"]
    if common.torchdeq_module() is None:
        methods.remove("torchdeq")
    results = {}
    for method in methods:
        curve = train(method, data, args.epochs)
        hit = next((c for c in curve if c["train_loss"] <= args.target), None)
        results[method] = {"curve": curve, "time_to_target_s": hit["wall_s"] if hit else None,
                           "epochs_to_target": hit["epoch"] if hit else None, "final_loss": curve[-1]["train_loss"]}
        print(f"{method}: final loss {curve[-1]['train_loss']:.4f}, "
              f"time to {args.target}: {hit['wall_s'] if hit else None}", flush=True)
    conv = {}
    for method in methods:
        curve = train_conv(method, args.conv_steps)
        conv[method] = {"curve": curve}
    initial = conv[methods[0]]["curve"][0]["train_loss"]
    conv_target = args.conv_target * initial
    for method, r in conv.items():
        hit = next((c for c in r["curve"] if c["train_loss"] <= conv_target), None)
        r.update(time_to_target_s=hit["wall_s"] if hit else None, steps_to_target=hit["step"] if hit else None,
                 final_loss=r["curve"][-1]["train_loss"])
        print(f"conv {method}: final loss {r['final_loss']:.4f}, time to {conv_target:.4f}: {r['time_to_target_s']}",
              flush=True)
    label = f"{info['cpu_model']}, {args.threads} thread(s), torch {info['torch']}"
    headers = ["method", f"time to loss {args.target} (s)", "epochs", "final loss", "s/epoch"]
    rows = [[m, r["time_to_target_s"], r["epochs_to_target"], r["final_loss"], r["curve"][-1]["wall_s"] / args.epochs]
            for m, r in results.items()]
    title = f"Time to training loss {args.target}, digits demo, one run, {label}"
    section = common.table_section(title, headers, rows)
    conv_title = (f"Time to {args.conv_target} x the initial loss ({conv_target:.4f}), conv cell B4 C16 16x16 regression, "
                  f"one run, {label}")
    conv_rows = [[m, r["time_to_target_s"], r["steps_to_target"], r["final_loss"], r["curve"][-1]["wall_s"] / args.conv_steps]
                 for m, r in conv.items()]
    conv_section = common.table_section(conv_title, ["method", "time to target (s)", "steps", "final loss", "s/step"],
                                        conv_rows)
    common.write_json(args.out / "time_to_loss.json", {"benchmark": "time_to_loss", "device_label": label,
                                                        "target": args.target, "epochs": args.epochs,
                                                        "limits": LIMITS, "results": results,
                                                        "conv": {"target": conv_target, "steps": args.conv_steps,
                                                                 "results": conv},
                                                        "load_average": common.load_average()})
    common.write_markdown(args.out / "time_to_loss.md", "Time to a target training loss (digits demo)",
                          [section, conv_section,
                           (None, "Wall time of the training steps only (evaluation excluded), one run, "
                                  "same seed, data and batch order for every method; the machine was shared "
                                  "(load average in the JSON).")])
    plt = common.pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, res, target, ylabel, ttl in ((axes[0], results, args.target, "training loss (epoch mean)", "digits demo"),
                                            (axes[1], conv, conv_target, "training loss (per step)", "conv cell")):
            for m, r in res.items():
                ax.plot([c["wall_s"] for c in r["curve"]], [c["train_loss"] for c in r["curve"]], marker=".", label=m)
            ax.axhline(target, color="k", lw=0.8, ls="--", label="target")
            ax.set_yscale("log")
            ax.set_xlabel("training wall time (s)")
            ax.set_ylabel(ylabel)
            ax.set_title(ttl, fontsize=9)
            ax.legend(fontsize=8)
        fig.suptitle(f"Time to a target training loss, one run, {label}", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.out / "time_to_loss.png", dpi=120)
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
