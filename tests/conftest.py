"""Test set-up: without a GPU, Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, hence here, at conftest import.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# What a launch on a GPU compiles with (triton 3.9 warns when it is left unset).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

from lowrank_kernels import backend as _backend  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def kernel_backends():
    """Backends whose kernels can run here: triton always (interpreted on CPU), cuda on a GPU."""
    out = ["triton"]
    out.append(pytest.param("cuda", marks=pytest.mark.skipif(
        not (HAS_CUDA and _backend.cuda_extension() is not None), reason="needs a GPU and the CUDA extension")))
    return out


def kernel_dtypes():
    """fp32 and fp16 everywhere; bf16 only on a GPU (the interpreter's bf16 dot is wrong)."""
    out = [torch.float32, torch.float16]
    out.append(pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not HAS_CUDA, reason="bf16 needs a GPU")))
    return out


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def assert_close(out, ref, dtype, name="output"):
    """Relative error against a float64 reference within the package tolerance for ``dtype``."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or poisoned output?)"
    tol = TOL[dtype]
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        tol = 5e-4
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e} ({dtype})"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
