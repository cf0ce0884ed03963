"""deqfast benchmarks: the one entry point.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out DIR] [--only NAME,...]
                             [--threads N] [--no-extension] [--replot]

Runs, in order (each a module benchmarks/bench_<name>.py with a ``run(cfg, info)``):

* overhead     Anderson solver overhead per iteration vs torchdeq and the memory floor;
* training     one training step (forward solve + backward) per backward mode vs torchdeq,
               BPTT and the compute floor: time, autograd memory, f evaluations and VJPs;
* complexity   the seed's complexity table measured: BPTT vs implicit vs JFB as T and P grow;
* convergence  f evaluations to reach tol, deqfast vs torchdeq solvers;
* compaction   DEQ(compact=True) on a batch with per-sample contraction 0.3..0.97: rows evaluated
               and time per solve vs compact=False and torchdeq.

Each prints a table and writes <name>.json, <name>.md and <name>.png under --out, plus
machine.json (CPU model, torch version, threads, GPU). --out defaults to benchmarks/results (the
committed full-run results) for a full run and to benchmarks/results/quick (git-ignored) with
--quick, so a quick run never overwrites the committed results. Every file says how it was made:
the JSON a "provenance" record (command line, git commit, quick or full, machine), the markdown a
"Made by" line, the PNG the same in its metadata (Description and Comment text chunks).
--replot redraws the PNGs from the JSON in --out without measuring anything (results written
before provenance was recorded get one reconstructed from machine.json, marked so). --quick on the
CPU uses small sizes and takes well under 3 minutes on 2 idle cores (about 1 minute); on CUDA it keeps
benchmarks/README.md's sizes with fewer repeats. Timings are medians after warm-up; nothing here asserts a time. CPU timings need
an otherwise idle machine: machine.json records the cores other processes kept busy before and
after the run, and a warning is printed when they were not idle.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import common  # noqa: E402

BENCHMARKS = ["overhead", "training", "complexity", "convergence", "compaction"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few repeats; small sizes on the CPU (about 1 minute on 2 idle cores, "
                        "far longer on a busy machine)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for JSON, markdown and PNG (default benchmarks/results, with --quick "
                        "benchmarks/results/quick)")
    p.add_argument("--replot", action="store_true",
                   help="only redraw <name>.png from <name>.json in --out (no measurement)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for CPU runs (default: torch's choice, recorded in machine.json)")
    p.add_argument("--no-extension", action="store_true",
                   help="set DEQFAST_DISABLE_EXTENSION=1: every deqfast call takes the pure-PyTorch reference")
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args = p.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.out is None:
        args.out = HERE / "results" / "quick" if args.quick else HERE / "results"
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return args


def setup_device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            sys.exit("run.py: --device cuda but torch.cuda.is_available() is False")
        device = torch.device("cuda", torch.cuda.current_device())
        # fp32 means fp32: no TF32 in matmuls or convolutions.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return device
    # Fixed-point iterations that converge far drift into denormal floats, 10–100x slower on CPUs.
    torch.set_flush_denormal(True)
    return torch.device("cpu")


def setup_host() -> bool:
    """Whether malloc's thresholds could be pinned (common.fix_malloc_thresholds): CPU timings of
    MiB-sized tensors are bimodal across processes otherwise."""
    return common.fix_malloc_thresholds()


def warn_if_busy(info: dict) -> None:
    """CPU timings are only meaningful on an otherwise idle machine: say so when it is not."""
    busy = info["busy_cores_before"]
    if info["device"] == "cpu" and busy is not None and busy > 0.2:
        print(f"WARNING: other processes kept {busy:.1f} of {info['cpu_count']} cores busy just before starting: "
              f"CPU timings will be inflated and noisy (torch's OpenMP threads stall when a core is taken; "
              f"--threads 1 suffers less). Counts and memory are unaffected.")


def replot(args, argv=None) -> int:
    """Redraw each benchmark's PNG from its JSON in args.out. The PNG records the run that measured
    (the JSON's provenance, else machine.json's commit and quick flag) and the command that drew it."""
    plt = common.pyplot()
    if plt is None:
        return 1
    machine = args.out / "machine.json"
    machine = json.loads(machine.read_text()) if machine.exists() else None
    for name in args.only:
        path = args.out / f"{name}.json"
        if not path.exists():
            print(f"run.py --replot: no {path}; skipped")
            continue
        result = json.loads(path.read_text())
        recorded = result.get("provenance")
        if recorded is None and machine is not None:  # results written before provenance was recorded
            quick = bool(machine.get("quick"))
            recorded = {"command": "python benchmarks/run.py" + (" --quick" if quick else ""),
                        "run": "quick" if quick else "full", "git_commit": machine.get("git_commit"),
                        "date": machine.get("date"), "machine": machine}
            common.backfill_provenance(path, args.out / f"{name}.md", recorded)
        common.replot_run(recorded, [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
        importlib.import_module(f"bench_{name}").replot(result, args.out, plt)
        print(f"redrew {args.out / (name + '.png')}")
    if machine is not None and "provenance" not in machine:
        quick = bool(machine.get("quick"))
        common.backfill_provenance(args.out / "machine.json", None, {
            "command": "python benchmarks/run.py" + (" --quick" if quick else ""), "run": "quick" if quick else "full",
            "git_commit": machine.get("git_commit"), "date": machine.get("date")})
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(args, argv)
    if args.no_extension:  # read when deqfast first loads its extension, i.e. after this line
        os.environ["DEQFAST_DISABLE_EXTENSION"] = "1"
    malloc_pinned = setup_host()
    device = setup_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = common.Config(device=device, quick=args.quick, out=args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    info = common.machine_info(device)
    info["quick"] = args.quick
    info["malloc_thresholds_pinned"] = malloc_pinned
    info["load_average_before"] = common.load_average()
    info["busy_cores_before"] = common.busy_cores()
    common.start_run(args.quick, info, [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    common.write_json(args.out / "machine.json", info)
    print(f"deqfast benchmarks on {common.device_label(info)} | torch {info['torch']} | "
          f"torchdeq {info['torchdeq'] or 'not installed'} | extension: {info['deqfast_extension']['reason']}")
    warn_if_busy(info)
    began = time.perf_counter()
    timings = {}
    for name in args.only:
        t0 = time.perf_counter()
        module = importlib.import_module(f"bench_{name}")
        module.run(cfg, info)
        timings[name] = time.perf_counter() - t0
    total = time.perf_counter() - began
    info["load_average_after"] = common.load_average()
    info["busy_cores_after"] = common.busy_cores()
    info["benchmark_seconds"] = {**{k: round(v, 1) for k, v in timings.items()}, "total": round(total, 1)}
    common.write_json(args.out / "machine.json", info)
    print(f"\nresults in {args.out} ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}; total {total:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
