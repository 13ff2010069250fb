"""The backend registry: every op, its implementations (reference, Triton, CUDA) and what each supports.

An op module declares the op once, next to its implementations::

    LORA = registry.declare(
        "lora_linear", "y = x W^T + b + s (dropout(x) A^T) B^T, W dense or 4-bit",
        library_ops=(_lora_fwd_op, _lora_bwd_op),
        reference=registry.Impl(registry.REFERENCE, quant4=registry.REFERENCE, forward=..., backward=...),
        triton=registry.Impl(registry.TRITON, quant4=registry.TRITON, forward=..., backward=...),
        cuda=registry.Impl(registry.CUDA, quant4=registry.CUDA_16BIT, forward=..., backward=...),
    )

and runs a backend's code through it (``LORA.impl(backend).forward(...)``). ``backend.resolve``
refuses a combination an implementation does not declare (device, dtype, 4-bit weight) with one
message format (``refusal``); auto mode times only the backends that support the call;
``python -m lowrank_kernels`` lists every declared op; tests/test_conformance.py runs opcheck and a
``fullgraph=True`` compile for every op and backend declared here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import torch

BACKENDS = ("reference", "triton", "cuda")

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
# Supported floating dtypes per device type ("any": every device type, for plain PyTorch code).
# "cpu" for Triton means its interpreter (TRITON_INTERPRET=1), whose bfloat16 dot multiplies raw bit
# patterns (triton-lang/triton#11584).
REFERENCE = {"any": frozenset(_FLOAT + (torch.float64,))}
TRITON = {"cuda": frozenset(_FLOAT), "cpu": frozenset((torch.float16, torch.float32))}
CUDA = {"cuda": frozenset(_FLOAT)}
# Why a device's table is narrower, said in the refusal: (backend, device type) -> note.
NOTES = {("triton", "cpu"): "CPU tensors run the Triton interpreter, which computes bfloat16 dot products wrongly; "
                            "use CUDA tensors or backend='reference'"}
# The CUDA kernels whose tiles are tensor-core tiles only (e.g. the 4-bit base's dequantising GEMM).
CUDA_16BIT = {"cuda": frozenset((torch.float16, torch.bfloat16))}


class Impl:
    """One backend's implementation of an op: what it supports and its callables.

    ``dtypes`` maps a device type to the floating dtypes it accepts; ``quant4`` the same for calls
    with a bitsandbytes 4-bit base weight (None: not supported). The keyword callables
    (``forward``, ``backward``, ``step``, ...) are the op's own names for its stages, read as
    attributes.
    """

    def __init__(self, dtypes: Mapping[str, frozenset], quant4: Optional[Mapping[str, frozenset]] = None,
                 **fns: Callable):
        self.dtypes = {dev: frozenset(d) for dev, d in dtypes.items()}
        self.quant4 = None if quant4 is None else {dev: frozenset(d) for dev, d in quant4.items()}
        self.fns = fns

    def __getattr__(self, name: str):
        fns = self.__dict__.get("fns", {})
        if name in fns:
            return fns[name]
        raise AttributeError(f"implementation has no {name!r} (it has: {', '.join(fns) or 'none'})")


@dataclasses.dataclass(frozen=True)
class Op:
    """A declared op: its name, one line on what it computes, its torch.library ops, its
    implementations by backend and the backend its CUDA tensors run when auto mode does not time."""

    name: str
    summary: str
    library_ops: tuple
    impls: Mapping[str, Impl]
    cuda_default: str = "triton"

    def impl(self, backend: str) -> Impl:
        try:
            return self.impls[backend]
        except KeyError:
            raise ValueError(refusal(self.name, backend, "this op", self.backends())) from None

    def backends(self) -> tuple:
        return tuple(b for b in BACKENDS if b in self.impls)


_OPS: dict = {}


def declare(name: str, summary: str, *, library_ops=(), cuda_default: str = "triton", **impls: Impl) -> Op:
    """Declare op ``name`` with its implementations by backend (keywords ``reference``, ``triton``,
    ``cuda``). The reference implementation is required; declaring a name twice is an error."""
    unknown = set(impls) - set(BACKENDS)
    if unknown:
        raise ValueError(f"{name}: unknown backends {sorted(unknown)}; backends are {BACKENDS}")
    if "reference" not in impls:
        raise ValueError(f"{name}: every op declares a reference implementation")
    if cuda_default not in impls:
        raise ValueError(f"{name}: cuda_default {cuda_default!r} is not one of its implementations")
    if name in _OPS:
        raise ValueError(f"op {name!r} is already declared")
    op = Op(name, summary, tuple(library_ops), dict(impls), cuda_default)
    _OPS[name] = op
    return op


def get(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; declared ops: {', '.join(_OPS)}") from None


def ops() -> tuple:
    """Every declared op, in declaration order (importing lowrank_kernels declares them all)."""
    return tuple(_OPS)


def refusal(op: str, backend: str, subject: str, supported, note: str = "") -> str:
    """The one message format for an unsupported combination."""
    return (f"{op}: backend={backend!r} does not support {subject}; "
            f"supported: {', '.join(str(s) for s in supported) or 'nothing'}" + (f" ({note})" if note else ""))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check(op: str, backend: str, device_type: str, dtypes: Mapping[str, torch.dtype], quant4: bool = False) -> None:
    """Raise ``Unsupported`` where ``backend``'s implementation of ``op`` does not declare this call:
    the op on that backend, the device type, each named floating tensor's dtype, a 4-bit weight."""
    spec = get(op)
    if backend not in spec.impls:
        raise Unsupported(refusal(op, backend, "this op", [f"backend={b!r}" for b in spec.backends()]))
    impl = spec.impls[backend]
    if quant4 and impl.quant4 is None:
        raise Unsupported(refusal(op, backend, "a 4-bit base weight",
                                  [f"backend={b!r}" for b in spec.backends() if spec.impls[b].quant4 is not None]))
    table = impl.quant4 if quant4 else impl.dtypes
    allowed = table.get(device_type, table.get("any"))
    if allowed is None:
        raise Unsupported(refusal(op, backend, f"tensors on {device_type}" + (" with a 4-bit weight" if quant4 else ""),
                                  [f"{dev.upper()} tensors" for dev in table]))
    for name, dtype in dtypes.items():
        if dtype.is_floating_point and dtype not in allowed:
            where = f"{device_type} tensors" + (" with a 4-bit weight" if quant4 else "")
            raise Unsupported(refusal(op, backend, f"{name} in {_dtype_name(dtype)} on {where}",
                                      sorted(map(_dtype_name, allowed)), NOTES.get((backend, device_type), "")))


def supports(op: str, backend: str, device_type: str, dtypes=(), quant4: bool = False) -> bool:
    try:
        check(op, backend, device_type, {str(i): d for i, d in enumerate(dtypes)}, quant4)
    except Unsupported:
        return False
    return True


class Unsupported(TypeError, RuntimeError):
    """A backend asked for a call its implementation does not declare (a TypeError for dtypes, a
    RuntimeError for devices and missing kernels: both catch it)."""
