"""``python -m lowrank_kernels.pretrain``: the pretraining run (see the package docstring)."""

import sys

from lowrank_kernels.pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
