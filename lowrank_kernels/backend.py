"""Backend selection: which implementation of an op runs for a given call.

Order of precedence: the explicit ``backend=`` argument, then the ``LOWRANK_KERNELS_BACKEND``
environment variable, then the default for the tensors' device: the fastest kernel for the op
on CUDA tensors (``CUDA_DEFAULTS``), the reference path on CPU tensors.

``"triton"`` on CPU tensors runs the Triton kernels under the Triton interpreter, which must be
switched on with ``TRITON_INTERPRET=1`` before triton is imported.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "LOWRANK_KERNELS_BACKEND"

# Default kernel per op on CUDA tensors when the CUDA extension is built. Where it is not built,
# CUDA tensors fall back to "triton". See the README's backend table for how these were chosen.
CUDA_DEFAULTS = {
    "lora_linear": "cuda",
    # Triton: its block-support kernels run on tensor cores; the CUDA ones are CUDA-core FMAs.
    "sparse_lowrank_linear": "triton",
    # Triton's projection GEMMs run on tensor cores; csrc/projected_step.cu uses SIMT FMA tiles
    # and has not been timed on a GPU yet.
    "projected_adamw_step": "triton",
    "adamw_step": "triton",
    # Triton's basis products run on tensor cores; csrc/random_basis.cu's are CUDA-core FMAs
    # (cuBLAS only for a plain stored basis) and have not been timed on a GPU yet.
    "vera_linear": "triton",
    "randlora_linear": "triton",
}

BUILD_HINT = (
    "the CUDA extension lowrank_kernels._C is not built; build it on a machine with a CUDA "
    "toolkit and a CUDA build of torch with `LOWRANK_KERNELS_FORCE_CUDA=1 pip install -e . "
    "--no-build-isolation` (set TORCH_CUDA_ARCH_LIST to choose architectures)"
)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once at import: resolve() runs inside compiled graphs, where a cached call would be
# traced through on every compilation.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


@functools.lru_cache(maxsize=1)
def cuda_extension():
    """The compiled module ``lowrank_kernels._C``, or None where it was not built."""
    try:
        from lowrank_kernels import _C
    except ImportError:
        return None
    return _C


def _device_of(tensors) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def resolve(op: str, backend: str | None, *tensors) -> str:
    """Return the backend that runs ``op`` for these tensors, or raise a clear error.

    ``backend`` is the caller's argument (None: environment variable, then device default).
    """
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = ENV_VAR
    else:
        source = "backend"
    device = _device_of(tensors)
    if backend is None:
        if device.type != "cuda":
            return "reference"
        preferred = CUDA_DEFAULTS.get(op, "triton")
        if preferred == "cuda" and cuda_extension() is None:
            preferred = "triton"
        return preferred
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package")
        if device.type == "cpu" and not interpreter_enabled():
            raise RuntimeError(
                f"{op}: backend='triton' got CPU tensors; Triton kernels run on the CPU only under "
                "the interpreter: set TRITON_INTERPRET=1 before importing triton, or use CUDA tensors"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"{op}: backend='triton' does not support device {device}")
    elif backend == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
        if cuda_extension() is None:
            raise RuntimeError(f"{op}: backend='cuda' unavailable: {BUILD_HINT}")
    return backend


def call_op(op, impl, *args):
    """Run a registered torch.library op: through the dispatcher while torch.compile traces (so
    the graph holds the op whole), straight into its implementation in eager mode.

    The dispatcher's Python-level custom-op path costs tens of microseconds per call, as much as
    a whole decode-size GEMM; eager calls skip it. Both routes run the same implementation.
    """
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)


def autocast_inputs(*tensors):
    """Cast floating tensors to the autocast dtype when torch.autocast is on for their device.

    A registered op is opaque to autocast, which passes it through uncast; ops call this so that a
    model trained under autocast gets the dtypes (and the numerics) that the unfused nn.Linear and
    adapter matmuls would get there: every operand in the autocast dtype. None passes through.
    Casting keeps gradients flowing to the original tensors in their own dtype.
    """
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
