"""Backend selection: which implementation of an op runs for a given call.

Order of precedence: the explicit ``backend=`` argument, then the ``LOWRANK_KERNELS_BACKEND``
environment variable, then the default for the tensors' device: on CUDA tensors ``"auto"``, the
fastest of the op's ``candidates`` for the call's shapes, measured on first use (see
lowrank_kernels.auto_backend; the op's ``cuda_default`` where it is off or cannot time); the reference path
on CPU tensors. ``None`` and ``"auto"`` mean the same.

``"triton"`` on CPU tensors runs the Triton kernels under the Triton interpreter, which must be
switched on with ``TRITON_INTERPRET=1`` before triton is imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

from lowrank_kernels import registry
from lowrank_kernels._version import __version__

BACKENDS = registry.BACKENDS
# What the backend= arguments accept besides None: a backend, or "auto" (the device default).
CHOICES = BACKENDS + ("auto",)
ENV_VAR = "LOWRANK_KERNELS_BACKEND"

# Each op's implementations, what each supports and its default on CUDA tensors are declared in
# lowrank_kernels.registry. The default on CUDA tensors (where auto mode does not time:
# LOWRANK_KERNELS_AUTO_BACKEND=0, inside torch.compile or a CUDA graph capture before an eager call
# timed the shape), and the first candidate auto mode times (it keeps it on a tie), is Triton for
# every op until GPU timings exist: the backend whose 16-bit products are proven to run on tensor
# cores by `make gpu-check`, which compiles every Triton kernel for sm_80 and sm_90a and fails on a
# dot lowered to FMA (the CUDA backend's large products are cuBLAS calls, on tensor cores but outside
# what the check can inspect, and its LoRA path writes the low-rank term before cuBLAS accumulates
# onto it, one more pass over the (M, N) output than Triton's fused GEMM). A measured faster backend
# replaces an op's ``cuda_default``; docs/backends.md says which were measured.


def ops() -> tuple:
    """Every op the package declares (lowrank_kernels.registry), in declaration order."""
    return registry.ops()


def cuda_default(op: str) -> str:
    """The backend ``op`` runs on CUDA tensors where auto mode does not time."""
    return registry.get(op).cuda_default


BUILD_HINT = (
    "the CUDA extension lowrank_kernels._C is not built; build it on a machine with a CUDA "
    "toolkit and a CUDA build of torch with `LOWRANK_KERNELS_FORCE_CUDA=1 pip install -e . "
    "--no-build-isolation` (set TORCH_CUDA_ARCH_LIST to choose architectures)"
)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Set only by planning_for(): the GPU architecture a compile-only run plans kernels for.
_PLANNED_ARCH: "int | None" = None


@contextlib.contextmanager
def planning_for(arch: int):
    """Plan Triton launches on CPU tensors as if they ran on a GPU of compute capability ``arch``
    (80, 90, ...): tile choices and autotune pruning follow that GPU, and ``backend="triton"``
    accepts CPU tensors. Kernels are not run; the compile check (``make gpu-check``) intercepts
    the launches and compiles them for the GPU instead."""
    global _PLANNED_ARCH
    previous, _PLANNED_ARCH = _PLANNED_ARCH, int(arch)
    try:
        yield
    finally:
        _PLANNED_ARCH = previous


def planning() -> bool:
    """Whether launches are being planned for a GPU (``planning_for``) rather than run."""
    return _PLANNED_ARCH is not None


def tile_arch(device: torch.device) -> "int | None":
    """The compute capability Triton tiles are chosen for on ``device`` (e.g. 90 for an H100), or
    None where the kernels run under the interpreter (small tiles keep it fast)."""
    if _PLANNED_ARCH is not None:
        return _PLANNED_ARCH
    if device.type != "cuda":
        return None
    major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


# Looked up once at import: resolve() runs inside compiled graphs, where a cached call would be
# traced through on every compilation.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


# Whether the interpreter was on when this package (and its @triton.jit kernels) was imported:
# triton decides per kernel, at decoration, whether it is interpreted or compiled for a GPU.
_INTERPRETED_AT_IMPORT = interpreter_enabled()
# Why lowrank_kernels._C failed to import, where it exists but does not load.
_C_IMPORT_ERROR: "ImportError | None" = None


@functools.lru_cache(maxsize=1)
def cuda_extension():
    """The compiled module ``lowrank_kernels._C``, or None where it was not built (or does not load:
    ``cuda_extension_status()`` says why)."""
    global _C_IMPORT_ERROR
    try:
        return importlib.import_module("lowrank_kernels._C")  # the compiled extension, no Python module
    except ImportError as err:
        _C_IMPORT_ERROR = err
        return None


def _device_of(tensors) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def resolve(op: str, backend: str | None, *tensors, weight_4bit: bool = False, **named) -> str:
    """Return the backend that runs ``op`` for these tensors, or raise a clear error.

    ``backend`` is the caller's argument (None: environment variable, then device default).
    Tensors passed by keyword are named in errors (``resolve("lora_linear", None, x=x)``); their
    floating dtypes, their device and ``weight_4bit`` (a bitsandbytes 4-bit base weight) are checked
    against what the op's implementation declares in lowrank_kernels.registry
    (``registry.Unsupported``, a TypeError and a RuntimeError, where it does not).
    """
    spec = registry.get(op)
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = ENV_VAR
    else:
        source = "backend"
    if backend == "auto":
        # the ops' entry points replace "auto" by the timed choice (auto_backend.tuned); what reaches
        # here untimed runs the device default
        backend = None
    device = _device_of(tensors + tuple(named.values()))
    if device.type == "meta":
        # Meta tensors only propagate shapes, through the ops' fake implementations (call_op),
        # the same for every backend.
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"{source} must be one of {CHOICES} or None, got {backend!r}")
        return backend or "reference"
    if backend is None:
        if device.type != "cuda":
            return "reference"
        preferred = spec.cuda_default
        if preferred == "cuda" and cuda_extension() is None:
            preferred = "triton"
        _check_declared(op, preferred, device, tensors, named, weight_4bit)
        return preferred
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {CHOICES} or None, got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package")
        if device.type == "cpu" and not interpreter_enabled() and _PLANNED_ARCH is None:
            raise RuntimeError(
                f"{op}: backend='triton' got CPU tensors; Triton kernels run on the CPU only under "
                "the interpreter: set TRITON_INTERPRET=1 before importing triton, or use CUDA tensors"
            )
        if device.type == "cpu" and interpreter_enabled() and not _INTERPRETED_AT_IMPORT:
            raise RuntimeError(
                f"{op}: backend='triton' got CPU tensors, but TRITON_INTERPRET=1 was set after lowrank_kernels "
                "was imported, so its Triton kernels were already built for a GPU. Set TRITON_INTERPRET=1 "
                "before the first import (in the shell, or at the very top of the script or conftest.py)"
            )
    elif backend == "cuda" and device.type == "cuda" and backend in spec.impls and cuda_extension() is None:
        raise RuntimeError(f"{op}: backend='cuda' unavailable: {BUILD_HINT}")
    # planning for a GPU (make gpu-check) checks dtypes as on that GPU
    _check_declared(op, backend, torch.device("cuda") if _PLANNED_ARCH is not None else device, tensors, named,
                    weight_4bit)
    return backend


def _check_declared(op: str, backend: str, device: torch.device, tensors: tuple, named: dict,
                    weight_4bit: bool) -> None:
    """registry.check on the call's floating tensors, named by keyword (positional ones by place)."""
    dtypes = {f"input {i}": t.dtype for i, t in enumerate(tensors) if isinstance(t, torch.Tensor)}
    dtypes.update((name, t.dtype) for name, t in named.items() if isinstance(t, torch.Tensor))
    registry.check(op, backend, device.type, dtypes, weight_4bit)


def candidates(op: str, device: torch.device, dtypes=(), weight_4bit: bool = False) -> tuple:
    """The backends auto mode times for ``op`` on ``device`` with floating ``dtypes``, the default
    first: the reference (on CUDA tensors, the unfused composition of cuBLAS calls that PEFT's
    layers amount to), Triton where installed (on CPU tensors only under the interpreter), CUDA on
    CUDA tensors where the extension is built; each only where the registry declares the op, the
    device, every dtype and ``weight_4bit`` supported (so float64 runs on the reference alone)."""
    spec = registry.get(op)
    usable = set()
    for b in spec.backends():
        if b == "triton" and not (triton_available() and (device.type == "cuda" or (
                device.type == "cpu" and interpreter_enabled() and _INTERPRETED_AT_IMPORT))):
            continue
        if b == "cuda" and (device.type != "cuda" or cuda_extension() is None):
            continue
        if registry.supports(op, b, device.type, dtypes, weight_4bit):
            usable.add(b)
    first = spec.cuda_default
    return tuple(sorted(usable, key=lambda b: (b != first, BACKENDS.index(b))))


def call_op(op, impl, *args):
    """Run a registered torch.library op: through the dispatcher while torch.compile traces (so
    the graph holds the op whole), straight into its implementation in eager mode.

    The dispatcher's Python-level custom-op path costs tens of microseconds per call, as much as
    a whole decode-size GEMM; eager calls skip it. Both routes run the same implementation.
    """
    if torch.compiler.is_compiling() or _on_meta(args):
        return op(*args)
    return impl(*args)


def _on_meta(args) -> bool:
    """Whether an op's tensors are meta tensors (they share one device: the first decides), which
    the dispatcher sends to the op's fake implementation: shapes and dtypes, no data."""
    for a in args:
        if isinstance(a, (list, tuple)) and a:
            a = a[0]
        if isinstance(a, torch.Tensor):
            return a.is_meta
    return False


def autocast_inputs(*tensors):
    """Cast floating tensors to the autocast dtype when torch.autocast is on for their device.

    A registered op is opaque to autocast, which passes it through uncast; ops call this so that a
    model trained under autocast gets the dtypes (and the numerics) that the unfused nn.Linear and
    adapter matmuls would get there: every operand in the autocast dtype. None passes through.
    Casting keeps gradients flowing to the original tensors in their own dtype.
    """
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    # devices without autocast (meta: shape propagation) have nothing to cast
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


# ----------------------------------------------------------------------------------------------
# What this machine has: `python -m lowrank_kernels` and info()
# ----------------------------------------------------------------------------------------------
def cuda_extension_status() -> tuple:
    """(built, reason): whether lowrank_kernels._C loads here and, if not, why, in one line
    (``BUILD_HINT`` says how to build it).

    setup.py decides at install time and says so only in the build log; this finds the same
    causes at run time (the skip flag, a CPU torch, no CUDA toolkit, no GPU), or the import error
    of an extension that exists but does not load (e.g. built against another torch).
    """
    if cuda_extension() is not None:
        return True, None
    if importlib.util.find_spec("lowrank_kernels._C") is not None and _C_IMPORT_ERROR is not None:
        return False, f"lowrank_kernels._C exists but does not load: {_C_IMPORT_ERROR}"
    if os.environ.get("LOWRANK_KERNELS_SKIP_CUDA", "0") not in ("", "0"):
        cause = "LOWRANK_KERNELS_SKIP_CUDA is set"
    elif torch.version.cuda is None:
        cause = f"torch {torch.__version__} is a CPU build"
    else:
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            cause = "no CUDA toolkit found (set CUDA_HOME)"
        elif not torch.cuda.is_available():
            cause = "no GPU visible (set LOWRANK_KERNELS_FORCE_CUDA=1 to build anyway)"
        else:
            cause = "the package was installed without it (LOWRANK_KERNELS_SKIP_CUDA at install, or another machine)"
    return False, cause


# Entries of info() that the modules knowing them add (auto_backend adds "auto"), so that this
# module imports none of them: name -> function of the GPU device (None without a GPU).
_INFO_SECTIONS: dict = {}


def add_info_section(name: str, section) -> None:
    _INFO_SECTIONS[name] = section


def info() -> dict:
    """What the package found on this machine and the backend each op will use.

    Returns a dict: "version", "python", "torch", "triton" (version or None), "gpu" (name or
    None), "cuda_extension" (bool), "cuda_extension_reason" (None when built), "interpreter"
    (TRITON_INTERPRET on), "backend_env" (LOWRANK_KERNELS_BACKEND or None), "backends":
    {op: {"cpu": backend, "cuda": backend or None without a GPU}} (on CUDA tensors the backend
    that runs untimed, see "auto"); an entry reads "error: ..." where the environment variable
    names an unusable backend; and "auto": {"enabled" (timing on), "cache_dir" (None: memory
    only), "candidates": {op: the backends timed on this GPU} (None without a GPU), "choices":
    the choices cached for this GPU (``auto_backend.records``)}.
    """
    import platform

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    built, reason = cuda_extension_status()
    devices = ["cpu"] + (["cuda"] if gpu else [])
    backends = {}
    for op in ops():
        backends[op] = {"cpu": None, "cuda": None}
        for dev in devices:
            try:
                backends[op][dev] = resolve(op, None, torch.empty(0, device=dev))
            except (RuntimeError, ValueError) as err:
                backends[op][dev] = f"error: {err}"
    gpu_device = torch.device("cuda", torch.cuda.current_device()) if gpu else None
    return {"version": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "gpu": gpu, "cuda_extension": built, "cuda_extension_reason": reason,
            "interpreter": interpreter_enabled(), "backend_env": os.environ.get(ENV_VAR) or None,
            "backends": backends, **{name: section(gpu_device) for name, section in _INFO_SECTIONS.items()}}
