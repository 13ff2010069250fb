#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the pure-Python peers a GPU machine lacks, for gpu_suite.sh to
# install without network: fira and galore-torch (galore-torch imports bitsandbytes, which the GPU
# machine lacks too: its benchmark row is then skipped, with a note). A wheel is downloaded for
# Python 3.12 where the registry has one, else built here from the source distribution.
#
#   bash benchmarks/fill_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
for pkg in fira galore-torch; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl "$pkg" \
        || "$PY" -m pip wheel -q --no-deps -w .whl "$pkg"
done
ls -l .whl
