#!/usr/bin/env python3
"""The one-call device check of deqfast's CUDA path (benchmarks/gpu_check.sh runs it).

    python benchmarks/gpu_check.py --out OUT [--budget 470] [--only build,registration,...] [--dry-run]

Stages, in order, each in its own process under its own timeout (a timeout is a failure):

  build         setup.py build_ext --inplace with DEQFAST_FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0;
  registration  extension_info()["cuda"], a CUDA kernel registered for every op, the device's
                architecture among the compiled ones, fused_available(cuda);
  pytest        pytest -x -m cuda tests/test_ops.py tests/test_cuda.py; a skipped test fails it;
  shapes        fused ops against the reference at shapes no test reaches (m = 32, fewer filled
                slots than m, the fixed-point track kernel at B > 128, the four sizes of
                benchmarks/README.md, B*m*d > 2^31 elements), a non-default stream, CUDA-graph
                replay equal to eager, fixed_point(cuda_graph=True) equal to eager, DEQ(cuda_graph=True)
                replaying its kept graphs at later calls equal to eager (no capture after the first);
  sanitizers    compute-sanitizer memcheck, initcheck, racecheck, synccheck (concurrently) over a
                small parity subset, PYTORCH_NO_CUDA_MEMORY_CACHING=1, --kernel-name kns=deqfast,
                --error-exitcode 1;
  perf          per-kernel times (torch.profiler) at the four sizes and m = 32: µs, GB/s, ratio to
                a device copy measured in the same run; kernels per step; solver overhead per
                iteration eager and graph-captured, and torchdeq's, in the same run;
  bench         benchmarks/run.py --quick --device cuda into OUT/bench (never benchmarks/results).

Writes OUT/gpu_check.json ({"passed": bool, "stages": {name: {passed, seconds, summary, figures}}})
and OUT/logs.tgz (every stage's log); exits 1 when any stage failed or was not run. Stages after a
failed build or registration are reported failed ("not run"), as are stages the overall budget
(default 470 s) leaves no time for. Without a CUDA device (or with --dry-run) every stage is
reported failed as "not available" and the exit status is 1: this check cannot pass on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# Every op of TORCH_LIBRARY(deqfast) in csrc/ops.cpp; each must have a CUDA kernel.
OPS = ("anderson_history", "anderson_step", "anderson_fused_step", "fixed_point_step", "broyden_direction",
       "broyden_update", "broyden_fused_step")
# (B, d, m): the sizes of the performance model (benchmarks/README.md).
MODEL_SIZES = [(32, 65536, 5), (256, 512, 5), (16, 131072, 5), (8, 1048576, 6)]
SANITIZER_TOOLS = ("memcheck", "initcheck", "racecheck", "synccheck")


@dataclass(frozen=True)
class Stage:
    name: str
    timeout: float  # seconds, at most; less when the overall budget has less left
    requires: Sequence[str] = ()  # stages that must have passed for this one to mean anything
    description: str = ""


STAGES = [
    Stage("build", 200, (), "compile deqfast._C with CUDA (sm_90)"),
    Stage("registration", 60, ("build",), "CUDA build loaded, a CUDA kernel for every op"),
    Stage("pytest", 90, ("build", "registration"), "pytest -x -m cuda on the op and CUDA tests"),
    Stage("shapes", 75, ("build", "registration"), "shapes no test reaches, streams, CUDA graphs"),
    Stage("sanitizers", 120, ("build", "registration"), "compute-sanitizer x4 over a parity subset"),
    Stage("perf", 75, ("build", "registration"), "per-kernel times and overhead vs torchdeq"),
    Stage("bench", 90, ("build", "registration"), "the quick benchmark into OUT/bench"),
]
DEFAULT_BUDGET = 470.0  # seconds for all stages: within 8 minutes with the start-up


def result(passed: bool, summary: str, seconds: float = 0.0, figures: Optional[dict] = None) -> dict:
    return {"passed": bool(passed), "seconds": round(float(seconds), 2), "summary": summary.replace("\n", " ")[:400],
            "figures": figures or {}}


# --------------------------------------------------------------------------------------------
# The orchestration (tested on the CPU with fake runners: tests/test_gpu_check.py)


def run_stage_subprocess(stage: Stage, timeout: float, out: Path, extra_args: Sequence[str] = (),
                         command: Optional[List[str]] = None) -> dict:
    """Run ``gpu_check.py --stage NAME`` (or ``command``) in its own process group under ``timeout``.

    Passed only when the process exits 0 in time AND wrote a result that says passed."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result_path = logs / f"{stage.name}.result.json"
    if result_path.exists():
        result_path.unlink()
    if command is None:
        command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name, "--result", str(result_path),
                   "--out", str(out), *extra_args]
    start = time.monotonic()
    with open(logs / f"{stage.name}.log", "wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return result(False, f"timed out after {timeout:.0f} s (a timeout is a failure)", time.monotonic() - start)
    seconds = time.monotonic() - start
    reported = None
    if result_path.exists():
        try:
            reported = json.loads(result_path.read_text())
        except ValueError:
            reported = None
    if reported is None:
        return result(False, f"exited with {rc} without reporting a result (see logs/{stage.name}.log)", seconds)
    if rc != 0 and reported.get("passed"):
        return result(False, f"reported passed but exited with {rc}", seconds, reported.get("figures"))
    return result(bool(reported.get("passed")) and rc == 0, str(reported.get("summary", "")), seconds,
                  reported.get("figures"))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_all(stages: Sequence[Stage], runner: Callable[[Stage, float], dict], *, cuda_available: bool,
            unavailable_reason: str = "", budget: float = DEFAULT_BUDGET,
            clock: Callable[[], float] = time.monotonic) -> dict:
    """Run the stages in order; returns {"passed", "seconds", "stages": {name: result}}.

    Every stage in ``stages`` ends up with a result: run, failed as not available (no CUDA), not
    run because a stage it requires did not pass, or not run because the budget is spent."""
    start = clock()
    results: Dict[str, dict] = {}
    for stage in stages:
        if not cuda_available:
            results[stage.name] = result(False, f"not available: {unavailable_reason or 'no CUDA device'}")
            continue
        blocked = [name for name in stage.requires if not results.get(name, {}).get("passed")]
        if blocked:
            results[stage.name] = result(False, f"not run: {', '.join(blocked)} did not pass")
            continue
        remaining = budget - (clock() - start)
        if remaining < min(10.0, stage.timeout):
            results[stage.name] = result(False, f"not run: {remaining:.0f} s of the {budget:.0f} s budget left")
            continue
        timeout = min(stage.timeout, remaining)
        try:
            outcome = runner(stage, timeout)
        except Exception as exc:  # a broken stage is a failed stage, not a crashed check
            outcome = result(False, f"the driver failed running it: {type(exc).__name__}: {exc}")
        results[stage.name] = outcome
    passed = bool(stages) and all(r["passed"] for r in results.values()) and len(results) == len(stages)
    return {"passed": passed, "seconds": round(clock() - start, 2), "stages": results}


def write_report(report: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    return path


def print_report(report: dict) -> None:
    for name, r in report["stages"].items():
        print(f"{'PASS' if r['passed'] else 'FAIL'} {name:<13} {r['seconds']:7.1f} s  {r['summary']}")
    print(f"gpu_check: {'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s")


def cuda_status(dry_run: bool):
    """(available, reason)."""
    if dry_run:
        return False, "--dry-run"
    try:
        import torch
    except ImportError as exc:
        return False, f"torch is not importable ({exc})"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, ""


# --------------------------------------------------------------------------------------------
# Checks with no GPU in them (tested on the CPU)


def check_registration(info: dict, build_info: Optional[dict], has_cuda_kernel: Callable[[str], bool],
                       capability: Optional[tuple] = None, fused: Optional[bool] = None) -> List[str]:
    """What is wrong with the loaded extension for a CUDA run: [] when nothing."""
    problems = []
    if not info.get("compiled"):
        problems.append(f"deqfast._C is not loaded: {info.get('reason')}")
    if not info.get("cuda"):
        problems.append(f"extension_info()['cuda'] is False: {info.get('reason')}")
    missing = [op for op in OPS if not has_cuda_kernel(f"deqfast::{op}")]
    if missing:
        problems.append("no CUDA kernel registered for " + ", ".join(f"deqfast::{op}" for op in missing))
    if capability is not None and build_info is not None:
        archs = build_info.get("cuda_archs") or []
        if archs and not arch_runs_on(archs, capability):
            problems.append(f"device sm_{capability[0]}{capability[1]} is not among the compiled archs {archs}")
    if fused is False:
        problems.append("fused_available(cuda) is False: " + str(info.get("cuda_reason", info.get("reason"))))
    return problems


def arch_runs_on(archs: Sequence[str], capability: tuple) -> bool:
    """Whether code built for ``archs`` ("sm_90", "compute_90", ...) runs on a (major, minor) device:
    SASS for the same major and a minor <= the device's, or PTX of a version <= the device's."""
    major, minor = capability
    for arch in archs:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)[af]?", arch)
        if not match:
            continue
        kind, a_major, a_minor = match.group(1), int(match.group(2)), int(match.group(3))
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def parse_junit(path: Path) -> dict:
    """{"tests", "failures", "errors", "skipped"} summed over a pytest junit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in totals:
            totals[key] += int(suite.get(key, 0))
    return totals


def pytest_verdict(rc: int, counts: Optional[dict]) -> tuple:
    """(passed, summary) of the pytest stage: rc 0, at least one test, none skipped."""
    if counts is None:
        return False, f"pytest exited with {rc} and wrote no junit report"
    ran = counts["tests"] - counts["skipped"]
    summary = (f"{ran} passed of {counts['tests']} collected, {counts['failures']} failed, {counts['errors']} errors, "
               f"{counts['skipped']} skipped (rc {rc})")
    passed = rc == 0 and counts["tests"] > 0 and counts["skipped"] == 0 and not counts["failures"] and not counts["errors"]
    if counts["skipped"]:
        summary += "; a skipped CUDA test is a failure here"
    return passed, summary


def sanitizer_verdict(tool: str, rc: Optional[int], output: str, timed_out: bool) -> tuple:
    """(passed, summary) of one compute-sanitizer run over the parity subset."""
    if timed_out:
        return False, f"{tool}: timed out (a failure)"
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", output)
    ran = PARITY_SUBSET_OK in output
    if rc != 0:
        return False, f"{tool}: exit {rc}, {errors[-1] if errors else '?'} errors"
    if not ran:
        return False, f"{tool}: the parity subset did not report that the deqfast kernels ran"
    if not errors:
        return False, f"{tool}: no ERROR SUMMARY line (did compute-sanitizer run?)"
    if int(errors[-1]) != 0:
        return False, f"{tool}: {errors[-1]} errors"
    return True, f"{tool}: 0 errors"


PARITY_SUBSET_OK = "deqfast parity subset: OK"


# --------------------------------------------------------------------------------------------
# The stages, each run in its own process (``--stage NAME``)


def stage_build(out: Path, timeout: float) -> dict:
    env = dict(os.environ, DEQFAST_FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 8))
    for stale in list(ROOT.glob("deqfast/_C*.so")):
        stale.unlink()  # an old CPU build must not be what registration then loads
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout)
    seconds = time.monotonic() - start
    setup_line = next((line for line in proc.stdout.splitlines() if line.startswith("deqfast setup")), "")
    built = list(ROOT.glob("deqfast/_C*.so"))
    passed = proc.returncode == 0 and bool(built) and "+ CUDA" in setup_line
    summary = f"build {'ok' if passed else 'FAILED'} in {seconds:.0f} s: {setup_line or 'no setup line'}"
    return result(passed, summary, seconds, {"build_s": seconds, "archs": env["TORCH_CUDA_ARCH_LIST"]})


def stage_registration(out: Path, timeout: float) -> dict:
    import torch

    import deqfast
    from deqfast import _extension

    info = deqfast.extension_info()
    build_info = deqfast._C.build_info() if info["compiled"] else None
    device = torch.device("cuda", torch.cuda.current_device())
    capability = torch.cuda.get_device_capability(device)
    fused = _extension.fused_available(device)
    info = deqfast.extension_info()  # fused_available records the CUDA reason
    has = lambda op: bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"))
    problems = check_registration(info, build_info, has, capability, fused)
    print("extension_info:", info, "\nbuild_info:", build_info, "\ndevice:", torch.cuda.get_device_name(device), capability)
    figures = {"device": torch.cuda.get_device_name(device), "capability": list(capability), "build_info": build_info,
               "extension_info": info}
    if problems:
        return result(False, "; ".join(problems), figures=figures)
    return result(True, f"CUDA kernels for {len(OPS)} ops, {build_info.get('cuda_info')}, on "
                        f"{figures['device']} (sm_{capability[0]}{capability[1]})", figures=figures)


def stage_pytest(out: Path, timeout: float) -> dict:
    xml = out / "logs" / "pytest.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", "tests/test_ops.py", "tests/test_cuda.py"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout)
    counts = parse_junit(xml) if xml.exists() else None
    passed, summary = pytest_verdict(proc.returncode, counts)
    return result(passed, summary, figures=counts or {})


# ---- parity helpers (need torch; imported lazily)

# The device the parity helpers run on: "cuda" here; tests/test_gpu_check.py sets "cpu" to run the
# same comparisons on the CPU ops (a smoke test of this file's logic, not of the CUDA kernels).
DEVICE = "cuda"


def _sync():
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _rand(shape, dtype, seed):
    import torch

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.randn(*shape, generator=g, device=DEVICE, dtype=wide).to(dtype)


def _rtol(dtype):
    import torch

    return {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


def _max_rel(actual, expected) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).abs().max() / (e.abs().max() + 1e-30)) if e.numel() else 0.0


def anderson_parity(B, d, m, n_filled, dtype, tau=1.0, lam=1e-3, seed=0, with_fused_step=True) -> dict:
    """One Anderson step, fused vs reference, on random history with n_filled filled slots."""
    import torch

    from deqfast import ops, reference
    from deqfast.reference import SampleState

    slot = n_filled - 1
    x, fx = _rand((B, d), dtype, seed), _rand((B, d), dtype, seed + 1)
    F, G = _rand((B, m, d), dtype, seed + 2), _rand((B, m, d), dtype, seed + 3)
    acc = reference.accumulation_dtype(dtype)
    state = SampleState(x, 0.5, "rel")
    state.best_x = _rand((B, d), dtype, seed + 4)
    state.residual = torch.rand(B, device=DEVICE, dtype=acc) * 50
    state.rel_residual = torch.rand(B, device=DEVICE, dtype=acc) * 2
    state.converged = torch.arange(B, device=DEVICE) % 7 == 3

    def clone_state(s):
        c = SampleState(s.best_x, s.tol, "rel")
        for name in ("best_x", "residual", "rel_residual", "nstep", "converged", "failed"):
            setattr(c, name, getattr(s, name).clone())
        return c

    s_ref, s_fused = clone_state(state), clone_state(state)
    F_ref, G_ref, partials_ref = reference.anderson_history(x, fx, F.clone(), G.clone(), slot)
    gram0 = torch.bmm(G_ref.to(acc), G_ref.to(acc).transpose(1, 2)) if B * m * d < 2 ** 28 else _gram_blocked(G_ref, acc)
    gram_ref, next_ref = reference.anderson_step(x, F_ref, G_ref, gram0.clone(), partials_ref, s_ref, n_filled, slot, lam, tau)
    del partials_ref
    F_f, G_f = F, G
    del F, G
    partials = torch.ops.deqfast.anderson_history(x, fx, F_f, G_f, slot)
    gram = gram0.clone()
    gram[:, slot, :] = float("nan")
    gram[:, :, slot] = float("nan")
    gram, x_next = ops.anderson_step(x, F_f, G_f, gram, partials, s_fused, n_filled, slot, lam, tau, fused=True)
    _sync()
    # Tolerances relative to each output's largest magnitude. The sums (Gram row, norms) run in
    # another order than the reference's, in the accumulation dtype; x_next is rounded to the state
    # dtype. An indexing or chunking error is off by O(1) (a chunk of d elements missing).
    sum_tol = 1e-10 if acc == torch.float64 else 1e-4
    x_tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    errs = {
        "F_equal": bool(torch.equal(F_f, F_ref)), "G_equal": bool(torch.equal(G_f, G_ref)),
        "gram": _max_rel(gram, gram_ref), "x_next": _max_rel(x_next, next_ref),
        "best_x_equal": bool(torch.equal(s_fused.best_x, s_ref.best_x)),
        "residual": _max_rel(s_fused.residual, s_ref.residual),
        "state_flags_equal": bool(torch.equal(s_fused.nstep, s_ref.nstep) and torch.equal(s_fused.converged, s_ref.converged)
                                  and torch.equal(s_fused.failed, s_ref.failed)),
        "tolerances": {"sums": sum_tol, "x_next": x_tol},
    }
    ok = (errs["F_equal"] and errs["G_equal"] and errs["state_flags_equal"] and errs["best_x_equal"]
          and errs["gram"] <= sum_tol and errs["residual"] <= sum_tol and errs["x_next"] <= x_tol)
    if with_fused_step and hasattr(torch.ops.deqfast, "anderson_fused_step"):
        # the one-call step gives the two-call step's bits
        x2 = _anderson_fused_once(x, fx, F_ref, G_ref, gram0, clone_state(state), n_filled, slot, lam, tau)
        errs["fused_step_equal"] = bool(torch.equal(x2, x_next))
        ok = ok and errs["fused_step_equal"]
    errs["passed"] = bool(ok)
    return errs


def _anderson_fused_once(x, fx, F_ref, G_ref, gram0, state, n_filled, slot, lam, tau):
    from deqfast import ops

    B, m, d = F_ref.shape
    # restore the history as it was before pass A: the reference wrote slot = fx, fx - x
    F, G = F_ref.clone(), G_ref.clone()
    ws = ops.AndersonWorkspace(x, m)
    gram = gram0.clone()
    return ops.anderson_fused_step(x, fx, F, G, gram, state, ws, n_filled, slot, lam, tau)


def _gram_blocked(G, acc):
    import torch

    return torch.stack([G[b].to(acc) @ G[b].to(acc).T for b in range(G.shape[0])])


def fixed_point_parity(B, d, dtype, with_offset, tau, seed=0) -> dict:
    import torch

    from deqfast import ops, reference
    from deqfast.reference import SampleState

    x, fx = _rand((B, d), dtype, seed), _rand((B, d), dtype, seed + 1)
    offset = _rand((B, d), dtype, seed + 2) if with_offset else None
    s_ref, s_f = SampleState(x, 1.0, "rel"), SampleState(x, 1.0, "rel")
    next_ref = reference.fixed_point_step(x, fx, offset, s_ref, tau)
    x_next = ops.fixed_point_step(x, fx, offset, s_f, tau, fused=True)
    _sync()
    errs = {"x_next": _max_rel(x_next, next_ref), "residual": _max_rel(s_f.residual, s_ref.residual),
            "flags_equal": bool(torch.equal(s_f.converged, s_ref.converged) and torch.equal(s_f.nstep, s_ref.nstep))}
    errs["passed"] = errs["x_next"] <= _rtol(dtype) and errs["residual"] <= _rtol(dtype) * 4 and errs["flags_equal"]
    return errs


def stream_parity() -> dict:
    """The fused ops on a non-default stream give the default stream's bits."""
    import torch

    from deqfast import ops
    from deqfast.reference import SampleState

    def run(stream):
        with torch.cuda.stream(stream):
            x, fx = _rand((64, 9000), torch.float32, 1), _rand((64, 9000), torch.float32, 2)
            F, G = torch.zeros(64, 5, 9000, device="cuda"), torch.zeros(64, 5, 9000, device="cuda")
            gram = torch.zeros(64, 5, 5, device="cuda")
            state = SampleState(x, 0.0, "rel")
            outs = []
            for k in range(7):
                F, G, partials = ops.anderson_history(x, fx, F, G, k % 5, fused=True)
                gram, x = ops.anderson_step(x, F, G, gram, partials, state, min(k + 1, 5), k % 5, 1e-4, 0.8, fused=True)
                fx = torch.sin(x)
                outs.append(x)
            y = ops.fixed_point_step(x, fx, None, state, 0.5, fused=True)
        stream.synchronize()
        return torch.cat([o.flatten() for o in outs] + [y.flatten(), gram.flatten(), state.residual])

    default = run(torch.cuda.current_stream())
    side = run(torch.cuda.Stream())
    return {"equal": bool(torch.equal(default, side)), "passed": bool(torch.equal(default, side))}


def graph_parity() -> dict:
    """Replaying a captured sequence of fused steps gives the eager bits."""
    import torch

    from deqfast import ops
    from deqfast.reference import SampleState

    B, d, m = 32, 5000, 5
    c = _rand((B, d), torch.float32, 3)
    f = lambda z: torch.sin(z + c)

    def fresh():
        x = _rand((B, d), torch.float32, 4)
        return dict(x=x, F=torch.zeros(B, m, d, device="cuda"), G=torch.zeros(B, m, d, device="cuda"),
                    gram=torch.zeros(B, m, m, device="cuda"), state=SampleState(x, 0.0, "rel"))

    def steps(s):
        x = s["x"]
        for k in range(2 * m):
            _, _, partials = ops.anderson_history(x, f(x), s["F"], s["G"], k % m, fused=True)
            _, x = ops.anderson_step(x, s["F"], s["G"], s["gram"], partials, s["state"], min(k + 1, m), k % m,
                                     1e-4, 1.0, fused=True)
        s["x"].copy_(x)

    eager = fresh()
    steps(eager)
    graphed = fresh()
    warm = fresh()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        steps(warm)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steps(graphed)
    # capture does not run the work: the static tensors still hold their initial values
    start = fresh()
    for key in ("x", "F", "G", "gram"):
        graphed[key].copy_(start[key])
    for name in ("best_x", "residual", "rel_residual", "nstep", "converged", "failed"):
        getattr(graphed["state"], name).copy_(getattr(start["state"], name))
    graph.replay()
    torch.cuda.synchronize()
    equal = torch.equal(graphed["x"], eager["x"]) and torch.equal(graphed["state"].residual, eager["state"].residual)
    return {"equal": bool(equal), "passed": bool(equal)}


def solver_graph_parity() -> dict:
    """deqfast.fixed_point(..., cuda_graph=True) gives the eager solve's bits."""
    import torch

    import deqfast

    B, d = 64, 3000
    W = _rand((d, d), torch.float32, 5) * (0.5 / d ** 0.5)
    c = _rand((B, d), torch.float32, 6)
    f = lambda z: torch.tanh(z @ W.T + c)
    z0 = torch.zeros(B, d, device="cuda")
    try:
        z_e, s_e = deqfast.fixed_point(f, z0, max_iter=40, tol=1e-5, check_every=4)
        z_g, s_g = deqfast.fixed_point(f, z0, max_iter=40, tol=1e-5, check_every=4, cuda_graph=True)
    except TypeError as exc:
        return {"passed": False, "error": f"cuda_graph keyword missing: {exc}"}
    equal = torch.equal(z_e, z_g) and torch.equal(s_e.nstep, s_g.nstep)
    return {"equal": bool(equal), "nstep": int(s_e.nstep.max()), "passed": bool(equal)}


def deq_graph_reuse() -> dict:
    """DEQ(cuda_graph=True) replays the graphs its first call captured at later calls (new x and z0,
    the same key): the eager DEQ's bits, gradients included, and nothing captured after the first
    call; under float16 autocast too (the cast weights must not come from autocast's cache)."""
    import torch

    import deqfast

    B, d = 64, 1024

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(d, d, device=DEVICE)
            with torch.no_grad():
                self.lin.weight.mul_(0.25 / self.lin.weight.norm(dim=1, keepdim=True))  # ‖W‖₂ about 0.5

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    cell = Cell()
    options = dict(max_iter=40, tol=0.0, check_every=4, backward_tol=1e-4)  # every block from iteration 4 on replayed
    graphed, eager = deqfast.DEQ(cell, cuda_graph=True, **options), deqfast.DEQ(cell, **options)
    equal, captures = True, []
    for call in range(4):
        autocast = call == 3
        x = _rand((B, d), torch.float32, 20 + call).requires_grad_()
        z0 = None if call == 0 else _rand((B, d), torch.float32, 30 + call)
        with torch.autocast(DEVICE, dtype=torch.float16, enabled=autocast):
            for _ in range(2 if autocast else 1):  # the second autocast call replays
                z_g, z_e = graphed(x, z0), eager(x, z0)
                equal &= torch.equal(z_g, z_e) and torch.equal(graphed.stats.nstep, eager.stats.nstep)
                grads = [torch.autograd.grad(z.square().sum(), [x, cell.lin.weight]) for z in (z_g, z_e)]
                equal &= all(torch.equal(a, b) for a, b in zip(*grads))
                captures.append(graphed.graph_captures)
    # captures after each call: first key at call 0, the autocast key at the first autocast call
    reused = captures[0] > 0 and captures[0] == captures[1] == captures[2] < captures[3] == captures[4]
    return {"equal": bool(equal), "captures_after_each_call": captures, "replayed_without_capture": bool(reused),
            "nstep": int(eager.stats.nstep.max()), "passed": bool(equal and reused)}


def shape_cases():
    """(name, thunk) for stage 'shapes'."""
    import torch

    f32, f64, f16 = torch.float32, torch.float64, torch.float16
    cases = [
        ("m32_full", lambda: anderson_parity(4, 10000, 32, 32, f64, seed=1)),
        ("m32_7_filled", lambda: anderson_parity(4, 10000, 32, 7, f64, tau=0.7, seed=2)),
        ("m32_1_filled_f32", lambda: anderson_parity(3, 5000, 32, 1, f32, seed=3)),
        ("m32_bf16", lambda: anderson_parity(3, 5000, 32, 20, torch.bfloat16, seed=4)),
        ("fixed_point_B1000", lambda: fixed_point_parity(1000, 300, f32, True, 0.7, seed=5)),
        ("fixed_point_B300_f64", lambda: fixed_point_parity(300, 5000, f64, False, 1.0, seed=6)),
    ]
    for B, d, m in MODEL_SIZES:
        cases.append((f"anderson_{B}x{d}_m{m}_f32", lambda B=B, d=d, m=m: anderson_parity(B, d, m, m, f32, seed=B)))
        cases.append((f"anderson_{B}x{d}_m{m}_f64_tau", lambda B=B, d=d, m=m: anderson_parity(B, d, m, m - 2, f64, tau=0.6, seed=d)))
    # B*m*d > 2^31 elements (float16: 4 GiB per history buffer): 64-bit indexing end to end
    cases.append(("over_2^31_elements_f16", lambda: anderson_parity(2, 2 ** 28 + 3, 4, 4, f16, seed=7, with_fused_step=False)))
    cases.append(("non_default_stream", stream_parity))
    cases.append(("cuda_graph_replay", graph_parity))
    cases.append(("fixed_point_cuda_graph_keyword", solver_graph_parity))
    cases.append(("deq_cuda_graph_kept_across_calls", deq_graph_reuse))
    return cases


def stage_shapes(out: Path, timeout: float) -> dict:
    import torch

    figures, failed = {}, []
    for name, thunk in shape_cases():
        start = time.monotonic()
        try:
            figures[name] = thunk()
        except Exception as exc:
            figures[name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
        figures[name]["seconds"] = round(time.monotonic() - start, 2)
        print(name, figures[name], flush=True)
        if not figures[name]["passed"]:
            failed.append(name)
        torch.cuda.empty_cache()
    summary = f"{len(figures) - len(failed)} of {len(figures)} cases match" + (f"; failed: {', '.join(failed)}" if failed else "")
    return result(not failed, summary, figures=figures)


def parity_subset() -> None:
    """A few small cases for compute-sanitizer: every kernel, every dtype class, B > 128."""
    import torch

    import deqfast

    assert deqfast.extension_info()["cuda"], deqfast.extension_info()
    results = [
        anderson_parity(3, 5000, 4, 4, torch.float32, tau=0.7, seed=1),
        anderson_parity(2, 300, 32, 9, torch.float64, seed=2),
        anderson_parity(2, 8193, 3, 2, torch.float16, seed=3),
        fixed_point_parity(200, 70, torch.float32, True, 0.5, seed=4),
        fixed_point_parity(2, 4097, torch.bfloat16, False, 1.0, seed=5),
    ]
    bad = [r for r in results if not r["passed"]]
    assert not bad, bad
    print(PARITY_SUBSET_OK, flush=True)


def find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "compute-sanitizer")):
            return os.path.join(home, "bin", "compute-sanitizer")
    return None


def stage_sanitizers(out: Path, timeout: float) -> dict:
    tool_path = find_sanitizer()
    if tool_path is None:
        return result(False, "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    procs = {}
    for tool in SANITIZER_TOOLS:
        extra = ["--racecheck-report", "all"] if tool == "racecheck" else []
        cmd = [tool_path, "--tool", tool, "--error-exitcode", "1", "--kernel-name", "kns=deqfast", *extra,
               sys.executable, str(Path(__file__).resolve()), "--parity-subset"]
        log = open(out / "logs" / f"sanitizer_{tool}.log", "w+")
        procs[tool] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True), log)
    deadline = time.monotonic() + max(1.0, timeout - 5)
    figures, verdicts = {}, []
    for tool, (proc, log) in procs.items():
        timed_out = False
        try:
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, timed_out = None, True
        log.seek(0)
        output = log.read()
        log.close()
        passed, summary = sanitizer_verdict(tool, rc, output, timed_out)
        figures[tool] = {"passed": passed, "rc": rc, "summary": summary}
        verdicts.append((passed, summary))
    return result(all(p for p, _ in verdicts), "; ".join(s for _, s in verdicts), figures=figures)


# ---- performance


def _events_time(fn, repeats=20, warmup=3) -> float:
    """Median seconds of fn() with CUDA events."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int) -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch

    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / _events_time(lambda: dst.copy_(src))


def kernel_times(B, d, m, dtype_name="float32", iters=10) -> dict:
    """Per-kernel device time of one Anderson step (profiler), its bytes and bandwidth."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from deqfast import ops
    from deqfast.reference import SampleState

    dtype = getattr(torch, dtype_name)
    x, fx = _rand((B, d), dtype, 1), _rand((B, d), dtype, 2)
    F, G = _rand((B, m, d), dtype, 3), _rand((B, m, d), dtype, 4)
    gram = torch.bmm(G.float(), G.float().transpose(1, 2))
    state = SampleState(x, 0.0, "rel")
    ws = ops.AndersonWorkspace(x, m)

    def step():
        ops.anderson_fused_step(x, fx, F, G, gram, state, ws, m, m - 1, 1e-4, 1.0)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per_kernel: Dict[str, List[float]] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA and "deqfast" in event.name:
            per_kernel.setdefault(_short_kernel_name(event.name), []).append(event.time_range.elapsed_us())
    launches = sum(len(v) for v in per_kernel.values()) / iters
    s = torch.finfo(dtype).bits // 8
    N = B * d
    model = {"history": (m + 3) * N * s, "track": 0, "apply": (m + 1) * N * s}
    kernels = {}
    for name, times in per_kernel.items():
        us = sorted(times)[len(times) // 2]
        nbytes = next((v for k, v in model.items() if k in name), 0)
        kernels[name] = {"us": us, "bytes": nbytes, "GBps": nbytes / (us * 1e-6) / 1e9 if nbytes and us else None}
    floor_bytes = (2 * m + 3) * N * s
    return {"B": B, "d": d, "m": m, "kernels": kernels, "kernels_per_step": launches, "floor_bytes": floor_bytes,
            "step_us": sum(k["us"] for k in kernels.values())}


def _short_kernel_name(name: str) -> str:
    match = re.search(r"(anderson_\w+_kernel|fixed_point_\w+_kernel)", name)
    return match.group(1) if match else name[:60]


def solver_overhead(B, d, m, T=30) -> dict:
    """Per-iteration time of whole solves, f = sin(z + c) (µs): f alone, deqfast eager, deqfast
    cuda_graph=True (graphs captured per solve), DEQ eager and DEQ(cuda_graph=True) (graphs kept
    across calls: replayed, not captured, in the timed calls), torchdeq (if importable);
    overhead = iteration - f. The DEQ rows include its forward's one f at z* and stats."""
    import torch

    import deqfast

    c = _rand((B, d), torch.float32, 9)
    f = lambda z: torch.sin(z + c)
    z0 = torch.zeros(B, d, device="cuda")
    row = {"B": B, "d": d, "m": m, "T": T}

    def f_only():
        z = z0
        for _ in range(T):
            z = f(z)

    with torch.no_grad():
        row["f_us"] = _events_time(f_only, repeats=5) / T * 1e6
        row["deqfast_eager_us"] = _events_time(
            lambda: deqfast.solvers.anderson(f, z0, max_iter=T, tol=0.0, m=m), repeats=5) / T * 1e6
        try:
            row["deqfast_graph_us"] = _events_time(
                lambda: deqfast.solvers.anderson(f, z0, max_iter=T, tol=0.0, m=m, cuda_graph=True), repeats=5) / T * 1e6
        except Exception as exc:
            row["deqfast_graph_error"] = f"{type(exc).__name__}: {exc}"

        class SinCell(torch.nn.Module):
            def forward(self, z, x):
                return torch.sin(z + x)

        for key, graphed in (("deq_eager_us", False), ("deq_graph_kept_us", True)):
            try:
                layer = deqfast.DEQ(SinCell(), max_iter=T, tol=0.0, m=m, cuda_graph=graphed)
                row[key] = _events_time(lambda: layer(c), repeats=5) / T * 1e6
                if graphed:
                    row["deq_graph_captures"] = layer.graph_captures  # all in the warm-up calls
            except Exception as exc:
                row[key.replace("_us", "_error")] = f"{type(exc).__name__}: {exc}"
        try:
            from torchdeq.solver import get_solver

            anderson = get_solver("anderson")
            row["torchdeq_us"] = _events_time(
                lambda: anderson(f, z0, max_iter=T, tol=0.0, stop_mode="abs", m=m, lam=1e-4), repeats=3) / T * 1e6
        except Exception as exc:
            row["torchdeq_error"] = f"{type(exc).__name__}: {exc}"
    for key in ("deqfast_eager_us", "deqfast_graph_us", "deq_eager_us", "deq_graph_kept_us", "torchdeq_us"):
        if key in row:
            row[key.replace("_us", "_overhead_us")] = row[key] - row["f_us"]
    return row


def stage_perf(out: Path, timeout: float) -> dict:
    import torch

    bandwidth = copy_bandwidth(512 * 2 ** 20)
    rows, overhead = [], []
    for B, d, m in MODEL_SIZES + [(32, 65536, 32), (256, 512, 32)]:
        row = kernel_times(B, d, m)
        floor_us = row["floor_bytes"] / bandwidth * 1e6
        row["floor_us"] = floor_us
        row["step_over_floor"] = row["step_us"] / floor_us
        for k in row["kernels"].values():
            k["ratio_to_copy"] = (k["GBps"] * 1e9 / bandwidth) if k["GBps"] else None
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    for B, d, m in MODEL_SIZES:
        overhead.append(solver_overhead(B, d, m))
        print(json.dumps(overhead[-1]), flush=True)
        torch.cuda.empty_cache()
    figures = {"device": torch.cuda.get_device_name(), "copy_GBps": bandwidth / 1e9, "kernels": rows,
               "overhead": overhead}
    worst = max(r["step_over_floor"] for r in rows[:4])
    launches = max(r["kernels_per_step"] for r in rows)
    summary = (f"copy {bandwidth / 1e9:.0f} GB/s; fused step / floor at the model sizes up to {worst:.2f}x; "
               f"{launches:.0f} kernels per step")
    # measured, not judged: a performance figure never fails the check (nothing asserts a time)
    return result(True, summary, figures=figures)


def stage_bench(out: Path, timeout: float) -> dict:
    bench_out = out / "bench"
    bench_out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--device", "cuda", "--out", str(bench_out)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(proc.stdout)
    committed = (ROOT / "benchmarks" / "results").resolve()
    assert bench_out.resolve() != committed
    files = sorted(p.name for p in bench_out.iterdir())
    return result(proc.returncode == 0 and bool(files), f"run.py exit {proc.returncode}, {len(files)} files in OUT/bench",
                  figures={"files": files})


STAGE_FUNCTIONS = {"build": stage_build, "registration": stage_registration, "pytest": stage_pytest,
                   "shapes": stage_shapes, "sanitizers": stage_sanitizers, "perf": stage_perf, "bench": stage_bench}


def run_one_stage(name: str, out: Path, result_path: Path, timeout: float) -> int:
    """Child process: run one stage, write its result JSON; exit 0 only when it passed."""
    start = time.monotonic()
    try:
        outcome = STAGE_FUNCTIONS[name](out, timeout)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        outcome = result(False, f"{type(exc).__name__}: {exc}")
    outcome["seconds"] = round(time.monotonic() - start, 2)
    result_path.write_text(json.dumps(outcome, default=str))
    return 0 if outcome["passed"] else 1


def bundle_logs(out: Path) -> None:
    logs = out / "logs"
    if logs.is_dir():
        with tarfile.open(out / "logs.tgz", "w:gz") as tar:
            tar.add(logs, arcname="logs")
        shutil.rmtree(logs)
    bench = out / "bench"
    if bench.is_dir():
        with tarfile.open(out / "bench_results.tgz", "w:gz") as tar:
            tar.add(bench, arcname="bench")
        shutil.rmtree(bench)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "gpu-check-out")))
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all stages together")
    p.add_argument("--only", default=None, help="comma-separated stages (the others are not reported)")
    p.add_argument("--dry-run", action="store_true", help="report every stage failed as not available; exit 1")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--parity-subset", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = args.out.resolve()
    if args.parity_subset:
        parity_subset()
        return 0
    if args.stage:
        return run_one_stage(args.stage, out, args.result, args.timeout)
    stages = STAGES
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {s.name for s in STAGES})
        if unknown:
            p.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(s.name for s in STAGES)}")
        stages = [s for s in STAGES if s.name in names]
    available, reason = cuda_status(args.dry_run)
    out.mkdir(parents=True, exist_ok=True)
    runner = lambda stage, timeout: run_stage_subprocess(stage, timeout, out, ["--timeout", str(timeout)])
    report = run_all(stages, runner, cuda_available=available, unavailable_reason=reason, budget=args.budget)
    report["device"] = _device_name() if available else None
    write_report(report, out)
    bundle_logs(out)
    print_report(report)
    return 0 if report["passed"] else 1


def _device_name() -> Optional[str]:
    try:
        import torch

        return torch.cuda.get_device_name()
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
