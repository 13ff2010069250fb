"""Argument checks shared by the ops' launchers: one wording for one kind of mistake.

Every check raises TypeError (wrong kind or dtype) or ValueError (wrong shape, range or device)
with a message that names the argument and says what was expected.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lowrank_kernels.ops import _rng

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 runs on the reference backend only (for gradcheck-style verification).
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def check_float(name: str, t, ndim: Optional[int] = None, dtypes=FLOAT_DTYPES) -> None:
    """``t`` is a tensor of one of ``dtypes`` with ``ndim`` dimensions (any when None)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        allowed = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise TypeError(f"{name} must be {allowed}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_input(x, in_features: int, what: str) -> None:
    """x is (..., in_features); ``what`` names where in_features comes from."""
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but {what} expects {in_features}")
    check_in_features(x)


def check_in_features(x: Tensor) -> None:
    """A layer's input has at least one feature: a (N, 0) weight is a mistake, not a layer."""
    if x.shape[-1] == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}: in_features (its last dim) must be >= 1")


def check_adapter_dtype(base_dtype: torch.dtype, adapter_dtype: torch.dtype, name: str) -> None:
    """Adapters share the base dtype, or are fp32 on a bf16/fp16 base (PEFT's default)."""
    if adapter_dtype != base_dtype and adapter_dtype != torch.float32:
        raise TypeError(
            f"{name} has dtype {adapter_dtype} on a {base_dtype} base; adapters must share the "
            "base dtype or be float32"
        )


def check_same_dtype(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} dtype {t.dtype} must equal {ref_name} dtype {ref.dtype}")


def check_bias(bias, out_features: int, x: Tensor) -> None:
    """None, or (out_features,) in x's dtype."""
    if bias is None:
        return
    check_float("bias", bias, 1)
    if bias.shape[0] != out_features:
        raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")
    check_same_dtype("bias", bias, "x", x)


def check_same_device(ref_name: str, ref: Tensor, **tensors) -> None:
    """Every tensor among ``tensors`` (None and non-tensors skipped) is on ``ref``'s device."""
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: "
                             "all tensors must share one device")


def check_scalar(name: str, value) -> None:
    """A finite Python number (not a tensor: reading one would synchronise the device)."""
    if isinstance(value, (Tensor, bool)) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_dropout_p(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")


def check_seed(name: str, seed, optional: bool = True) -> None:
    """An int in [0, 2**62) (the RNG's seed range), or None where ``optional``."""
    if seed is None and optional:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**_rng.SEED_BITS:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}an int in [0, 2**{_rng.SEED_BITS}), "
                         f"got {seed!r}")


def check_no_overlap(name: str, t: Tensor) -> None:
    """``t``, written in place, holds each element at its own address: not an expanded (stride-0)
    view or any other self-overlapping layout (torch's MemOverlap), whose aliased elements a kernel
    would write several times in no defined order.

    Exact for every layout whose dims, sorted by stride, each step past the span of the smaller
    ones (all that views of one tensor produce); the rare interleaved layouts beyond it are refused.
    """
    span = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= span:
            raise ValueError(f"{name} is written in place but its layout (shape {tuple(t.shape)}, strides "
                             f"{t.stride()}) puts several elements at one address (an expanded view?); "
                             "pass a tensor that owns its elements, e.g. .clone()")
        span += stride * (size - 1)


# The schema arguments holding a bitsandbytes 4-bit weight's storage (ops/_quant.Quant4): bnb's
# layout, made by bnb, so no caller's layout to sweep.
QUANT4_STORAGE = dict.fromkeys(("packed", "absmax", "code", "absmax2", "code2", "offset"))


def layout_sources(table: dict) -> dict:
    """An op file's table of where its registered ops' tensor arguments come from, checked and
    returned: ``{registered op: {public op: {schema argument: source}}}``, the source being the
    public argument the tensor is (its layout is the caller's), a tuple of the public arguments it
    is computed from, or None where the op makes it itself (saved for backward, contiguous).
    "grad_output" names the gradient that backward receives. tests/test_layouts.py sweeps the
    layouts of every public argument named in these tables, so a new op or argument is covered
    once it is entered here, and a registered tensor argument missing here fails that test.
    """
    for op, publics in table.items():
        for public, args in publics.items():
            for arg, source in args.items():
                sources = source if isinstance(source, tuple) else (source,)
                if not all(s is None or isinstance(s, str) for s in sources):
                    raise TypeError(f"layout_sources: {op} / {public} / {arg}: a source is a public argument's "
                                    f"name, a tuple of them or None, got {source!r}")
    return table
