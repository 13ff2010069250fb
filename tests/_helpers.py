"""What the test modules share: where kernels run, comparisons against float64 references, the
random inputs of the LoRA-family layers, and an allocation tracker.

Test modules import it as ``from _helpers import ...`` (pytest puts tests/, the folder of the rootdir
conftest, on sys.path); conftest.py, imported before any of them, sets TRITON_INTERPRET.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_kernels import backend as _backend

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

needs_triton = pytest.mark.skipif(not _backend.triton_available(), reason="needs triton")


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


# ----------------------------------------------------------------------------------------------
# Comparisons against float64 references
# ----------------------------------------------------------------------------------------------
def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _check_written(out, ref, name):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or poisoned output?)"


def assert_close(out, ref, dtype, name="output"):
    """Relative error against a float64 reference within the package tolerance for ``dtype``."""
    _check_written(out, ref, name)
    tol = TOL[dtype]
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        tol = 5e-4
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e} ({dtype})"


def run_unfused(fn, args, dy, wrt):
    """``fn(*args)`` (PyTorch's own composition of an op, in the inputs' dtypes) and the gradients of
    ``(y * dy).sum()`` with respect to the tensors of ``args`` that are in ``wrt``, as detached copies."""
    wrt_ids = {id(t) for t in wrt}
    leaves, call = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.detach().requires_grad_(id(a) in wrt_ids)
            if a.requires_grad:
                leaves.append(a)
        call.append(a)
    if len(leaves) != len(wrt):
        raise ValueError(f"wrt: {len(wrt)} tensors, {len(leaves)} of them among args")
    y = fn(*call)
    return y.detach(), torch.autograd.grad(y, leaves, dy)


def assert_close_as_unfused(out, unfused, ref, dtype, name="output", factor=2.0, floor=None):
    """``out``'s relative error against the float64 reference ``ref`` at most ``factor`` times that of
    ``unfused``, PyTorch's unfused composition of the same op in the same ``dtype``, plus ``floor``
    (default: ``dtype``'s machine epsilon), which covers cases the unfused path computes exactly.

    A fused kernel is held to the accuracy PyTorch itself reaches at that precision, rather than to a
    fixed tolerance per dtype: as tight as the arithmetic allows in fp32, as loose as it must be in fp16."""
    _check_written(out, ref, name)
    floor = torch.finfo(dtype).eps if floor is None else floor
    err, base = rel_err(out, ref), rel_err(unfused, ref)
    bound = factor * base + floor
    assert err <= bound, (f"{name}: relative error {err:.3e} > {factor} × unfused {base:.3e} + {floor:.1e} "
                          f"({dtype})")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def activation(M, K, dtype, lead=(), noncontig=False):
    """x (*lead, M, K) requiring grad; ``noncontig``: every other column of a wider buffer (strided)."""
    if noncontig:
        x = torch.randn(*lead, M, 2 * K, device=DEVICE, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(*lead, M, K, device=DEVICE, dtype=dtype)
    return x.requires_grad_(True)


def base_weight(N, K, dtype):
    """A frozen W (N, K) with entries of std 1/sqrt(K): W x about as large as x."""
    return (torch.randn(N, K, device=DEVICE) / K**0.5).to(dtype)


def lora_factors(K, N, r, dtype, stack=()):
    """A (*stack, r, K) and B (*stack, N, r) requiring grad, scaled so the adapter's term B A x is as
    large as the base's (B is not zero as at initialisation)."""
    A = (torch.randn(*stack, r, K, device=DEVICE) / K**0.5).to(dtype).requires_grad_(True)
    B = (torch.randn(*stack, N, r, device=DEVICE) / r**0.5).to(dtype).requires_grad_(True)
    return A, B


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
class LargestAllocation(TorchDispatchMode):
    """The largest tensor (in elements) torch allocates while active: every op's outputs, less views
    (outputs sharing an input's storage, as W.t() inside F.linear) and the Triton interpreter's host
    copies of kernel arguments. A dispatch mode does not see inside a custom op: call the backend
    functions directly."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith(("set_", "copy_")):
            return out
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out
