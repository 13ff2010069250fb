"""The end-to-end pretraining run, from the benchmarks folder: the same code as
``python -m lowrank_kernels.pretrain`` (see lowrank_kernels/pretrain/ for the options)."""

import sys
from pathlib import Path

# This checkout's package, whether or not (and wherever) it is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowrank_kernels.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
