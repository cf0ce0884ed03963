#!/usr/bin/env bash
# The one-call device check of deqfast's CUDA path. How the lead runs it, from the repository root:
#
#     mkdir -p .whl && cp ../shared/wheels/*.whl .whl/        # torchdeq's wheel, for the comparisons
#     pip download --no-deps -d .whl "setuptools>=77,<82"      # setup.py needs >= 77; torch 2.11 wants < 82
#     run(command="OUT=$OUT bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# It installs the wheels of .whl/ into /tmp/site (no network), records nvidia-smi, then runs
# benchmarks/gpu_check.py: build (TORCH_CUDA_ARCH_LIST=9.0), registration, pytest -m cuda, shapes,
# compute-sanitizer x4, perf, the quick benchmark -- each stage under its own timeout, all within
# 470 s (8 minutes with the start-up). What comes back in $OUT (three files): gpu_check.json (per
# stage: passed, seconds, summary, figures), logs.tgz (every stage's log), bench_results.tgz (the
# quick benchmark's tables; never written into benchmarks/results). Exit status 0 only when every
# stage passed; without a GPU every stage is "not available" and the status is 1.
# Whoever runs it commits what came back under benchmarks/results/gpu/, with the card's name.
#
# Needs on the device machine: torch with CUDA, nvcc (CUDA_HOME), ninja, pybind11, pytest, scipy,
# compute-sanitizer (in $CUDA_HOME/bin).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv > "$OUT/logs/nvidia-smi.txt" 2>&1
cat "$OUT/logs/nvidia-smi.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/logs/wheels.log" 2>&1 \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import sys, setuptools, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'setuptools', setuptools.__version__, setuptools.__file__)" \
  > "$OUT/logs/versions.txt" 2>&1
cat "$OUT/logs/versions.txt"
exec timeout 540 python3 benchmarks/gpu_check.py --out "$OUT" "$@"
