#!/usr/bin/env bash
# CI's CUDA compile check: builds lowrank_kernels._C from csrc/ with nvcc against a CUDA build of
# torch, without needing a GPU, then imports the result to catch unresolved symbols. Any compile
# or link error exits non-zero. Without nvcc on PATH it says so and succeeds.
#
# Torch: the current Python's when it is already a CUDA build (a GPU machine, maybe without
# network); otherwise a git-ignored .venv-cuda with torch 2.14.1 (CUDA 13.0) + ninja.
# The extension is built into build/cuda-check/, never into lowrank_kernels/, so the CPU test
# environment does not try to import it. Set CUDA_CHECK_CLEAN=1 to rebuild from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
    echo "cuda-check: nvcc not on PATH, CUDA compile check skipped"
    exit 0
fi

SYS_PY=${PYTHON:-python3}
if "$SYS_PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' >/dev/null 2>&1; then
    PY=$SYS_PY
else
    PY=.venv-cuda/bin/python
    if [ ! -f .venv-cuda/.deps-ok ]; then
        [ -x "$PY" ] || "$SYS_PY" -m venv .venv-cuda
        # numpy: torch warns at import without it.
        "$PY" -m pip install -qq --disable-pip-version-check torch==2.14.1 numpy ninja setuptools wheel
        touch .venv-cuda/.deps-ok
    fi
fi

# `nvcc` may be a wrapper script, from which torch guesses the toolkit root wrongly; nvcc itself
# names its real bin/ folder in the _HERE_ line of a dry run.
NVCC_BIN=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n1)
if [ -z "$NVCC_BIN" ]; then
    echo "cuda-check: cannot locate the CUDA toolkit from 'nvcc --dryrun'" >&2
    exit 1
fi
export CUDA_HOME=${CUDA_HOME:-$(cd "$NVCC_BIN/.." && pwd)}
# The CUDA 13 torch wheels ship the cuBLAS/cuSPARSE headers the toolkit on PATH may lack.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d "$SITE/nvidia/cu13/include" ]; then
    export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export MAX_JOBS=${MAX_JOBS:-2}
export LOWRANK_KERNELS_FORCE_CUDA=1

OUT=build/cuda-check
if [ "${CUDA_CHECK_CLEAN:-0}" != "0" ]; then
    rm -rf "$OUT"
fi
echo "cuda-check: building csrc/ with $(nvcc --version | tail -n1) for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
start=$(date +%s)
"$PY" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/temp"
echo "cuda-check: compiled in $(( $(date +%s) - start )) s"

SO=$(ls "$OUT"/lib/lowrank_kernels/_C*.so)
# Loading the module resolves every symbol (a declared but undefined host function fails here);
# it needs no GPU. Listing the bound functions checks the bindings registered.
"$PY" - "$SO" <<'EOF'
import importlib.util, sys
import torch  # noqa: F401  (loads libtorch, which the extension links against)
spec = importlib.util.spec_from_file_location("lowrank_kernels._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
names = sorted(n for n in dir(mod) if not n.startswith("_"))
print("cuda-check: OK,", sys.argv[1], "exposes", ", ".join(names))
EOF
