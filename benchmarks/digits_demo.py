"""DEQ classifier on scikit-learn's digits: every backward mode, same seed, split and budget.

The model is  x (64) -> Linear -> DEQ[z = tanh(gamma * W z + x)] -> Linear -> 10 logits,
with W spectrally normalised (torch.nn.utils.parametrizations.spectral_norm), so the cell is a
contraction with constant at most ``gamma`` < 1 and every backward mode is well posed.

For each backward mode (implicit, neumann with 5 terms, jfb, phantom, bptt) the script trains
from the same initial weights on the same fixed train/test split with the same optimiser and
number of epochs, and reports

* final test accuracy,
* median training time per epoch (forward + backward + optimiser step; evaluation excluded),
* mean forward NFE   (``layer.stats.nstep``, per sample, averaged over the training steps),
* mean backward NFE  (``layer.stats.backward.nstep`` where deqfast fills it in (implicit,
  neumann: number of Neumann terms); 1 for jfb (the one differentiable f step); phantom_steps
  for phantom; the forward nstep for bptt),
* peak autograd memory per training step: bytes of the tensors saved for backward, counted
  with ``torch.autograd.graph.saved_tensors_hooks``, each storage once (parameters included),
  on the first training step of every epoch (the hook costs time), the largest reported,

as a console table, ``<out>/digits_demo.json``, ``<out>/digits_demo.md`` and
``<out>/digits_accuracy_vs_time.png``. It then checks the claim the seed cites from Fung et al.
(2021): JFB trains to similar test accuracy with a 60%-400% speed-up over 5-term Neumann.

    python benchmarks/digits_demo.py            # full run: 30 epochs x 3 seeds (~3 min on 2 CPU cores)
    python benchmarks/digits_demo.py --quick    # smoke run: 3 epochs x 1 seed (~10 s)
    python benchmarks/digits_demo.py --replot   # redraw the PNG from digits_demo.json

--out defaults to benchmarks/results (the committed results), with --quick to
benchmarks/results/quick (git-ignored). Every file records how it was made (common.start_run).

Timing notes: by default torch runs one thread (--threads): the matrices are tiny, and on a shared
2-core machine two threads made epochs up to ~10x slower whenever anything else ran. The modes'
epochs are interleaved, so background load hits every mode alike; CPU time per epoch is reported
next to wall time. Nothing here asserts anything about time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

import deqfast

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import common  # noqa: E402  (benchmarks/common.py: saved-tensor meter, machine info, provenance, sync)

MODES = ("implicit", "neumann", "jfb", "phantom", "bptt")
# "Similar accuracy" for the verdict: |acc(jfb) - acc(neumann-5)| at most this many points.
SIMILAR_ACC_POINTS = 1.0
CLAIM_SPEEDUP = (60.0, 400.0)  # percent, Fung et al. 2021 as cited by the seed


# --------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------

def load_data(seed: int, test_size: float):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = digits.data.astype(np.float32) / 16.0  # pixel values 0..16 -> [0, 1]
    y = digits.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    mean = X_tr.mean(axis=0, keepdims=True)
    std = X_tr.std(axis=0, keepdims=True) + 1e-2  # some border pixels are (almost) always 0
    X_tr, X_te = (X_tr - mean) / std, (X_te - mean) / std
    return (torch.from_numpy(X_tr), torch.from_numpy(y_tr), torch.from_numpy(X_te), torch.from_numpy(y_te))


class TanhCell(nn.Module):
    """f(z, x) = tanh(gamma * W z + x), ||W||_2 = 1 by spectral normalisation: Lipschitz <= gamma in z."""

    def __init__(self, width: int, gamma: float):
        super().__init__()
        self.gamma = gamma
        self.linear = spectral_norm(nn.Linear(width, width, bias=False))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gamma * self.linear(z) + x)


class DEQClassifier(nn.Module):
    def __init__(self, width: int, gamma: float, n_classes: int, **deq_keywords):
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.cell = TanhCell(width, gamma)
        self.deq = deqfast.DEQ(self.cell, **deq_keywords)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.embed(x)
        # The spectrally normalised weight is computed once per forward (one power iteration in
        # training mode) and reused by every f evaluation of the solve: f stays the same map
        # throughout the solve and its backward. It must be computed here, with autograd on:
        # cached() keeps the first value, and the first f evaluation runs inside the solver's
        # torch.no_grad(), so a weight cached there would carry no gradient to W.
        with parametrize.cached():
            self.cell.linear.weight  # noqa: B018 - fills the cache with a differentiable weight
            z = self.deq(u)
        return self.head(z)


def deq_keywords(mode: str, args) -> dict:
    return dict(
        solver=args.solver, max_iter=args.max_iter, tol=args.tol,
        backward=mode,
        backward_solver=args.backward_solver, backward_max_iter=args.backward_max_iter,
        backward_tol=args.backward_tol,
        neumann_terms=args.neumann_terms,
        phantom_steps=args.phantom_steps, phantom_tau=args.phantom_tau,
    )


# --------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch: int):
    model.eval()
    correct, loss_sum = 0, 0.0
    nstep, conv, n = 0.0, 0.0, 0
    for i in range(0, X.shape[0], batch):
        xb, yb = X[i:i + batch], y[i:i + batch]
        logits = model(xb)
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
        st = model.deq.stats
        nstep += float(st.nstep.double().sum())
        conv += float(st.converged.double().sum())
        n += xb.shape[0]
    model.train()
    return correct / n, loss_sum / n, nstep / n, conv / n


def backward_nfe(mode: str, stats, args) -> float:
    """Mean backward NFE of one step (see the module docstring for the convention)."""
    if stats.backward is not None:
        return float(stats.backward.nstep.double().mean())
    if mode == "jfb":
        return 1.0
    if mode == "phantom":
        return float(args.phantom_steps)
    if mode == "bptt":
        return float(stats.nstep.double().mean())
    return float("nan")  # implicit/neumann without backward stats: reported as missing


# --------------------------------------------------------------------------------------------
# Training one mode
# --------------------------------------------------------------------------------------------

class ModeTrainer:
    """One backward mode's model, optimiser and records; ``run_epoch`` trains one epoch.

    main() runs the modes' epochs interleaved (epoch 1 of every mode, then epoch 2, ...; the order
    rotates each epoch) so that background load on a shared machine hits every mode alike.
    """

    def __init__(self, mode: str, data, args, device: torch.device, seed: int):
        self.mode, self.args, self.device, self.seed = mode, args, device, seed
        self.X_tr, self.y_tr, self.X_te, self.y_te = (t.to(device) for t in data)
        seed_everything(seed)  # same initial weights and same batch order for every mode
        self.model = DEQClassifier(args.width, args.gamma, 10, **deq_keywords(mode, args)).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.gen = torch.Generator().manual_seed(seed)
        acc0, loss0, _, _ = evaluate(self.model, self.X_te, self.y_te, args.eval_batch)
        self.history = [dict(epoch=0, wall_time=0.0, test_acc=acc0, test_loss=loss0)]
        self.epoch_times, self.cpu_times, self.fwd_times, self.bwd_times = [], [], [], []
        self.fwd_nfe, self.bwd_nfe, self.fwd_conv, self.bwd_conv, self.saved_bytes = [], [], [], [], []
        self.cuda_peak_bytes = []  # on CUDA only: max_memory_allocated above the step's start, probed steps
        self.nonfinite_steps = 0
        self.caught = []
        self.wall = 0.0
        self.epoch = 0

    def run_epoch(self) -> None:
        args, device, model, opt, mode = self.args, self.device, self.model, self.opt, self.mode
        n_tr = self.X_tr.shape[0]
        self.epoch += 1
        perm = torch.randperm(n_tr, generator=self.gen).to(device)
        t_fwd = t_bwd = 0.0
        loss_sum, n_seen = 0.0, 0
        e_fwd_nfe, e_bwd_nfe = [], []
        common.synchronize(device)
        t_epoch = time.perf_counter()
        c_epoch = time.process_time()
        for i in range(0, n_tr, args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = self.X_tr[idx], self.y_tr[idx]
            # Bytes autograd saves for backward (common.SavedTensorMeter, parameters included: no
            # exclude list): a quantity no profiler reports directly.
            meter = common.SavedTensorMeter()
            if i == 0 and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                # Saved-tensor accounting costs a Python call per saved tensor (bptt saves
                # hundreds per step), so only the first step of every epoch is measured.
                with meter.active() if i == 0 else contextlib.nullcontext():
                    logits = model(xb)
                    loss = nn.functional.cross_entropy(logits, yb)
                common.synchronize(device)
                t1 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                common.synchronize(device)
                t2 = time.perf_counter()
            self.caught.extend(str(x.message) for x in w)
            t_fwd += t1 - t0
            t_bwd += t2 - t1
            st = model.deq.stats
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                self.nonfinite_steps += 1
            loss_sum += loss_value * xb.shape[0]
            n_seen += xb.shape[0]
            e_fwd_nfe.append(float(st.nstep.double().mean()))
            e_bwd_nfe.append(backward_nfe(mode, st, args))
            self.fwd_conv.append(float(st.converged.double().mean()))
            if st.backward is not None:
                self.bwd_conv.append(float(st.backward.converged.double().mean()))
            if i == 0:
                self.saved_bytes.append(meter.bytes["forward"] + meter.bytes["backward"])
                if device.type == "cuda":
                    self.cuda_peak_bytes.append(torch.cuda.max_memory_allocated(device) - base)
            del logits, loss
        common.synchronize(device)
        dt = time.perf_counter() - t_epoch
        cpu_dt = time.process_time() - c_epoch
        self.wall += dt
        self.epoch_times.append(dt)
        self.cpu_times.append(cpu_dt)
        self.fwd_times.append(t_fwd)
        self.bwd_times.append(t_bwd)
        self.fwd_nfe.extend(e_fwd_nfe)
        self.bwd_nfe.extend(e_bwd_nfe)
        acc, tloss, eval_nfe, eval_conv = evaluate(model, self.X_te, self.y_te, args.eval_batch)
        self.history.append(dict(
            epoch=self.epoch, wall_time=self.wall, epoch_time=dt, epoch_cpu_time=cpu_dt, fwd_time=t_fwd, bwd_time=t_bwd,
            train_loss=loss_sum / n_seen, test_acc=acc, test_loss=tloss, fwd_nfe=statistics.fmean(e_fwd_nfe),
            bwd_nfe=statistics.fmean(e_bwd_nfe), eval_fwd_nfe=eval_nfe, eval_converged=eval_conv,
        ))
        run = f"seed {self.seed} " if args.seeds > 1 else ""
        print(f"  {run}epoch {self.epoch:3d}/{args.epochs} {label(mode, args):>9}  {dt:6.2f}s  train loss "
              f"{loss_sum / n_seen:.4f}  test acc {100 * acc:6.2f}%  fwd nfe {statistics.fmean(e_fwd_nfe):5.1f}"
              f"  bwd nfe {statistics.fmean(e_bwd_nfe):5.1f}", flush=True)

    def result(self) -> dict:
        h = self.history
        return dict(
            mode=self.mode,
            seed=self.seed,
            final_test_acc=h[-1]["test_acc"],
            best_test_acc=max(x["test_acc"] for x in h),
            final_train_loss=h[-1].get("train_loss"),
            epoch_times=self.epoch_times, epoch_cpu_times=self.cpu_times,
            fwd_times=self.fwd_times, bwd_times=self.bwd_times,
            total_train_time=self.wall,
            fwd_nfe=self.fwd_nfe, bwd_nfe=self.bwd_nfe, fwd_conv=self.fwd_conv, bwd_conv=self.bwd_conv,
            saved_bytes=self.saved_bytes, cuda_peak_bytes=self.cuda_peak_bytes,
            nonfinite_loss_steps=self.nonfinite_steps,
            warnings=sorted(set(self.caught))[:10],
            n_warnings=len(self.caught),
            n_train=int(self.X_tr.shape[0]),
            n_test=int(self.X_te.shape[0]),
            history=h,
        )


def aggregate(mode: str, runs) -> dict:
    """One mode's summary over its runs (seeds): accuracies averaged, times as medians over all
    epochs of all runs, NFE as means over all training steps, memory as the maximum."""
    def cat(key):
        return [v for r in runs for v in r[key]]

    accs = [r["final_test_acc"] for r in runs]
    bwd_nfe = [v for v in cat("bwd_nfe") if not math.isnan(v)]
    bwd_conv = cat("bwd_conv")
    summary = dict(
        mode=mode,
        seeds=[r["seed"] for r in runs],
        final_test_acc=statistics.fmean(accs),
        final_test_acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
        final_test_acc_runs=accs,
        best_test_acc_mean=statistics.fmean(r["best_test_acc"] for r in runs),
        final_train_loss_mean=statistics.fmean(r["final_train_loss"] for r in runs),
        epoch_time_median=statistics.median(cat("epoch_times")),
        epoch_cpu_time_median=statistics.median(cat("epoch_cpu_times")),
        fwd_time_median=statistics.median(cat("fwd_times")),
        bwd_time_median=statistics.median(cat("bwd_times")),
        total_train_time_mean=statistics.fmean(r["total_train_time"] for r in runs),
        fwd_nfe_mean=statistics.fmean(cat("fwd_nfe")),
        bwd_nfe_mean=statistics.fmean(bwd_nfe) if bwd_nfe else None,
        fwd_converged_frac=statistics.fmean(cat("fwd_conv")),
        bwd_converged_frac=statistics.fmean(bwd_conv) if bwd_conv else None,
        peak_saved_bytes=max(cat("saved_bytes")),
        median_saved_bytes=statistics.median(cat("saved_bytes")),
        cuda_peak_bytes=max(cat("cuda_peak_bytes")) if cat("cuda_peak_bytes") else None,
        nonfinite_loss_steps=sum(r["nonfinite_loss_steps"] for r in runs),
        n_warnings=sum(r["n_warnings"] for r in runs),
        warnings=sorted({w for r in runs for w in r["warnings"]})[:10],
        n_train=runs[0]["n_train"],
        n_test=runs[0]["n_test"],
        runs=[{k: v for k, v in r.items() if k not in ("fwd_nfe", "bwd_nfe", "fwd_conv", "bwd_conv")} for r in runs],
    )
    return summary


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

def machine_info(device: torch.device) -> dict:
    """common.machine_info plus the versions of numpy and scikit-learn (the data set)."""
    info = common.machine_info(device)
    info["numpy"] = np.__version__
    try:
        import sklearn
        info["sklearn"] = sklearn.__version__
    except ImportError:
        pass
    return info


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} GiB"


def label(mode: str, args) -> str:
    if mode == "neumann":
        return f"neumann-{args.neumann_terms}"
    if mode == "phantom":
        return f"phantom-{args.phantom_steps}"
    return mode


TABLE_HEADER = ("mode", "test acc", "s/epoch (median)", "CPU s/epoch", "fwd s/ep", "bwd+opt s/ep", "fwd NFE",
                "bwd NFE", "peak saved (autograd)")


def fmt_acc(r) -> str:
    text = f"{100 * r['final_test_acc']:.2f}%"
    if len(r["final_test_acc_runs"]) > 1:
        text += f" ± {100 * r['final_test_acc_std']:.2f}"
    return text


def table_rows(results, args):
    rows = []
    for r in results:
        bwd = "n/a" if r["bwd_nfe_mean"] is None else f"{r['bwd_nfe_mean']:.1f}"
        rows.append((label(r["mode"], args), fmt_acc(r), f"{r['epoch_time_median']:.3f}",
                     f"{r['epoch_cpu_time_median']:.3f}", f"{r['fwd_time_median']:.3f}", f"{r['bwd_time_median']:.3f}",
                     f"{r['fwd_nfe_mean']:.1f}", bwd, fmt_bytes(r["peak_saved_bytes"])))
    return rows


def console_table(results, args) -> str:
    rows = [TABLE_HEADER] + table_rows(results, args)
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results, args) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * (len(TABLE_HEADER) - 1)) + "|"]
    for row in table_rows(results, args):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict(results, args) -> dict:
    by = {r["mode"]: r for r in results}
    if "jfb" not in by or "neumann" not in by:
        return dict(available=False, text="JFB vs Neumann not evaluated (both modes are needed).")
    jfb, neu = by["jfb"], by["neumann"]
    speedup = 100.0 * (neu["epoch_time_median"] / jfb["epoch_time_median"] - 1.0)
    bwd_speedup = 100.0 * (neu["bwd_time_median"] / jfb["bwd_time_median"] - 1.0)
    cpu_speedup = 100.0 * (neu["epoch_cpu_time_median"] / jfb["epoch_cpu_time_median"] - 1.0)
    # Per seed, the two runs share initial weights and batch order: paired gaps.
    gaps = [100.0 * (a - b) for a, b in zip(jfb["final_test_acc_runs"], neu["final_test_acc_runs"])]
    gap = statistics.fmean(gaps)
    similar = abs(gap) <= SIMILAR_ACC_POINTS
    in_range = CLAIM_SPEEDUP[0] <= speedup <= CLAIM_SPEEDUP[1]
    if similar and in_range:
        head = "REPRODUCED"
    elif similar:
        head = "NOT REPRODUCED for the speed-up (accuracy part holds)"
    elif in_range:
        head = "NOT REPRODUCED for the accuracy (speed-up part holds)"
    else:
        head = "NOT REPRODUCED"
    if args.neumann_terms != 5:
        head += f" [note: compared against neumann-{args.neumann_terms}, not neumann-5]"
    where = "below" if speedup < CLAIM_SPEEDUP[0] else ("above" if speedup > CLAIM_SPEEDUP[1] else "inside")
    per_seed = ", ".join(f"{g:+.2f}" for g in gaps)
    text = (
        f"{head}. JFB vs {label('neumann', args)} on digits: speed-up per epoch {speedup:+.1f}% "
        f"(median {neu['epoch_time_median']:.3f}s -> {jfb['epoch_time_median']:.3f}s, {where} the claimed "
        f"{CLAIM_SPEEDUP[0]:.0f}%-{CLAIM_SPEEDUP[1]:.0f}%; CPU time per epoch {cpu_speedup:+.1f}%; "
        f"backward + optimiser step alone {bwd_speedup:+.1f}%). Test accuracy gap (jfb - neumann) "
        f"{gap:+.2f} points ({100 * jfb['final_test_acc']:.2f}% vs {100 * neu['final_test_acc']:.2f}%"
        + (f"; per seed {per_seed}" if len(gaps) > 1 else "")
        + f"; 'similar' = mean gap within {SIMILAR_ACC_POINTS:.1f} point)."
    )
    return dict(available=True, reproduced=similar and in_range, speedup_per_epoch_pct=speedup,
                speedup_cpu_time_per_epoch_pct=cpu_speedup, speedup_backward_pct=bwd_speedup,
                accuracy_gap_points=gap, accuracy_gap_points_per_seed=gaps, similar_accuracy=similar,
                speedup_in_claimed_range=in_range, similar_threshold_points=SIMILAR_ACC_POINTS,
                claimed_speedup_pct=list(CLAIM_SPEEDUP), text=text)


def explanation(results, args) -> str:
    """Why the per-epoch speed-up is what it is: the forward solve is shared by both modes."""
    by = {r["mode"]: r for r in results}
    if "jfb" not in by or "neumann" not in by:
        return ""
    jfb, neu = by["jfb"], by["neumann"]
    fwd_share = neu["fwd_time_median"] / neu["epoch_time_median"]
    return (
        f"Both modes run the same forward solve ({neu['fwd_nfe_mean']:.1f} vs {jfb['fwd_nfe_mean']:.1f} "
        f"f evaluations per sample); JFB only removes the {args.neumann_terms - 1} extra vector-Jacobian "
        f"products of the Neumann backward. Here the forward (solve + loss) is {100 * fwd_share:.0f}% of a "
        f"neumann epoch, which caps JFB's per-epoch speed-up at about {100 * (1 / max(fwd_share, 1e-9) - 1):.0f}% "
        f"even if its backward were free. A larger speed-up needs the backward to dominate the epoch: "
        f"VJPs that cost much more than forward f evaluations, a cheaper forward solve, or more Neumann terms."
    )


def mean_curve(r):
    """(mean cumulative wall time, mean test accuracy in %) per epoch over the mode's runs."""
    hs = [run["history"] for run in r["runs"]]
    n = min(len(h) for h in hs)
    t = [statistics.fmean(h[i]["wall_time"] for h in hs) for i in range(n)]
    a = [100 * statistics.fmean(h[i]["test_acc"] for h in hs) for i in range(n)]
    return t, a


def plot(results, args, path: Path) -> None:
    """Test accuracy against cumulative training time, from epoch 1 on (epoch 0, the initial
    weights at chance level, would squash the curves: its accuracy is given in the title)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    shown = []
    for r in results:
        t, a = mean_curve(r)
        (line,) = ax.plot(t[1:], a[1:], marker="o", markersize=2.5, linewidth=1.5,
                          label=f"{label(r['mode'], args)}: {fmt_acc(r)}, {r['epoch_time_median']:.2f} s/epoch")
        shown += a[1:]
        if len(r["runs"]) > 1:
            for run in r["runs"]:
                h = run["history"][1:]
                ax.plot([x["wall_time"] for x in h], [100 * x["test_acc"] for x in h],
                        color=line.get_color(), linewidth=0.6, alpha=0.3)
                shown += [100 * x["test_acc"] for x in h]
    initial = statistics.fmean(100 * run["history"][0]["test_acc"] for r in results for run in r["runs"])
    ax.set_xlabel("cumulative training wall time (s; evaluation excluded)")
    ax.set_ylabel("test accuracy (%)")
    seeds = f", mean of {args.seeds} seeds" if args.seeds > 1 else ""
    ax.set_title(f"DEQ on sklearn digits: width {args.width}, gamma {args.gamma}, {args.epochs} epochs{seeds}\n"
                 f"from epoch 1 (initial weights: {initial:.1f}% test accuracy)", fontsize=10)
    if shown:
        ax.set_ylim(max(0.0, min(shown) - 1.0), min(100.5, max(shown) + 1.0))
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


def write_markdown(path: Path, results, args, info, ver, expl, cmd, total) -> None:
    seeds = (f"seeds {args.seed}..{args.seed + args.seeds - 1} (one run per mode each; table: mean ± std over seeds)"
             if args.seeds > 1 else f"seed {args.seed}")
    lines = [
        f"Total wall time {total:.0f} s.",
        "",
        f"Machine: {info['cpu_model']}, {info['cpu_count']} logical CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads), device `{info['device']}`, deqfast {info['deqfast']} "
        f"(compiled extension: {info['deqfast_extension'].get('compiled')}).",
        "",
        f"Model: Linear(64->{args.width}) -> DEQ[z = tanh({args.gamma} W z + x), ||W||_2 = 1 by spectral norm] "
        f"-> Linear({args.width}->10). Solver `{args.solver}` (max_iter {args.max_iter}, tol {args.tol}, rel); "
        f"implicit adjoint `{args.backward_solver}` (max_iter {args.backward_max_iter}, tol {args.backward_tol}); "
        f"neumann_terms {args.neumann_terms}; phantom {args.phantom_steps} steps, tau {args.phantom_tau}. "
        f"Adam lr {args.lr}, weight decay {args.weight_decay}, batch {args.batch_size}, {args.epochs} epochs, "
        f"{seeds}; fixed stratified split {1 - args.test_size:.0%}/{args.test_size:.0%} "
        f"({results[0]['n_train']} train / {results[0]['n_test']} test, split seed {args.seed}). "
        "For each seed every mode starts from the same weights and sees the same batches; the modes' epochs "
        "are interleaved so that background load on the machine hits all of them alike.",
        "",
        markdown_table(results, args),
        "",
        "Columns: *test acc* after the last epoch; *s/epoch* median training wall time per epoch (forward, "
        "backward and optimiser step; evaluation excluded), split into forward (solve + loss) and backward + "
        "step; *CPU s/epoch* the process CPU time of the same (less sensitive to other load on the machine); "
        "*fwd NFE* mean `layer.stats.nstep` (f evaluations of the solver per sample; implicit, neumann and jfb "
        "add one differentiable f step, phantom its damped steps); *bwd NFE* mean `layer.stats.backward.nstep` "
        "for implicit (adjoint iterations, each one VJP) and neumann (= terms), 1 for jfb, phantom_steps for "
        "phantom, the forward nstep for bptt; *peak saved* the largest total, over the training steps measured "
        "(the first of each epoch), of bytes of tensors saved for backward (saved_tensors_hooks, each storage "
        "once, parameters included).",
        "",
        "![test accuracy vs wall time](digits_accuracy_vs_time.png)",
        "",
        "## Fung et al. (2021) claim: JFB ~ same accuracy, 60%-400% faster than 5-term Neumann",
        "",
        f"**Verdict: {ver['text']}**",
        "",
        expl,
        "",
    ]
    notes = []
    for r in results:
        if r["nonfinite_loss_steps"]:
            notes.append(f"- {r['mode']}: {r['nonfinite_loss_steps']} training steps with a non-finite loss.")
        if r["n_warnings"]:
            notes.append(f"- {r['mode']}: {r['n_warnings']} warnings, e.g. {r['warnings'][0]!r}.")
        conv = f"forward converged {100 * r['fwd_converged_frac']:.1f}% of samples"
        if r["bwd_converged_frac"] is not None:
            conv += f", backward {100 * r['bwd_converged_frac']:.1f}%"
            if r["mode"] == "neumann":
                conv += (" (for neumann deqfast marks a sample converged when its last Neumann term is below "
                         "backward_tol; with a fixed number of terms that is informational, not a failure)")
        if r["cuda_peak_bytes"] is not None:
            conv += f"; CUDA peak allocated per probed step {fmt_bytes(r['cuda_peak_bytes'])}"
        notes.append(f"- {r['mode']}: {conv} (averaged over training steps).")
    lines += ["## Solver health", ""] + notes + [""]
    lines += [
        "On a shared machine epoch times carry noise (the CPU-time column is steadier); one test sample is "
        f"{100 / results[0]['n_test']:.2f} accuracy point.",
        "",
    ]
    common.write_markdown(path, "DEQ on scikit-learn digits: backward modes compared", [(None, "\n".join(lines))])


# --------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not after a help text that states it, nor None/False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _format_action(self, action):
        if action.help is None and action.option_strings:  # no help text: still show the default
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: few epochs (well under 2 minutes on 2 cores)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per mode and seed (default 30, --quick 3)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default benchmarks/results, with --quick benchmarks/results/quick)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw digits_accuracy_vs_time.png from digits_demo.json in --out (no training)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:0, ...)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--seed", type=int, default=0, help="data split seed, and first model/batch-order seed")
    p.add_argument("--seeds", type=int, default=None,
                   help="runs per mode with model/batch-order seeds seed, seed+1, ... (default 3, --quick 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 1 by default: the matrices are tiny, and with 2 threads on a "
                        "shared 2-core machine any background load slowed epochs down ~10x; 0 keeps torch's default")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--gamma", type=float, default=0.9, help="contraction bound of the cell (< 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--test-size", type=float, default=0.25)
    p.add_argument("--solver", default="anderson")
    p.add_argument("--max-iter", type=int, default=30)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--backward-solver", default="fixed_point")
    p.add_argument("--backward-max-iter", type=int, default=50)
    p.add_argument("--backward-tol", type=float, default=1e-4)
    p.add_argument("--neumann-terms", type=int, default=5)
    p.add_argument("--phantom-steps", type=int, default=5)
    p.add_argument("--phantom-tau", type=float, default=0.5)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = HERE / "results" / "quick" if args.quick else HERE / "results"
    if args.epochs is None:
        args.epochs = 3 if args.quick else 30
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    return args


def replot(args, argv=None) -> int:
    """Redraw the PNG from digits_demo.json (its config stands in for the command's arguments)."""
    path = args.out / "digits_demo.json"
    payload = json.loads(path.read_text())
    recorded = payload.get("provenance")
    if recorded is None:  # written before provenance was recorded: what the file itself says
        machine = payload.get("machine") or {}
        recorded = {"command": payload.get("command"), "run": "quick" if payload["config"].get("quick") else "full",
                    "git_commit": machine.get("git_commit"), "date": machine.get("date"), "machine": machine}
        common.backfill_provenance(path, args.out / "digits_demo.md", recorded)
    common.replot_run(recorded, [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    plot(payload["results"], argparse.Namespace(**payload["config"]), args.out / "digits_accuracy_vs_time.png")
    print(f"redrew {args.out / 'digits_accuracy_vs_time.png'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args, argv)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    seed_everything(args.seed)
    data = load_data(args.seed, args.test_size)
    info = machine_info(device)
    info["quick"] = args.quick
    record = common.start_run(args.quick, info, [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    cmd = record["command"]
    print(f"digits DEQ demo: {data[0].shape[0]} train / {data[2].shape[0]} test, width {args.width}, "
          f"gamma {args.gamma}, {args.epochs} epochs x {args.seeds} seed(s), modes {','.join(args.modes)}")
    print(f"machine: {info['cpu_model']} | torch {info['torch']} | {info['torch_threads']} threads | {device}")

    t_all = time.perf_counter()
    runs = {mode: [] for mode in args.modes}
    for k in range(args.seeds):
        seed = args.seed + k
        trainers = [ModeTrainer(mode, data, args, device, seed) for mode in args.modes]
        for epoch in range(args.epochs):
            shift = (epoch + k) % len(trainers)
            for trainer in trainers[shift:] + trainers[:shift]:
                trainer.run_epoch()
        for t in trainers:
            runs[t.mode].append(t.result())
    results = [aggregate(mode, runs[mode]) for mode in args.modes]
    total = time.perf_counter() - t_all

    ver = verdict(results, args)
    expl = explanation(results, args)
    print()
    print(console_table(results, args))
    print()
    print(ver["text"])
    if expl:
        print(expl)
    for r in results:
        if r["nonfinite_loss_steps"] or r["n_warnings"]:
            print(f"warning: {r['mode']}: {r['nonfinite_loss_steps']} non-finite losses, {r['n_warnings']} warnings "
                  f"{r['warnings'][:2]}")

    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = dict(benchmark="digits_demo", command=cmd, config=config, machine=info,
                   total_wall_time_s=total, results=results, verdict=ver, explanation=expl)
    common.write_json(args.out / "digits_demo.json", payload)
    write_markdown(args.out / "digits_demo.md", results, args, info, ver, expl, cmd, total)
    plot(results, args, args.out / "digits_accuracy_vs_time.png")
    print(f"\nwrote {args.out / 'digits_demo.json'}, {args.out / 'digits_demo.md'}, "
          f"{args.out / 'digits_accuracy_vs_time.png'} (total {total:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
