#!/usr/bin/env bash
# The one command for a lent GPU machine: build the CUDA extension, run the tests and the
# benchmarks, leave logs and CSVs under OUTDIR, print a short summary last.
#
#   bash benchmarks/gpu_suite.sh OUTDIR [--full]
#
# Made for one device call of at most 9 minutes on a bare machine (torch + triton + nvcc + peft,
# no network), inside a session's 15 device-minutes with the machine's start. Built for sm_90a
# only. Stages run most important first, each under its own time limit and all within
# SUITE_BUDGET_S (default 500 s); a stage that fails or times out is recorded and the next one
# runs. Benchmarks write their rows as they go, so a stage cut short keeps what it measured.
#   info        nvidia-smi, versions                                      -> OUTDIR/info.log
#   wheels      .whl/*.whl (galore-torch, fira, bitsandbytes) into /tmp/site, on PYTHONPATH
#   build       the CUDA extension (pip install -e, sm_90a)                -> OUTDIR/build.log
#   test        every op's tests: Triton and CUDA against the reference, bf16 included, with
#               LOWRANK_KERNELS_AUTOTUNE=0 (one tile per kernel variant: compiles stay bounded)
#   bench-quick each op's target shape (--quick) against the base and the peers
#   pretrain    the end-to-end run, where benchmarks/pretrain.py exists and time is left
#   bench-grid  the LoRA grid; with --full every benchmark's whole grid
#   plot        OUTDIR/results/<gpu>/<op>.png
# The commit column comes from git, or from LOWRANK_KERNELS_COMMIT where the tree has no .git.
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR [--full]}
FULL=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT/results"
OUT=$(cd "$OUT" && pwd)
RES=$OUT/results
PY=${PYTHON:-python3}
BUDGET=${SUITE_BUDGET_S:-500}
RESERVE=40  # seconds kept for the plot and the summary at the end
START=$SECONDS
STAGES=()

# stage NAME LIMIT_S [--final] CMD...: runs CMD, output to OUTDIR/NAME.log, within the budget.
stage() {
    local name=$1 limit=$2 reserve=$RESERVE
    shift 2
    if [ "$1" = "--final" ]; then reserve=0; shift; fi
    local left=$((BUDGET - (SECONDS - START) - reserve))
    if ((left < 15)); then
        STAGES+=("$(printf '%-11s %6s  %s' "$name" - "skipped: time budget spent")")
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS rc status
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    if ((rc != 0)); then
        tail -n 15 "$OUT/$name.log" | sed "s/^/   [$name] /"
    fi
    STAGES+=("$(printf '%-11s %5ds  %s' "$name" $((SECONDS - t0)) "$status")")
}

stage info 60 bash -c "nvidia-smi; nvcc --version; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())'; $PY -c 'import peft; print(\"peft\", peft.__version__)'"
grep -E "^torch|^peft" "$OUT/info.log"

if compgen -G ".whl/*.whl" >/dev/null; then
    stage wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# torch locates the toolkit from nvcc's path; where nvcc is a wrapper script that guess is wrong,
# so ask nvcc itself where its bin/ folder is.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    nvcc_bin=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
    [ -n "$nvcc_bin" ] && export CUDA_HOME=${nvcc_bin%/bin}
fi
stage build 300 env LOWRANK_KERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 PIP_BREAK_SYSTEM_PACKAGES=1 \
    "$PY" -m pip install -v -e . --no-build-isolation --no-deps
"$PY" -c "from lowrank_kernels.backend import cuda_extension as c; print('CUDA extension:', 'built' if c() else 'NOT built')"

stage test 200 env LOWRANK_KERNELS_AUTOTUNE=0 "$PY" -m pytest tests -q -ra --junitxml="$OUT/test.xml"
stage bench-quick 150 "$PY" benchmarks/run_all.py --quick --out "$RES" --timeout 60
if [ -f benchmarks/pretrain.py ]; then
    stage pretrain 120 "$PY" benchmarks/pretrain.py --size 60m --steps 100 --device cuda --dtype bf16 --out "$RES/pretrain"
fi
if [ "$FULL" = "--full" ]; then
    stage bench-grid 3600 "$PY" benchmarks/run_all.py --full --out "$RES" --timeout 300
else
    stage bench-grid 3600 "$PY" benchmarks/bench_lora.py --out "$RES"
fi
stage plot 30 --final "$PY" benchmarks/plot.py "$RES"

echo
"$PY" benchmarks/plot.py "$RES" --table --no-plot 2>&1 | tail -n 60
echo
grep -A 12 "^Targets at" "$OUT/bench-quick.log" 2>/dev/null
for log in "$OUT"/test-*.log; do
    [ -f "$log" ] && echo "$(basename "$log" .log): $(tail -n 1 "$log")"
done
echo
echo "gpu_suite: $((SECONDS - START)) s; logs and CSVs under $OUT"
printf '%s\n' "${STAGES[@]}"
