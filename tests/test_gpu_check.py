"""benchmarks/gpu_check.py's verdict logic on the CPU, with fake stages: the device check must not
be able to pass falsely (a failing, timed-out, skipped or unregistered stage fails the whole check)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
_spec.loader.exec_module(gpu_check)

STAGES = [gpu_check.Stage("build", 5), gpu_check.Stage("registration", 5, ("build",)),
          gpu_check.Stage("pytest", 5, ("build", "registration")), gpu_check.Stage("perf", 5, ("build",))]


def _runner(verdicts):
    calls = []

    def run(stage, timeout):
        calls.append((stage.name, timeout))
        return gpu_check.result(verdicts.get(stage.name, True), f"fake {stage.name}", 0.1)

    run.calls = calls
    return run


def test_all_stages_passing_passes():
    report = gpu_check.run_all(STAGES, _runner({}), cuda_available=True)
    assert report["passed"] and set(report["stages"]) == {s.name for s in STAGES}


@pytest.mark.parametrize("failing", ["pytest", "perf"])
def test_one_failing_stage_fails_the_check(failing):
    report = gpu_check.run_all(STAGES, _runner({failing: False}), cuda_available=True)
    assert not report["passed"] and not report["stages"][failing]["passed"]
    assert all(r["passed"] for name, r in report["stages"].items() if name != failing)


def test_a_failed_build_marks_the_dependent_stages_not_run():
    runner = _runner({"build": False})
    report = gpu_check.run_all(STAGES, runner, cuda_available=True)
    assert not report["passed"] and [name for name, _ in runner.calls] == ["build"]
    for name in ("registration", "pytest", "perf"):
        assert not report["stages"][name]["passed"] and "not run" in report["stages"][name]["summary"]


def test_no_cuda_reports_every_stage_not_available():
    runner = _runner({})
    report = gpu_check.run_all(STAGES, runner, cuda_available=False, unavailable_reason="--dry-run")
    assert not report["passed"] and runner.calls == []
    assert all(not r["passed"] and r["summary"].startswith("not available") for r in report["stages"].values())


def test_a_crashing_runner_is_a_failed_stage():
    def run(stage, timeout):
        raise RuntimeError("boom")

    report = gpu_check.run_all(STAGES[:1], run, cuda_available=True)
    assert not report["passed"] and "boom" in report["stages"]["build"]["summary"]


def test_the_budget_caps_timeouts_and_stages_beyond_it_fail():
    now, timeouts = [0.0], []

    def run(stage, timeout):
        timeouts.append(timeout)
        now[0] += 25.0
        return gpu_check.result(True, "ok")

    stages = [gpu_check.Stage(f"s{i}", 40) for i in range(4)]
    report = gpu_check.run_all(stages, run, cuda_available=True, budget=65, clock=lambda: now[0])
    assert timeouts == [40, 40, 15]  # the third gets what is left of the budget
    assert [r["passed"] for r in report["stages"].values()] == [True, True, True, False]
    assert "budget" in report["stages"]["s3"]["summary"] and not report["passed"]


def test_subprocess_timeout_is_a_failure(tmp_path):
    stage = gpu_check.Stage("sleepy", 1)
    r = gpu_check.run_stage_subprocess(stage, 0.5, tmp_path, command=[sys.executable, "-c", "import time; time.sleep(30)"])
    assert not r["passed"] and "timed out" in r["summary"] and r["seconds"] < 10


def test_subprocess_exit_status_and_result_must_both_say_passed(tmp_path):
    stage = gpu_check.Stage("liar", 10)
    result_path = tmp_path / "logs" / "liar.result.json"
    write = f"open({str(result_path)!r}, 'w').write('{{\"passed\": true, \"summary\": \"fine\"}}')"
    lying = gpu_check.run_stage_subprocess(stage, 10, tmp_path, command=[sys.executable, "-c", f"{write}; raise SystemExit(3)"])
    assert not lying["passed"]
    silent = gpu_check.run_stage_subprocess(stage, 10, tmp_path, command=[sys.executable, "-c", "pass"])
    assert not silent["passed"] and "without reporting" in silent["summary"]
    honest = gpu_check.run_stage_subprocess(stage, 10, tmp_path, command=[sys.executable, "-c", write])
    assert honest["passed"]


def _has(ops):
    return lambda name: name.split("::")[1] in ops


def test_registration_fails_when_an_op_has_no_cuda_kernel():
    info = {"compiled": True, "cuda": True, "reason": "loaded"}
    build = {"cuda_archs": ["sm_90"], "cuda_info": "CUDA 13.0"}
    assert gpu_check.check_registration(info, build, _has(gpu_check.OPS), (9, 0), True) == []
    missing = [op for op in gpu_check.OPS if op != "anderson_step"]
    problems = gpu_check.check_registration(info, build, _has(missing), (9, 0), True)
    assert len(problems) == 1 and "deqfast::anderson_step" in problems[0]


def test_registration_fails_without_the_cuda_build_or_the_device_arch():
    build = {"cuda_archs": ["sm_80"], "cuda_info": "CUDA 13.0"}
    cpu_only = {"compiled": True, "cuda": False, "reason": "loaded: fused ops for CPU"}
    assert any("extension_info()['cuda'] is False" in p
               for p in gpu_check.check_registration(cpu_only, build, _has(gpu_check.OPS)))
    problems = gpu_check.check_registration({"compiled": True, "cuda": True}, build, _has(gpu_check.OPS), (9, 0), False)
    assert any("sm_90 is not among" in p for p in problems) and any("fused_available" in p for p in problems)


@pytest.mark.parametrize("archs,cap,runs", [
    (["sm_90"], (9, 0), True), (["sm_80"], (9, 0), False), (["sm_80"], (8, 6), True),
    (["sm_86"], (8, 0), False), (["sm_80", "compute_90"], (10, 0), True), (["compute_100"], (9, 0), False),
    (["sm_90a"], (9, 0), True),
])
def test_arch_runs_on(archs, cap, runs):
    assert gpu_check.arch_runs_on(archs, cap) is runs


def test_pytest_verdict_rejects_skips_and_empty_runs(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="10" failures="0" errors="0" skipped="2"/></testsuites>')
    counts = gpu_check.parse_junit(xml)
    assert counts == {"tests": 10, "failures": 0, "errors": 0, "skipped": 2}
    assert not gpu_check.pytest_verdict(0, counts)[0]
    assert not gpu_check.pytest_verdict(0, {"tests": 0, "failures": 0, "errors": 0, "skipped": 0})[0]
    assert not gpu_check.pytest_verdict(1, {"tests": 5, "failures": 1, "errors": 0, "skipped": 0})[0]
    assert not gpu_check.pytest_verdict(2, None)[0]
    assert gpu_check.pytest_verdict(0, {"tests": 5, "failures": 0, "errors": 0, "skipped": 0})[0]


def test_sanitizer_verdict():
    ok = gpu_check.PARITY_SUBSET_OK + "\n========= ERROR SUMMARY: 0 errors\n"
    assert gpu_check.sanitizer_verdict("memcheck", 0, ok, False)[0]
    assert not gpu_check.sanitizer_verdict("memcheck", None, "", True)[0]  # timeout
    assert not gpu_check.sanitizer_verdict("memcheck", 1, ok.replace("0 errors", "3 errors"), False)[0]
    # the kernels never ran (e.g. the extension did not load): 0 errors proves nothing
    assert not gpu_check.sanitizer_verdict("racecheck", 0, "========= ERROR SUMMARY: 0 errors\n", False)[0]
    assert not gpu_check.sanitizer_verdict("synccheck", 0, gpu_check.PARITY_SUBSET_OK, False)[0]


def test_dry_run_writes_a_failed_report_and_exits_nonzero(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not report["passed"] and set(report["stages"]) == {s.name for s in gpu_check.STAGES}
    assert all(not r["passed"] and "not available" in r["summary"] for r in report["stages"].values())


@pytest.mark.parametrize("case", [
    dict(B=3, d=5000, m=4, n_filled=4, dtype="float32", tau=0.7),
    dict(B=2, d=300, m=32, n_filled=7, dtype="float64", tau=1.0),
    dict(B=2, d=8193, m=3, n_filled=2, dtype="float16", tau=1.0),
    dict(B=0, d=10, m=2, n_filled=1, dtype="float32", tau=1.0),
])
def test_parity_helpers_pass_on_the_cpu_ops(monkeypatch, case):
    """The shapes/sanitizer stages' comparisons, run on the CPU ops: the helpers and their tolerances
    accept a correct implementation (on a GPU they compare the CUDA kernels)."""
    import torch

    import deqfast

    if not deqfast.extension_info()["compiled"]:
        pytest.skip("deqfast._C is not compiled/enabled")
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    case = dict(case, dtype=getattr(torch, case["dtype"]))
    r = gpu_check.anderson_parity(**case, seed=3)
    assert r["passed"] and r["fused_step_equal"], r
    r = gpu_check.fixed_point_parity(130, 70, torch.float32, True, 0.5, seed=4)
    assert r["passed"], r


def test_parity_helpers_catch_a_wrong_kernel(monkeypatch):
    import torch

    import deqfast
    from deqfast import ops

    if not deqfast.extension_info()["compiled"]:
        pytest.skip("deqfast._C is not compiled/enabled")
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    real = ops.anderson_step

    def off_by_a_bit(*args, **kwargs):
        gram, x_next = real(*args, **kwargs)
        return gram, x_next + 1e-3 * x_next.abs().max()

    monkeypatch.setattr(ops, "anderson_step", off_by_a_bit)
    r = gpu_check.anderson_parity(2, 500, 4, 4, torch.float32, seed=1)
    assert not r["passed"] and not r["fused_step_equal"]
