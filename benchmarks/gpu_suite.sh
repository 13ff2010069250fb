#!/usr/bin/env bash
# The one command for a lent GPU machine (one call of at most 9 minutes, bare: torch, triton, nvcc,
# peft, pytest-xdist; no network). The headline numbers come back first; everything lands in one
# archive under OUTDIR beside a summary (two files: a call returns at most 8).
#
#   bash benchmarks/gpu_suite.sh OUTDIR [--commit HASH]        on the GPU machine
#   bash benchmarks/gpu_suite.sh --rehearse OUTDIR             every stage on this CPU, tiny shapes
#
# Stages, in this order, each under its own time limit (SIGINT first, so pytest and the benchmarks
# still write what they have); a stage that fails or times out is recorded and the next one runs:
#   info       nvidia-smi (GPU, driver, clocks: queried, never set), versions; .whl/*.whl (fill it
#              here with benchmarks/fill_wheels.sh) installed into a folder on PYTHONPATH; the CUDA
#              extension's build started in the background (sm_90a, into the work folder)
#   warmup     run_all.py --headline --warmup: the Triton kernels of the four headline rows
#              compiled on every core into TRITON_CACHE_DIR, which every later stage reuses
#   headline   run_all.py --headline: LoRA fwd+bwd (M=8192, K=N=4096, r=16) vs the base GEMM and
#              PEFT; RandLoRA fwd+bwd (d=4096, r=32) vs PEFT; SLTrain block support (d=4096, r=1024,
#              δ=0.03) vs the dense construction; Fira step (4096x11008, r=256) vs fira and AdamW;
#              bf16, CSVs and plots checked by run_all (the cuda rows where the build was done)
#   test       the test suite with pytest -n <cores> (bf16 and the CUDA backend included), after the
#              build is waited for and its extension put in place
#   racecheck  compute-sanitizer --tool racecheck on one split reduction per op family
#              (benchmarks/racecheck.py)
#   rest       the other benchmarks and the 60M pretraining run (run_all.py), as time allows
# Results go to <work>/results/<gpu>/ (pretraining under <gpu>/pretrain/); then
# OUTDIR/gpu_suite-<commit>.tar.gz (every log, CSV, plot, the junit XML; no checkpoint) and OUTDIR/summary.txt
# (stage, seconds, status; the headline table; the archive's files).
#
# The commit column: git where the tree has one, else --commit HASH (or LOWRANK_KERNELS_COMMIT).
# --rehearse (CI, `make gpu-rehearse`): the same stages on the CPU with tiny shapes (--smoke): the
# warm-up compiles for sm_90a without a GPU, the benchmarks time the reference path in fp32, the
# tests are one short file, racecheck.py runs without the sanitizer under the Triton interpreter,
# the build is left to `make cuda-check`. It fails unless every stage ran ok within its limit, the
# CSVs passed run_all's format checks, and the archive holds the files the summary names.
set -uo pipefail

REHEARSE=0
OUT=
COMMIT=${LOWRANK_KERNELS_COMMIT:-}
while (($#)); do
    case $1 in
        --rehearse) REHEARSE=1 ;;
        --commit) COMMIT=${2:?--commit needs a hash}; shift ;;
        -h | --help) sed -n '2,34p' "$0"; exit 0 ;;
        *) [ -z "$OUT" ] || { echo "gpu_suite: one OUTDIR only" >&2; exit 2; }; OUT=$1 ;;
    esac
    shift
done
[ -n "$OUT" ] || { echo "usage: bash benchmarks/gpu_suite.sh [--rehearse] OUTDIR [--commit HASH]" >&2; exit 2; }
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -n "$COMMIT" ] || COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
export LOWRANK_KERNELS_COMMIT=$COMMIT
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
LOGS=$WORK/gpu_suite-$COMMIT
RES=$LOGS/results
mkdir -p "$RES"
export TRITON_CACHE_DIR=$WORK/triton-cache   # one cache: the warm-up fills it, every stage reads it
export TRITON_DEFAULT_FP_FUSION=1            # as tests/conftest.py and benchmarks/_common.py set it
export PYTHONUNBUFFERED=1
CORES=$(nproc)
if ((REHEARSE)); then
    PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
    SIZE=--smoke
    # Limits: what a 2-core CI machine needs, with room; the GPU's are in the other branch.
    L_INFO=30 L_WARMUP=100 L_HEADLINE=100 L_TEST=90 L_RACE=60 L_REST=120 PER_SCRIPT=60
else
    PY=${PYTHON:-python3}
    SIZE=
    # GPU limits sum to 480 s with the archive's reserve, inside one 540 s call.
    L_INFO=20 L_WARMUP=100 L_HEADLINE=150 L_TEST=120 L_RACE=40 L_REST=400 PER_SCRIPT=45
fi
BUDGET=${SUITE_BUDGET_S:-480}
RESERVE=15  # seconds kept for the archive and the summary
START=$SECONDS
STAGES=()
FAILED=0

# stage NAME LIMIT CMD...: CMD under LIMIT (cut to what the budget leaves), output to NAME.log.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START) - RESERVE))
    if ((left < 10)); then
        STAGES+=("$(printf '%-10s %6s  %s' "$name" - "skipped: time budget spent")")
        FAILED=1
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS rc status
    timeout -s INT --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    ((rc == 0)) || { FAILED=1; tail -n 15 "$LOGS/$name.log" | sed "s/^/   [$name] /"; }
    STAGES+=("$(printf '%-10s %5ds  %s' "$name" $((SECONDS - t0)) "$status")")
}

# --- 1. info, wheels, the CUDA build in the background -------------------------------------------
info() {
    echo "commit $COMMIT; $CORES cores; rehearsal $REHEARSE"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --format=csv --query-gpu=name,driver_version,compute_cap,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,temperature.gpu,persistence_mode
    else
        echo "nvidia-smi: not on PATH"
    fi
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    "$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
    "$PY" -c 'import importlib
for m in ("peft", "transformers", "xdist", "fira", "galore_torch", "bitsandbytes"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "present"))
    except Exception as e:
        print(m, "does not import:", type(e).__name__, e)'
}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl >"$LOGS/wheels.log" 2>&1 \
        && export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .whl/ (bash benchmarks/fill_wheels.sh fills it): peers not installed here are skipped" >"$LOGS/wheels.log"
fi
export PY COMMIT CORES REHEARSE WORK
export -f info
stage info "$L_INFO" bash -c info

BUILD_PID=
build_cuda() {  # as .ci/build_cuda.sh: the toolkit from nvcc, the wheel's cuBLAS/cuSPARSE headers
    local nvcc_bin site
    nvcc_bin=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
    export CUDA_HOME=${CUDA_HOME:-${nvcc_bin%/bin}}
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    [ -d "$site/nvidia/cu13/include" ] && export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
    LOWRANK_KERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=$((CORES / 2)) \
        "$PY" setup.py -q build_ext --build-lib "$WORK/cuda/lib" --build-temp "$WORK/cuda/temp"
}
install_cuda() {  # the built extension into the package (atomically), once the build is done
    local so
    so=$(ls "$WORK"/cuda/lib/lowrank_kernels/_C*.so 2>/dev/null | head -n 1)
    [ -n "$so" ] || return 0
    cp "$so" "lowrank_kernels/.$(basename "$so").tmp" && mv "lowrank_kernels/.$(basename "$so").tmp" "lowrank_kernels/$(basename "$so")"
}
if ((REHEARSE)); then
    echo "rehearsal: the CUDA build is make cuda-check's" >"$LOGS/build.log"
elif command -v nvcc >/dev/null; then
    export -f build_cuda
    timeout 400 bash -c build_cuda >"$LOGS/build.log" 2>&1 &
    BUILD_PID=$!
else
    echo "nvcc not on PATH: no CUDA build" >"$LOGS/build.log"
fi
build_done() { [ -z "$BUILD_PID" ] || ! kill -0 "$BUILD_PID" 2>/dev/null; }

# --- 2. warm-up, 3. the headline rows ---------------------------------------------------------------
stage warmup "$L_WARMUP" "$PY" benchmarks/run_all.py --headline --warmup $SIZE --timeout $((L_WARMUP - 10))
build_done && install_cuda
stage headline "$L_HEADLINE" "$PY" benchmarks/run_all.py --headline $SIZE --out "$RES" --timeout "$PER_SCRIPT"

# --- 4. correctness: tests, racecheck ---------------------------------------------------------------
if [ -n "$BUILD_PID" ]; then
    left=$((BUDGET - (SECONDS - START) - RESERVE - L_TEST - L_RACE))
    while ! build_done && ((left > 0)); do sleep 2; left=$((left - 2)); done
    build_done || kill "$BUILD_PID" 2>/dev/null
    wait "$BUILD_PID" && install_cuda
    STAGES+=("$(printf '%-10s %6s  %s' build - "$(build_done && ls lowrank_kernels/_C*.so >/dev/null 2>&1 && echo "ok (in the background)" || echo "FAILED or unfinished: build.log")")")
fi
XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n $CORES")
if ((REHEARSE)); then
    stage test "$L_TEST" "$PY" -m pytest $XDIST tests/test_pretrain.py -q -ra -k "memory or peers" --junitxml="$LOGS/test.xml"
else
    stage test "$L_TEST" env LOWRANK_KERNELS_AUTOTUNE=0 "$PY" -m pytest $XDIST tests -q -ra --junitxml="$LOGS/test.xml"
fi
racecheck() {
    local sanitizer=() rc=0 family
    command -v compute-sanitizer >/dev/null && ((!REHEARSE)) && sanitizer=(compute-sanitizer --tool racecheck --error-exitcode 1)
    for family in lora randlora sltrain fira; do
        LOWRANK_KERNELS_AUTOTUNE=0 "${sanitizer[@]}" "$PY" benchmarks/racecheck.py "$family" || rc=1
    done
    return $rc
}
export -f racecheck
stage racecheck "$L_RACE" bash -c racecheck

# --- 5. the rest, as time allows ----------------------------------------------------------------------
if ((REHEARSE)); then
    stage rest "$L_REST" "$PY" benchmarks/run_all.py --smoke --out "$RES" --timeout "$PER_SCRIPT" \
        --skip lora --skip random_basis --skip sparse_lowrank --skip projected_step
else
    stage rest "$L_REST" "$PY" benchmarks/run_all.py --quick --out "$RES" --timeout 120 \
        --skip lora --skip random_basis --skip sparse_lowrank --skip projected_step \
        --pretrain-args "--size 60m --steps 100 --warmup"
fi

# --- the archive and the summary ----------------------------------------------------------------------
ARCHIVE=$OUT/gpu_suite-$COMMIT.tar.gz
SUMMARY=$OUT/summary.txt
{
    echo "gpu_suite $( ((REHEARSE)) && echo "rehearsal " )commit $COMMIT: $((SECONDS - START)) s of a ${BUDGET} s budget"
    printf '%s\n' "${STAGES[@]}"
    echo
    grep -hE "^== |^(fwd|bwd|step)" "$LOGS/headline.log" 2>/dev/null | grep -v "^== .*: " | head -n 40
    grep -hE "^Targets|met$|MISSED$" "$LOGS/headline.log" 2>/dev/null
    grep -hE "warmup \(sm_" "$LOGS/warmup.log" 2>/dev/null
    tail -n 1 "$LOGS/test.log" 2>/dev/null | sed 's/^/test: /'
    echo "racecheck: $(grep -c "rel err .* ok$" "$LOGS/racecheck.log" 2>/dev/null) checks within tolerance"
    grep -hE "SUMMARY|rel err .* > " "$LOGS/racecheck.log" 2>/dev/null | head -n 8
    echo
    echo "archive $(basename "$ARCHIVE"):"
    (cd "$WORK" && find "$(basename "$LOGS")" -type f ! -name "*.pt" | sort)
} >"$SUMMARY"
cp "$SUMMARY" "$LOGS/summary.txt"
tar -czf "$ARCHIVE" --exclude="*.pt" -C "$WORK" "$(basename "$LOGS")"  # no checkpoints
cat "$SUMMARY"

# The archive holds every file the summary names.
missing=$(comm -23 <(sed -n '/^archive /,$p' "$SUMMARY" | tail -n +2 | sort) <(tar -tzf "$ARCHIVE" | grep -v '/$' | sort))
if [ -n "$missing" ]; then
    echo "gpu_suite: the archive lacks: $missing"
    FAILED=1
fi
rm -rf "$WORK"
echo "gpu_suite: $((SECONDS - START)) s; $ARCHIVE and $SUMMARY"
((REHEARSE)) && exit $FAILED
exit 0
