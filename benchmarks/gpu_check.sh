#!/usr/bin/env bash
# On a GPU machine, in one call (about 4 minutes on an H100/H200; at most ~7 with every step timing
# out): build deqfast with CUDA, run every test (the CUDA ones included), compute-sanitizer memcheck
# over the CUDA op tests and racecheck over a few, the benchmarks. Logs go to $OUT (default
# ./gpu-check-out), the benchmark tables/JSON/PNGs as $OUT/bench_results.tgz (seven files in all:
# the device tool returns at most eight). Needs torch with CUDA, nvcc, ninja, pybind11,
# pytest, scipy; torchdeq's wheel in .whl/ (optional: the compat/oracle tests skip without it).
#
#     OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

echo "== build" | tee "$OUT/build.log"
start=$(date +%s)
DEQFAST_FORCE_CUDA=1 python3 -m pip install -v --no-build-isolation --no-deps --no-index -e . >> "$OUT/build.log" 2>&1 \
  || { tail -n 60 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
python3 -c "import deqfast; print(deqfast.extension_info(), deqfast._C.build_info())" | tee -a "$OUT/build.log"

echo "== tests"
timeout 100 python3 -m pytest -q -rs tests/ 2>&1 | tee "$OUT/tests.log" | tail -n 15

echo "== compute-sanitizer memcheck over the CUDA op tests"
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 1 \
  python3 -m pytest -q -x -m cuda tests/test_ops.py tests/test_cuda.py > "$OUT/memcheck.log" 2>&1
echo "memcheck exit code $?" | tee -a "$OUT/memcheck.log"
tail -n 5 "$OUT/memcheck.log"

echo "== compute-sanitizer racecheck over 12 float32 CUDA op tests (shared-memory hazards)"
timeout 45 compute-sanitizer --tool racecheck --error-exitcode 1 \
  python3 -m pytest -q -x -m cuda tests/test_ops.py -k "dtype1 and (5000 or 8193)" > "$OUT/racecheck.log" 2>&1
echo "racecheck exit code $?" | tee -a "$OUT/racecheck.log"
tail -n 5 "$OUT/racecheck.log"

echo "== benchmarks"
if [ -f benchmarks/run.py ]; then
  timeout 100 python3 benchmarks/run.py --quick --device cuda --out /tmp/deqfast-bench 2>&1 | tee "$OUT/bench.log" | tail -n 40
  # One archive: the device tool brings back at most 8 files.
  tar czf "$OUT/bench_results.tgz" -C /tmp/deqfast-bench .
fi
