"""Test set-up: without a GPU, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, hence here, at conftest import. What
the test modules share besides fixtures (devices, backends, float64 comparisons, input builders) is
in _helpers.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# What a launch on a GPU compiles with (triton 3.9 warns when it is left unset).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import tempfile  # noqa: E402
from datetime import timedelta  # noqa: E402

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def eager_compile():
    """torch.compile off: bitsandbytes compiles its CPU fallback dequantisation (odd shapes), a minute per call here."""
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.fixture
def one_rank_group():
    """A one-process gloo group in this process (FSDP2's mechanics: DTensors on a mesh of one)."""
    with tempfile.TemporaryDirectory() as root:
        dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=0, world_size=1,
                                timeout=timedelta(minutes=30))
        try:
            yield
        finally:
            dist.destroy_process_group()
