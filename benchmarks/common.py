"""Plumbing shared by the benchmarks: timing, autograd-memory and call accounting, output.

Rules followed everywhere (benchmarks/README.md, "How to measure"):

* warm up first, then report the median of several repeats;
* on CUDA, time with CUDA events and synchronise before reading them; on the CPU, perf_counter
  (CPU ops are synchronous);
* random data, never zeros or constants; ``torch.set_flush_denormal(True)`` on the CPU (run.py);
* ratios are taken between numbers measured in the same run; nothing here asserts a time.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch


# --------------------------------------------------------------------------------------------
# Run configuration


@dataclass
class Config:
    """What run.py hands every benchmark."""

    device: torch.device
    quick: bool
    out: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def pick(self, *, quick, cpu, cuda, cuda_quick=None):
        """The setting for this run. On a GPU: ``cuda`` (with --quick: ``cuda_quick`` when given;
        sizes stay benchmarks/README.md's, fewer repeats). On the CPU: ``quick`` or ``cpu``."""
        if self.cuda:
            return cuda_quick if self.quick and cuda_quick is not None else cuda
        return quick if self.quick else cpu


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Timing


class Clock:
    """Marks phase boundaries inside one timed call: ``clock.lap("forward")`` after the forward.

    On CUDA each mark is a recorded event (no synchronisation inside the timed region); on the
    CPU a perf_counter reading. ``phases()`` returns seconds per phase plus ``"total"``.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: List[tuple] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [("start", self._now())]

    def lap(self, name: str) -> None:
        self.marks.append((name, self._now()))

    def phases(self) -> Dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
            elapsed = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731  (ms -> s)
        else:
            elapsed = lambda a, b: b - a  # noqa: E731
        out = {}
        for (_, t0), (name, t1) in zip(self.marks, self.marks[1:]):
            out[name] = elapsed(t0, t1)
        out["total"] = elapsed(self.marks[0][1], self.marks[-1][1])
        return out


def time_repeats(step: Callable[[Clock], None], device: torch.device, *, repeats: int, warmup: int = 1,
                 budget_s: Optional[float] = None) -> Dict[str, dict]:
    """Median seconds per phase of ``step(clock)`` over ``repeats`` timed calls after ``warmup``.

    Ours rather than torch.utils.benchmark's Timer (which time_function uses): a training step is
    timed whole and split into its phases (forward, backward) within the same call, by CUDA events
    on a GPU; Timer times a statement as a whole.

    ``step`` must call ``clock.lap(name)`` at the end of each phase (at least once). With
    ``budget_s``, stops after 3 repeats once the timed calls have used that much wall time.
    Returns {phase: {"median_s", "min_s", "samples"}}.
    """
    for _ in range(warmup):
        clock = Clock(device)
        clock.start()
        step(clock)
        clock.phases()
    samples: Dict[str, List[float]] = {}
    began = time.perf_counter()
    for i in range(repeats):
        synchronize(device)
        clock = Clock(device)
        clock.start()
        step(clock)
        for name, seconds in clock.phases().items():
            samples.setdefault(name, []).append(seconds)
        if budget_s is not None and i >= 2 and time.perf_counter() - began > budget_s:
            break
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "samples": v} for name, v in samples.items()}


def time_function(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 1,
                  inner: int = 1, budget_s: Optional[float] = None) -> Dict[str, float]:
    """{"median_s", "min_s", "samples"}: seconds of one call of ``fn``, by torch.utils.benchmark.

    ``Timer.blocked_autorange`` picks how many calls each timed block runs (so the timer's own
    overhead is negligible), synchronises the device around each block and runs at torch's current
    thread count (set here; the Timer's default is 1). Medians and minima are over blocks.
    ``warmup`` calls come first; the last one's time sizes the run: about ``repeats`` calls' worth
    (at least 50 ms), capped at ``budget_s``; ``inner`` multiplies that (Timer itself picks the
    calls per block).
    Phases inside one call (forward, backward) are what time_repeats is for: Timer has no laps.
    """
    from torch.utils.benchmark import Timer

    per_call = 0.0
    for _ in range(max(warmup, 1)):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        per_call = time.perf_counter() - t0
    min_run_time = max(0.05, repeats * max(inner, 1) * per_call)
    if budget_s is not None:
        min_run_time = min(min_run_time, budget_s)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_s": measurement.median, "min_s": min(measurement.times), "samples": len(measurement.times)}


def fix_malloc_thresholds(mmap_threshold: int = 32 * 2 ** 20) -> bool:
    """Pin glibc malloc's mmap and trim thresholds (mallopt); returns whether it took.

    By default glibc serves a large allocation with a fresh mmap until its dynamic threshold has
    risen past that size, and every mmap'd tensor page-faults on first touch. Whether a 1 MiB
    output is mmap'd then depends on the process's allocation history: f = sin on 4 x 65536
    measured 80 us in one run and 700 us in the next. Fixed thresholds make every process serve
    tensors up to ``mmap_threshold`` from the heap, as a long-running training process does."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 4 * mmap_threshold))
    except (OSError, AttributeError):  # not glibc
        return False


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 7) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written (2 x nbytes per copy).

    From the fastest copy (as STREAM reports): a bandwidth is what the memory system can do, and
    the best of several copies is the stable estimate of it; solver times are medians."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = time_function(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)["min_s"]
    return 2 * n * 4 / seconds


# --------------------------------------------------------------------------------------------
# Autograd memory, f calls and VJPs, host syncs and dispatched ops. Ours: no library measures
# these. torch.profiler and torch.cuda.memory_stats report allocations, not the bytes autograd keeps
# for backward (which is what a backward mode costs, on any device); f calls and VJPs are counted
# by wrapping f; host syncs and ops are counted with torch's own hooks (set_sync_debug_mode,
# TorchDispatchMode).


def storage_key(t: torch.Tensor) -> Optional[int]:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return None


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward, each distinct storage counted once.

    Used as a context manager around a training step (``torch.autograd.graph.saved_tensors_hooks``).
    This is the autograd memory that a backward mode costs, the quantity BPTT makes grow with the
    iterations; it is device-independent, so it is also reported on CPU where no allocator
    statistics exist. Storages listed in ``exclude`` (parameters, inputs) are not counted.
    ``phase`` (set by :class:`MeasureClock`) splits the bytes into those saved during the forward
    and those saved while backward runs (a library that re-runs f in backward, like torchdeq's
    IFT, builds a second graph there).

    Storages are recognised by address only (no reference is kept, so memory is released as
    usual and a CUDA peak measured in the same call is undisturbed). Saved tensors stay alive
    while their graph does, so two live ones never share an address; a storage freed and its
    address reused within one step would be counted once (an undercount, not seen in the steps
    measured here).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.exclude = {storage_key(t) for t in exclude}
        self.seen = set()
        self.bytes: Dict[str, int] = {"forward": 0, "backward": 0}
        self.phase = "forward"

    def _pack(self, t: torch.Tensor):
        key = storage_key(t)
        if key is not None and key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.bytes[self.phase] += t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def active(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


class _VJPProbe(torch.autograd.Function):
    """Identity whose backward counts one vector-Jacobian product through f."""

    @staticmethod
    def forward(ctx, counter, y):
        ctx.counter = counter
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.vjps += 1
        return None, grad


class CallCounter:
    """Wraps f(z, *args) -> z: counts calls per phase and VJPs through its output.

    ``enabled=False`` makes it a plain pass-through (timed runs). With ``trace=True`` each call
    also records the worst relative residual max_b ‖f(z_b) − z_b‖ / ‖f(z_b)‖ of the batch.
    """

    def __init__(self, f: Callable, trace: bool = False):
        self.f = f
        self.trace = trace
        self.enabled = False
        self.reset()

    def reset(self) -> None:
        self.phase = "forward"
        self.calls = {"forward": 0, "backward": 0}
        self.vjps = 0
        self.residuals: List[float] = []

    def __call__(self, z, *args):
        out = self.f(z, *args)
        if not self.enabled:
            return out
        self.calls[self.phase] += 1
        if self.trace:
            with torch.no_grad():
                diff = (out - z).flatten(1).norm(dim=1)
                rel = diff / out.flatten(1).norm(dim=1).clamp_min(1e-30)
                self.residuals.append(float(rel.max()))
        if out.requires_grad:
            out = _VJPProbe.apply(self, out)
        return out


class MeasureClock(Clock):
    """A clock for the one measured (untimed) call: switches counter and meter to "backward"
    at the first lap so that f calls and saved bytes are split by phase."""

    def __init__(self, device, counter: Optional[CallCounter], meter: Optional[SavedTensorMeter]):
        super().__init__(device)
        self.counter, self.meter = counter, meter

    def lap(self, name: str) -> None:
        super().lap(name)
        if self.counter is not None:
            self.counter.phase = "backward"
        if self.meter is not None:
            self.meter.phase = "backward"


def measure_step(step: Callable[[Clock], None], device: torch.device, counter: Optional[CallCounter],
                 exclude: Iterable[torch.Tensor]) -> dict:
    """Run ``step`` once with f calls, VJPs and saved tensors counted (and, on CUDA, the peak of
    the caching allocator above what was allocated before). Also serves as a warm-up call."""
    meter = SavedTensorMeter(exclude)
    if counter is not None:
        counter.reset()
        counter.enabled = True
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    clock = MeasureClock(device, counter, meter)
    try:
        with meter.active():
            clock.start()
            step(clock)
            clock.phases()
    finally:
        if counter is not None:
            counter.enabled = False
    peak = None
    if device.type == "cuda":
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    result = {
        "saved_bytes_forward": meter.bytes["forward"],
        "saved_bytes_backward": meter.bytes["backward"],
        "saved_bytes": meter.bytes["forward"] + meter.bytes["backward"],
        "cuda_peak_extra_bytes": peak,
    }
    if counter is not None:
        result.update(nfe_forward=counter.calls["forward"], f_calls_in_backward=counter.calls["backward"],
                      vjps=counter.vjps)
    return result


def count_aten_ops(fn: Callable[[], object]) -> int:
    """Operators dispatched to the backend during ``fn()`` (TorchDispatchMode): on a GPU each is
    at least one kernel launch, so this is the device-independent proxy for launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.n += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.n


def count_host_syncs(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Host synchronisations during ``fn()`` on CUDA (torch.cuda.set_sync_debug_mode); None on CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


# --------------------------------------------------------------------------------------------
# Progress and output


class Progress:
    """A progress bar on stderr (tqdm; the bench extra installs it): ``advance(note)`` after each
    item, ``close()`` at the end. Without tqdm, one line at the start and one at the end."""

    def __init__(self, total: int, label: str):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.label, self.began = label, time.perf_counter()
        self.bar = None if tqdm is None else tqdm(total=total, desc=f"{label:<12}", file=sys.stderr, leave=True,
                                                  dynamic_ncols=True, mininterval=0.5)
        if self.bar is None:
            print(f"{label}: {total} items", file=sys.stderr, flush=True)

    def advance(self, note: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(f"{self.label}: done in {time.perf_counter() - self.began:.1f}s", file=sys.stderr, flush=True)


def fmt(value, digits: int = 3) -> str:
    """Numbers for tables: None -> '—', floats to ``digits`` significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 10 ** (digits + 2) or abs(value) < 10 ** -(digits - 1)):
            return f"{value:.{max(digits - 1, 1)}e}"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence], markdown: bool = False) -> str:
    """Rows as aligned text (console) or a markdown table. Kept ours rather than a table library
    (tabulate, rich): ten lines, one more dependency saved, and the cells are ``fmt``'s numbers."""
    cells = [[fmt(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    print(f"\n== {title}")
    print(format_table(headers, rows))
    sys.stdout.flush()


def table_section(title: str, headers: Sequence[str], rows: Sequence[Sequence]) -> tuple:
    """Print a titled table and return it as a (heading, markdown table) section for write_markdown."""
    print_table(title, headers, rows)
    return title, format_table(headers, rows, markdown=True)


# --------------------------------------------------------------------------------------------
# Provenance: every results file says how it was made (command, commit, machine, quick or full).
# run.py and digits_demo.py call start_run once; write_json, write_markdown and save_figure below
# (the only writers of results files) stamp what it recorded.

_RUN: Optional[dict] = None


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as typed from the repository root: ``python benchmarks/run.py --quick``."""
    import shlex

    argv = list(sys.argv if argv is None else argv)
    script = argv[0] if argv and argv[0] else "?"
    try:
        script = os.path.relpath(script, Path(__file__).resolve().parent.parent)
    except ValueError:  # another drive (Windows)
        pass
    return shlex.join(["python", script, *argv[1:]])


def git_state() -> dict:
    """{"git_commit": full hash or None, "git_dirty": whether tracked files differ from it, or None}."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "deqfast", "csrc", "benchmarks",
                         "setup.py")) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"git_commit": commit, "git_dirty": dirty}


def start_run(quick: bool, info: dict, argv: Optional[Sequence[str]] = None) -> dict:
    """Record how this run's files are made: the command line, the commit (and whether tracked
    files differed from it), quick or full, and ``info`` (machine_info). Returns the record."""
    global _RUN
    _RUN = {"command": command_line(argv), "run": "quick" if quick else "full", **git_state(),
            "date": info.get("date") or datetime.datetime.now().isoformat(timespec="seconds"), "machine": info}
    return _RUN


def replot_run(recorded: Optional[dict], argv: Optional[Sequence[str]] = None) -> dict:
    """The record for figures redrawn from a results JSON: the run that measured (``recorded``)
    plus the command and commit that drew the figure."""
    global _RUN
    _RUN = dict(recorded or {"command": None, "run": None, "git_commit": None, "machine": None})
    _RUN["replotted"] = {"command": command_line(argv), **git_state(),
                         "date": datetime.datetime.now().isoformat(timespec="seconds")}
    return _RUN


def backfill_provenance(json_path: Path, md_path: Optional[Path], recorded: dict) -> None:
    """Give results written before provenance was recorded the record inferred for them (``recorded``,
    marked "inferred"): a "provenance" key in the JSON, a "Made by" line under the markdown's title.
    Files that have theirs are left as they are."""
    recorded = {**recorded, "inferred": True}
    obj = json.loads(json_path.read_text())
    if "provenance" not in obj:
        json_path.write_text(json.dumps({**obj, "provenance": recorded}, indent=2, default=_json_default) + "\n")
    if md_path is not None and md_path.exists():
        lines = md_path.read_text().split("\n")
        if not any(line.startswith("Made by ") for line in lines):
            md_path.write_text("\n".join(lines[:1] + ["", provenance_line(recorded)] + lines[1:]))


def provenance() -> Optional[dict]:
    """This run's record (start_run), or None in a script that did not start one."""
    return _RUN


def provenance_line(record: Optional[dict] = None) -> str:
    """One sentence: how a results file was made."""
    record = record if record is not None else _RUN
    if record is None:
        return "Made outside run.py (no provenance recorded)."
    commit = (record.get("git_commit") or "unknown")[:12]
    if record.get("git_dirty"):
        commit += " + uncommitted changes"
    machine = record.get("machine")
    where = (machine_label(machine) + f", torch {machine.get('torch') or machine.get('torch_version')}"
             if machine else "an unrecorded machine")
    inferred = " (record reconstructed after the run from its machine record)" if record.get("inferred") else ""
    text = (f"Made by `{record.get('command')}`{inferred} ({record.get('run') or 'unknown'} run) at commit {commit}, "
            f"{record.get('date') or 'date unrecorded'}, on {where}.")
    redrawn = record.get("replotted")
    if redrawn:
        text += (f" Figure redrawn from the JSON by `{redrawn['command']}` at commit "
                 f"{(redrawn.get('git_commit') or 'unknown')[:12]}.")
    return text


def write_json(path: Path, obj) -> None:
    """JSON file; a dict gets this run's "provenance" record (start_run) unless it has one."""
    if isinstance(obj, dict) and _RUN is not None and "provenance" not in obj:
        obj = {**obj, "provenance": _RUN}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_markdown(path: Path, title: str, sections: Sequence[tuple]) -> None:
    """sections: (heading or None, text) pairs; text is a table or a paragraph."""
    parts = [f"# {title}", "", provenance_line(), ""]
    for heading, text in sections:
        if heading:
            parts += [f"## {heading}", ""]
        parts += [text, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG with this run's provenance in its metadata (text chunks
    "Description": provenance_line(), "Comment": the record as JSON, machine details left to the
    JSON beside it), then close it."""
    record = {k: v for k, v in (_RUN or {}).items() if k != "machine"}
    if _RUN and _RUN.get("machine"):
        record["machine"] = machine_label(_RUN["machine"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Description": provenance_line(), "Comment": json.dumps(record),
                                         "Software": "deqfast benchmarks (matplotlib)"})
    import matplotlib.pyplot as plt
    plt.close(fig)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no PNG plots)")
        return None
    return plt


def unrolled_forward(T: int) -> Callable:
    """BPTT baseline: forward(f, z0) applies f T times with autograd recording every step."""
    def forward(f, z0):
        z = z0
        for _ in range(T):
            z = f(z)
        return z

    return forward


def torchdeq_module():
    """torchdeq when importable (the baseline), else None: its columns are then absent."""
    try:
        import torchdeq
    except Exception:  # noqa: BLE001  (any import failure just drops the baseline)
        return None
    return torchdeq


def deqfast_fused_available(device: torch.device) -> bool:
    """Whether deqfast's fused ops run on ``device`` (extension_info(): compiled, and built with
    CUDA for a GPU): the key for the "deqfast fused" columns."""
    import deqfast
    info = deqfast.extension_info()
    return bool(info["compiled"] and (device.type == "cpu" or info["cuda"]))


def machine_info(device: torch.device) -> dict:
    """CPU model, core and thread counts, versions, GPU name: stored with every result set."""
    import deqfast
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu_model = cpu_model or platform.processor() or platform.machine()

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "deqfast": deqfast.__version__,
        "deqfast_extension": deqfast.extension_info(),
        "deqfast_path": "fused" if deqfast_fused_available(device) else "reference (pure PyTorch)",
        "torchdeq": version("torchdeq"),
        "git_commit": commit,
        "device": str(device),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_GiB": round(props.total_memory / 2 ** 30, 1), "cuda": torch.version.cuda}
    return info


def busy_cores(seconds: float = 1.0) -> Optional[float]:
    """Cores kept busy by other processes over ``seconds`` (from /proc/stat; this process sleeps
    meanwhile), or None where /proc/stat is missing. More immediate than the load average."""

    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return 0.0
    return round((1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1), 2)


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def device_label(info: dict) -> str:
    """The card (or CPU) the numbers were measured on, for every table title."""
    return machine_label(info) + (", QUICK run" if info.get("quick") else "")


def machine_label(info: dict) -> str:
    """The card, or the CPU model and torch's thread count."""
    return info["gpu"]["name"] if info.get("gpu") else f"{info['cpu_model']}, {info['torch_threads']} threads"
