#!/usr/bin/env bash
# The one command for an offline GPU host (docs/design.md, "The GPU check on an offline GPU
# host"). Run from anywhere; it works in the checkout that holds it:
#
#   bash benchmarks/gpu_check.sh [--quick] [--only STEP,...] [--dry-run] [OUTDIR]
#
# Full mode, under 8 minutes:
#   setup        install what the image lacks from .whl/ (benchmarks/gather_wheels.py: fla-core),
#                then this checkout, offline (pip install -e .)
#   precompile   every kernel instance of the cupy backend into CuPy's kernel cache, one worker
#                per core (a fresh host has no cache: CUPY_CACHE_DIR, default
#                /tmp/cosattn-cupy-cache, shared by every later step)
#   then at once, each under its own limit (correctness, not timings):
#     pytest_cupy    tests/test_cupy.py, -m gpu (pytest-xdist when the image has it)
#     pytest_numba   tests/numba_sim, -m gpu
#     memcheck, racecheck, synccheck, initcheck
#                    compute-sanitizer over python -m benchmarks.gpu_smoke --no-pool
#     examples       examples/train_tiny_lm.py --device cuda (a few steps), then generate.py
#     fla_warmup     fla's Triton kernels compiled and autotuned (results cached on disk) by a
#                    small run of the benchmark's fla case; the benchmark leaves fla out when
#                    this step failed, so that autotuning cannot eat its time
#   then one at a time, alone on the GPU (timings):
#     gpu_bench      python -m benchmarks.gpu_bench (cosattn, fla, SDPA, the paper's form)
#     gpu_variants   python -m benchmarks.gpu_variants (every kernel variant: times and errors)
#     ncu            ncu --clock-control none over python -m benchmarks.gpu_profile
# Quick mode (--quick), under 3 minutes, for a rerun after a fix: setup, precompile, then
# pytest_cupy (HYPOTHESIS_PROFILE=dev), memcheck and racecheck at once, then gpu_bench --quick
# (the cupy backend and SDPA only) and gpu_variants --quick. --only runs the named steps of the mode (setup always runs).
# A failing step does not stop the next; the exit status is 1 when any step failed.
#
# Output: OUTDIR, else $OUT, else benchmarks/results/gpu_check; at most 8 flat files:
#   summary.txt          each step's exit status (124: out of time) and seconds, the command,
#                        the device, driver and library versions, a digest of the sources
#   logs.tar.gz          every step's log, the JUnit XML of the tests, the ncu report
#   gpu_bench[_quick].json/.md, gpu_variants[_quick].json/.md, ncu.txt
# --dry-run runs no GPU command: each step only prints its command (GPU_CHECK_FAIL="a b" makes
# those steps fail), so the plan, the summary and the packing can be checked anywhere.
#
# Environment: PYTHON (default python3), CUPY_CACHE_DIR.
set -u

command_line="bash benchmarks/gpu_check.sh${*:+ $*}"
mode=full
only=""
dry=0
out=""
while (($#)); do
    case "$1" in
    --quick) mode=quick ;;
    --dry-run) dry=1 ;;
    --only)
        only="${2:-}"
        shift
        ;;
    --only=*) only="${1#--only=}" ;;
    -h | --help)
        sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    -*)
        echo "gpu_check.sh: unknown option $1 (see --help)" >&2
        exit 2
        ;;
    *) out="$1" ;;
    esac
    shift
done

here="$(cd "$(dirname "$0")/.." && pwd)"
out="${out:-${OUT:-$here/benchmarks/results/gpu_check}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$here" || exit 2
py="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
logs="$work/logs"
mkdir -p "$logs" "$work/status"
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/cosattn-cupy-cache}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false # JAX would take 75% of the GPU's memory
suffix=""
[[ $mode == quick ]] && suffix="_quick"
started=$SECONDS

# The steps of each mode: "name limit_seconds group". A group of several steps runs at once; a
# group's steps must finish before the next group starts. The limits add up to 430 s (full) and
# 135 s (quick) over the groups, plus 5 s per group to kill a step that overruns.
if [[ $mode == full ]]; then
    plan=(
        "setup 30 a"
        "precompile 60 b"
        "pytest_cupy 130 c" "pytest_numba 130 c" "memcheck 130 c" "racecheck 130 c"
        "synccheck 130 c" "initcheck 130 c" "examples 130 c" "fla_warmup 130 c"
        "gpu_bench 120 d"
        "gpu_variants 45 e"
        "ncu 45 f"
    )
else
    plan=(
        "setup 15 a"
        "precompile 35 b"
        "pytest_cupy 45 c" "memcheck 45 c" "racecheck 45 c"
        "gpu_bench 25 d"
        "gpu_variants 15 e"
    )
fi

have() { "$py" -c "import $1" >/dev/null 2>&1; }

# The command of step $1 ($2: pytest workers), as words in the caller's cmd.
step_command() {
    local junit="--junitxml=$logs/$1.xml" xdist=() timeout=()
    if have xdist; then xdist=(-n "$2" --dist load); fi
    if have pytest_timeout; then timeout=(--timeout 120); fi
    case "$1" in
    setup) cmd=(bash -c setup) ;;
    precompile) cmd=("$py" -m benchmarks.precompile) ;;
    pytest_cupy)
        cmd=(env "HYPOTHESIS_PROFILE=$([[ $mode == quick ]] && echo dev || echo ci)"
            "$py" -m pytest -m gpu -p no:cacheprovider -v -rfEs "$junit" "${xdist[@]}"
            "${timeout[@]}" tests/test_cupy.py)
        ;;
    pytest_numba)
        cmd=("$py" -m pytest -m gpu -p no:cacheprovider -v -rfEs "$junit" "${xdist[@]}"
            "${timeout[@]}" tests/numba_sim)
        ;;
    memcheck | racecheck | synccheck | initcheck)
        cmd=(compute-sanitizer --tool "$1" --error-exitcode 9 --print-limit 200
            "$py" -m benchmarks.gpu_smoke --no-pool)
        ;;
    examples)
        cmd=(bash -c "'$py' examples/train_tiny_lm.py --device cuda --steps 30 --eval-every 10 \
--eval-batches 2 --out '$work/tiny_lm.npz' && '$py' examples/generate.py --device cuda \
--weights '$work/tiny_lm.npz' --tokens 200")
        ;;
    fla_warmup)
        cmd=("$py" -m benchmarks.gpu_bench --shapes 2x16x4096x128 --backends --baselines fla
            --no-step --repeats 1 --min-repeats 1 --warmup 1 --out "$work/fla_warmup")
        ;;
    gpu_bench)
        if [[ $mode == quick ]]; then
            cmd=("$py" -m benchmarks.gpu_bench --quick --backends cupy --baselines sdpa
                --min-repeats 2 --max-seconds 2 --out "$out")
        else
            local fla=()
            if grep -qs ": exit 0 " "$work/status/fla_warmup"; then fla=(fla); fi
            cmd=("$py" -m benchmarks.gpu_bench --baselines appendix sdpa "${fla[@]}"
                --min-repeats 2 --max-seconds 4 --out "$out")
        fi
        ;;
    gpu_variants)
        cmd=("$py" -m benchmarks.gpu_variants --out "$out")
        if [[ $mode == quick ]]; then cmd+=(--quick); fi
        ;;
    ncu)
        cmd=(bash -c "ncu --clock-control none --kernel-name-base demangled \
-k regex:cosattn:: --launch-count 12 --section SpeedOfLight --section MemoryWorkloadAnalysis \
--section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats \
--force-overwrite -o '$logs/ncu' '$py' -m benchmarks.gpu_profile && \
ncu --import '$logs/ncu.ncu-rep' --page details > '$out/ncu.txt' && \
ncu --import '$logs/ncu.ncu-rep' --page raw --csv > '$logs/ncu_raw.csv'")
        ;;
    *)
        echo "no such step: $1" >&2
        return 1
        ;;
    esac
}

# The setup step (run by bash -c under its own limit, hence exported).
# shellcheck disable=SC2329 # invoked indirectly, as "bash -c setup"
setup() {
    local wheels=() w dist
    shopt -s nullglob
    for w in .whl/*.whl; do
        dist="${w##*/}"
        dist="${dist%%-*}"
        case "$dist" in cosattn | setuptools) continue ;; esac
        if ! "$py" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" \
            2>/dev/null; then
            wheels+=("$w")
        fi
    done
    if ((${#wheels[@]})); then
        echo "installing ${wheels[*]}"
        "$py" -m pip install -q --no-index --no-deps --no-cache-dir "${wheels[@]}" || return 1
    fi
    if "$py" -c 'import cosattn.reference, cosattn, sys; sys.exit(not cosattn.__file__.startswith(sys.argv[1]))' "$here" 2>/dev/null; then
        echo "cosattn is already installed from $here"
    elif [[ -n "$(echo .whl/setuptools-*.whl)" ]]; then
        "$py" -m pip install -q --no-index --find-links .whl --no-deps --no-cache-dir -e . ||
            return 1
    else
        "$py" -m pip install -q --no-index --no-build-isolation --no-deps --no-cache-dir -e . ||
            return 1
    fi
    "$py" -c 'import cosattn, cosattn.reference; print("cosattn from", cosattn.__file__);
print("backends", cosattn.available_backends())'
}

export -f setup
export py here

# run NAME LIMIT GROUP WORKERS: one step, its output in $logs/NAME.log, its status in
# $work/status.
run() {
    local name="$1" limit="$2" group="$3" workers="$4" start=$SECONDS rc cmd=()
    step_command "$name" "$workers" || return # sets cmd
    printf '%q ' "${cmd[@]}" >"$logs/$name.log"
    echo >>"$logs/$name.log"
    if ((dry)); then
        rc=0
        [[ " ${GPU_CHECK_FAIL:-} " == *" $name "* ]] && rc=1
    else
        timeout --kill-after=5 "$limit" "${cmd[@]}" >>"$logs/$name.log" 2>&1
        rc=$?
    fi
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s, group $group)" \
        >"$work/status/$name"
    echo "== $(cat "$work/status/$name")"
    tail -n 4 "$logs/$name.log" | sed 's/^/   /'
}

selected() {
    [[ $1 == setup || -z $only || ",$only," == *",$1,"* ]]
}

# The steps of one group at once; cores shared among its pytest runs.
run_group() {
    local group="$1" entry name limit g pids=() n=0
    for entry in "${plan[@]}"; do
        read -r name limit g <<<"$entry"
        [[ $g == "$group" ]] && selected "$name" && n=$((n + 1))
    done
    local cores workers
    cores="$(nproc 2>/dev/null || echo 2)"
    workers=$((cores / (n > 1 ? 2 : 1)))
    ((workers < 1)) && workers=1
    for entry in "${plan[@]}"; do
        read -r name limit g <<<"$entry"
        if [[ $g == "$group" ]] && selected "$name"; then
            run "$name" "$limit" "$group" "$workers" &
            pids+=($!)
        fi
    done
    ((${#pids[@]})) && wait "${pids[@]}"
}

{
    echo "gpu_check.sh ($mode$( ((dry)) && echo ', dry run')) started $(date -u +%FT%TZ)"
    echo "command: $command_line"
    echo "checkout: $here"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
    echo "source digest: $(find cosattn cuda reference tests benchmarks examples -type f \
        \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.sh' \) \
        -not -path '*/results/*' -not -path '*/__pycache__/*' -print0 2>/dev/null |
        LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
    echo "CUPY_CACHE_DIR: $CUPY_CACHE_DIR"
    echo "cores: $(nproc 2>/dev/null)"
    if ((dry)); then
        echo "dry run: no GPU command was run"
    else
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,\
clocks.mem,power.limit --format=csv 2>&1 || echo "nvidia-smi not available"
        "$py" - <<'EOF' 2>&1
import importlib.metadata as m, sys
print("python", sys.version.split()[0], sys.executable)
for dist in ("numpy", "ml_dtypes", "cupy-cuda13x", "cupy-cuda12x", "numba", "numba-cuda",
             "torch", "jax", "jaxlib", "triton", "fla-core", "hypothesis", "pytest",
             "pytest-xdist", "onnxruntime"):
    try:
        print(dist, m.version(dist))
    except m.PackageNotFoundError:
        pass
try:
    import cupy
    rt = cupy.cuda.runtime
    print("CUDA runtime", rt.runtimeGetVersion(), "driver API", rt.driverGetVersion(),
          "NVRTC", cupy.cuda.nvrtc.getVersion())
except Exception as exc:
    print("cupy:", type(exc).__name__, exc)
EOF
        for tool in nvcc compute-sanitizer ncu; do
            echo "$tool: $("$tool" --version 2>&1 | tail -n 1 || echo 'not found')"
        done
    fi
} >"$work/header.txt"
cat "$work/header.txt"

for group in a b c d e f; do
    run_group "$group"
done

status=0
{
    cat "$work/header.txt"
    echo
    for entry in "${plan[@]}"; do
        read -r name _ _ <<<"$entry"
        if [[ -f "$work/status/$name" ]]; then
            cat "$work/status/$name"
            grep -q ": exit 0 " "$work/status/$name" || status=1
        elif selected "$name"; then
            echo "$name: did not run"
            status=1
        else
            echo "$name: not selected (--only $only)"
        fi
    done
    echo
    echo "finished $(date -u +%FT%TZ) after $((SECONDS - started)) s, overall exit $status"
} >"$out/summary.txt"

# Pack the logs into one archive of at most 15 MiB (the host lets files of 16 MiB out):
# without the ncu report if needed, then with each log cut to its last 1 MiB.
cp "$out/summary.txt" "$logs/"
limit=$((15 * 1024 * 1024))
tar -czf "$out/logs.tar.gz" -C "$work" logs
if (($(stat -c %s "$out/logs.tar.gz") > limit)); then
    rm -f "$logs"/*.ncu-rep
    for f in "$logs"/*; do
        tail -c 1048576 "$f" >"$f.tail" && mv "$f.tail" "$f"
    done
    tar -czf "$out/logs.tar.gz" -C "$work" logs
fi
rm -rf "$work"

written=(summary.txt logs.tar.gz "gpu_bench$suffix.json" "gpu_bench$suffix.md"
    "gpu_variants$suffix.json" "gpu_variants$suffix.md" ncu.txt)
echo "wrote into $out:"
for f in "${written[@]}"; do
    [[ -f "$out/$f" ]] && echo "  $f ($(stat -c %s "$out/$f") bytes)"
done
tail -n "$((${#plan[@]} + 2))" "$out/summary.txt"
exit $status
