#!/usr/bin/env bash
# The one-command check on an offline GPU host (docs/design.md, "The GPU check on an offline GPU
# host"), in order:
#   1. the GPU tests of every GPU backend (pytest -m gpu),
#   2. compute-sanitizer memcheck, then racecheck, over benchmarks/gpu_smoke.py (a few small
#      forward/backward/step calls of every GPU backend and dtype, checked against the reference),
#   3. the quick benchmark profile (python -m benchmarks.gpu_bench --quick).
# Every step runs under its own time limit so the whole stays under 8 minutes, and a failing step
# does not stop the next. Logs and results go to an output directory: the one given as $1, else
# the one named by the environment variable OUT, else benchmarks/results/gpu_check. summary.txt
# lists each step's exit status (124: timed out).
#
#   bash benchmarks/gpu_check.sh [OUTDIR]
#
# Environment: PYTHON (default python3), and the limits in seconds TESTS_S (default 170),
# MEMCHECK_S (75), RACECHECK_S (75), BENCH_S (110): 430 s, under 8 minutes even with the
# 10 s each step may take to be killed.
set -u
out="${1:-${OUT:-$(dirname "$0")/results/gpu_check}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
summary="$out/summary.txt"
status=0

{
    echo "gpu_check.sh started $(date -u +%FT%TZ) in $PWD"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv 2>&1 || echo "nvidia-smi not available"
    "$py" -c 'import sys, numpy, cupy; print("python", sys.version.split()[0], "numpy",
numpy.__version__, "cupy", cupy.__version__, "CUDA runtime",
cupy.cuda.runtime.runtimeGetVersion(), "driver", cupy.cuda.runtime.driverGetVersion())' 2>&1
    "$py" -c 'import cosattn; print("backends:", cosattn.available_backends())' 2>&1
} >"$summary"

# run NAME SECONDS COMMAND...: one step, its output in $out/NAME.log, its status in the summary.
run() {
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start))s" | tee -a "$summary"
    tail -n 5 "$out/$name.log"
    return $rc
}

run pytest_gpu "${TESTS_S:-170}" "$py" -m pytest -m gpu -q -p no:cacheprovider tests || status=1

if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        limit_var="$(echo "$tool" | tr a-z A-Z)_S"
        run "$tool" "${!limit_var:-75}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
            "$py" -m benchmarks.gpu_smoke --no-pool || status=1
    done
else
    echo "compute-sanitizer: not on PATH, memcheck and racecheck not run" | tee -a "$summary"
fi

run gpu_bench "${BENCH_S:-110}" "$py" -m benchmarks.gpu_bench --quick --out "$out" || status=1

echo "gpu_check.sh finished $(date -u +%FT%TZ), overall exit $status" | tee -a "$summary"
exit $status
