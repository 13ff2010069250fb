#!/usr/bin/env bash
# Prints the Python interpreter to use, after making sure it has torch, the package and the extras.
# - A Python that already has torch (a GPU machine, maybe with no network) is used as it is: the
#   package is installed into it in editable mode, nothing is downloaded.
# - Otherwise a local .venv gets torch 2.13.0 (CPU build) and the test and benchmark extras.
# Everything but the interpreter's path goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
SYS_PY=${PYTHON:-python3}
# peft is pinned: tests/peft_suite/subset.txt lists test ids of that version's own suite; ruff is
# pinned so that `make lint` applies the same rules everywhere.
DEPS="triton ninja pytest pytest-benchmark numpy peft==0.22.0 attrs transformers accelerate trl galore-torch fira bitsandbytes matplotlib tqdm setuptools wheel ruff==0.17.6"

if "$SYS_PY" -c 'import torch' >/dev/null 2>&1 && [ ! -x .venv/bin/python ]; then
    PY=$SYS_PY
else
    PY=$PWD/.venv/bin/python
    if [ ! -f .venv/.deps-ok ]; then
        [ -x "$PY" ] || "$SYS_PY" -m venv .venv >&2
        # -qq: errors only; this machine's pip.conf names index folders that lack some packages,
        # and pip warns about each one it skips.
        "$PY" -m pip install -qq --disable-pip-version-check torch==2.13.0 >&2
        "$PY" -m pip install -qq --disable-pip-version-check $DEPS >&2
        touch .venv/.deps-ok
    fi
fi
# Checked from / so that the current directory on sys.path cannot pass for an installed package.
if ! (cd / && "$PY" -c 'import lowrank_kernels, sys; sys.exit(0 if lowrank_kernels.__file__.startswith(sys.argv[1]) else 1)' "$OLDPWD") >/dev/null 2>&1; then
    "$PY" -m pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e . >&2
fi
echo "$PY"
