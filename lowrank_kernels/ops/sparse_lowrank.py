"""Sparse-plus-low-rank linear (SLTrain): y = s · (x Aᵀ) Bᵀ + x Sᵀ + bias.

Shapes (x flattened to (M, K) over its leading dims): lr_A A (r, K), lr_B B (N, r), bias (N),
and S (N, K) sparse on a fixed support of nnz entries whose values ``sp_values`` (nnz) train.
The support is SLTrain's convention: the sorted flat row-major indices into N×K, and
``sp_values[i]`` is the entry at ``sp_index[i]``. There is no frozen base weight: W = s·BA + S
is the whole layer, and it is never formed as a dense N×K matrix by the kernels.

Forward, with h = x Aᵀ (M, r) kept for backward:
    y = s · h Bᵀ + x Sᵀ + bias
Backward, with g = dy B (M, r):
    dB = s · dyᵀ h      dA = s · gᵀ x      dx = s · g A + dy S
    d sp_values = (dyᵀ x) sampled at the support: an SDDMM, 2·M·nnz flops, never the dense dyᵀ x.
``method="lowrank"`` (no sparse part: ``sp_values`` and ``sp_index`` None) is W = s·BA alone.

Supports (``prepare_support``/``random_support``, defined in ops/sparse_support.py):
- "uniform": single entries anywhere (SLTrain's random support). Kept as CSR of S and of Sᵀ;
  the sparse products are gathers on CUDA cores, one fp32 FMA per (token, nonzero).
- "block": a union of whole aligned bh×bw blocks (e.g. 1×16, 16×16) at the same density. Kept as a
  block list in both orders; each block is one small dense product (tl.dot on tensor cores when
  bh, bw >= 16) with contiguous loads. The values keep the flat-index order, so a block's values
  are a strided 2-D slice of ``sp_values``: nothing is permuted or copied.

Precision: x and bias share one dtype (the output's); A, B and sp_values share one dtype, x's or
fp32. Low-rank products and block products run in the parameter dtype, the uniform gathers in
fp32; everything accumulates in fp32. The Triton forward writes the low-rank part (rounded once to
the output dtype) and then adds the sparse part to it in fp32, so half-precision outputs carry at
most one extra rounding.

Implementations, selected per call by ``backend`` (see lowrank_kernels.backend) and declared with
their forward and backward in ``SPARSE_LOWRANK`` (lowrank_kernels.registry):
- reference: plain torch, the specification. It builds the dense S (as SLTrain's own code does).
- triton (launchers in ops/sparse_lowrank_kernels.py): forward = skinny h = x Aᵀ, the shared
  low-rank GEMM for s·h Bᵀ + bias, then one sparse pass adding x Sᵀ into the output tile by tile.
  Backward = g = dy B, the low-rank GEMM for s·g A plus a sparse pass adding dy S, split-M
  reductions for dA, dB, and the SDDMM.
- cuda: csrc/sparse_lowrank.cu for the sparse passes, cuBLAS (through ATen) for the GEMMs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lowrank_kernels import auto_backend as _auto_backend
from lowrank_kernels import backend as _backend
from lowrank_kernels import registry
from lowrank_kernels.ops import _checks
from lowrank_kernels.ops.sparse_lowrank_kernels import cuda_backward, cuda_forward, triton_backward, triton_forward
from lowrank_kernels.ops.sparse_support import (  # noqa: F401  (this module stays their import path)
    PART_NAMES,
    SUPPORTS,
    SparseSupport,
    from_op_args,
    magnitude_support,
    op_args,
    prepare_support,
    random_support,
    transpose_positions,
)


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification
# ----------------------------------------------------------------------------------------------
def _dense_sparse_part(values: Tensor, index: Tensor, N: int, K: int) -> Tensor:
    return torch.zeros(N * K, dtype=values.dtype, device=values.device).index_put((index,), values).view(N, K)


def sparse_lowrank_linear_reference(x, lr_A, lr_B, sp_values=None, sp_index=None, scaling=1.0, bias=None):
    """Differentiable plain-torch y = s · (x Aᵀ) Bᵀ + x Sᵀ + bias, with S built densely.

    ``sp_index`` is the flat index tensor or a SparseSupport; both None means no sparse part.
    Products run in the parameter dtype and the result is cast to x's dtype.
    """
    lead, K = x.shape[:-1], x.shape[-1]
    N = lr_B.shape[0]
    x2 = x.reshape(-1, K).to(lr_A.dtype)
    y = ((x2 @ lr_A.t()) @ lr_B.t()) * scaling
    if sp_values is not None:
        index = sp_index.index if isinstance(sp_index, SparseSupport) else sp_index
        y = y + x2 @ _dense_sparse_part(sp_values, index, N, K).t()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, N)


def _index(support: Optional[SparseSupport]) -> Optional[Tensor]:
    return support.index if support is not None else None


def _reference_forward(x2, lr_A, lr_B, sp_values, support, bias, scaling):
    adt = lr_A.dtype
    index = _index(support)
    xa = x2.to(adt)
    h = xa @ lr_A.t()
    y = (h @ lr_B.t()) * scaling
    if sp_values is not None:
        y = y + xa @ _dense_sparse_part(sp_values, index, lr_B.shape[0], x2.shape[1]).t()
    if bias is not None:
        y = y + bias.to(adt)
    return y.to(x2.dtype), h.float()


def _reference_backward(dy, x2, lr_A, lr_B, sp_values, support, h, scaling, need_dx):
    adt = lr_A.dtype
    index = _index(support)
    dya, xa = dy.to(adt), x2.to(adt)
    g = dya @ lr_B
    dA = (g.t() @ xa) * scaling
    dB = (dya.t() @ h.to(adt)) * scaling
    dvals = (dya.t() @ xa).flatten()[index] if sp_values is not None else None
    dx = None
    if need_dx:
        dx = (g @ lr_A) * scaling
        if sp_values is not None:
            dx = dx + dya @ _dense_sparse_part(sp_values, index, lr_B.shape[0], x2.shape[1])
        dx = dx.to(dy.dtype)
    return dx, dA, dB, dvals


# ----------------------------------------------------------------------------------------------
# torch.library ops: the support travels as its kind, block size and list of tensors
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lowrank_kernels::sparse_lowrank_linear_fwd", mutates_args=())
def _slr_fwd_op(
    x: Tensor, lr_A: Tensor, lr_B: Tensor, sp_values: Optional[Tensor], parts: list[Tensor],
    kind: str, block_h: int, block_w: int, n_rows: int, n_cols: int,
    bias: Optional[Tensor], scaling: float, backend: str,
) -> tuple[Tensor, Tensor]:
    support = from_op_args(parts, kind, block_h, block_w, n_rows, n_cols)
    if x.shape[0] == 0:
        return x.new_empty((0, lr_B.shape[0])), x.new_empty((0, lr_A.shape[0]), dtype=torch.float32)
    return SPARSE_LOWRANK.impl(backend).forward(x, lr_A, lr_B, sp_values, support, bias, scaling)


@_slr_fwd_op.register_fake
def _(x, lr_A, lr_B, sp_values, parts, kind, block_h, block_w, n_rows, n_cols, bias, scaling, backend):
    return x.new_empty((x.shape[0], lr_B.shape[0])), x.new_empty((x.shape[0], lr_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lowrank_kernels::sparse_lowrank_linear_bwd", mutates_args=())
def _slr_bwd_op(
    dy: Tensor, x: Tensor, lr_A: Tensor, lr_B: Tensor, sp_values: Optional[Tensor], parts: list[Tensor],
    kind: str, block_h: int, block_w: int, n_rows: int, n_cols: int,
    h: Tensor, scaling: float, backend: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d lr_A, d lr_B, d sp_values); dx is empty when need_dx is False and
    d sp_values is empty when there is no sparse part."""
    support = from_op_args(parts, kind, block_h, block_w, n_rows, n_cols)
    if x.shape[0] == 0:
        dx, dA, dB = torch.zeros_like(x), torch.zeros_like(lr_A), torch.zeros_like(lr_B)
        dvals = torch.zeros_like(sp_values) if sp_values is not None else None
    else:
        dx, dA, dB, dvals = SPARSE_LOWRANK.impl(backend).backward(dy, x, lr_A, lr_B, sp_values, support, h, scaling,
                                                                   need_dx)
    if not need_dx:
        dx = x.new_empty((0,))
    if dvals is None:
        dvals = lr_A.new_empty((0,))
    return dx.contiguous(), dA.contiguous(), dB.contiguous(), dvals.contiguous()


@_slr_bwd_op.register_fake
def _(dy, x, lr_A, lr_B, sp_values, parts, kind, block_h, block_w, n_rows, n_cols, h, scaling, backend, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    dvals = torch.empty_like(sp_values) if sp_values is not None else lr_A.new_empty((0,))
    return dx, torch.empty_like(lr_A), torch.empty_like(lr_B), dvals


SPARSE_LOWRANK = registry.declare(
    "sparse_lowrank_linear", "y = x (S + s·BA)ᵀ + bias, S sparse on a fixed support (SLTrain)",
    library_ops=(_slr_fwd_op, _slr_bwd_op),
    reference=registry.Impl(registry.REFERENCE, forward=_reference_forward, backward=_reference_backward),
    triton=registry.Impl(registry.TRITON, forward=triton_forward, backward=triton_backward),
    cuda=registry.Impl(registry.CUDA, forward=cuda_forward, backward=cuda_backward),
)


# The caller's tensors behind the registered ops' tensor arguments (see _checks.layout_sources):
# the support's kernel formats are built from sp_index.
_SLR = dict(x="x", lr_A="lr_A", lr_B="lr_B", sp_values="sp_values", parts=("sp_index",))
LAYOUT_SOURCES = _checks.layout_sources({
    "sparse_lowrank_linear_fwd": {"sparse_lowrank_linear": dict(**_SLR, bias="bias")},
    "sparse_lowrank_linear_bwd": {"sparse_lowrank_linear": dict(dy="grad_output", **_SLR, h=None)},
})


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class SparseLowRankLinearFunction(torch.autograd.Function):
    """Autograd for the 2-D op; saves x (no copy) and h (M, r) fp32 only."""

    @staticmethod
    def forward(ctx, x2, lr_A, lr_B, sp_values, bias, support, scaling, backend):
        sargs = op_args(support)
        y, h = torch.ops.lowrank_kernels.sparse_lowrank_linear_fwd(
            x2, lr_A, lr_B, sp_values, *sargs, bias, scaling, backend
        )
        ctx.save_for_backward(x2, lr_A, lr_B, sp_values, h, *sargs[0])
        ctx.support_meta = sargs[1:]
        ctx.scaling, ctx.backend = scaling, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, lr_A, lr_B, sp_values, h, *parts = ctx.saved_tensors
        need_x, need_a, need_b, need_v, need_bias = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        dx, dA, dB, dvals = torch.ops.lowrank_kernels.sparse_lowrank_linear_bwd(
            dy, x2, lr_A, lr_B, sp_values, parts, *ctx.support_meta, h, ctx.scaling, ctx.backend, need_x
        )
        d_bias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if (need_bias and ctx.has_bias) else None
        return (
            dx if need_x else None,
            dA if need_a else None,
            dB if need_b else None,
            dvals if (need_v and sp_values is not None) else None,
            d_bias,
            None, None, None,
        )


# ----------------------------------------------------------------------------------------------
# Validation and the functional entry point
# ----------------------------------------------------------------------------------------------
def _check_inputs(x, lr_A, lr_B, sp_values, sp_index, scaling, bias) -> Optional[SparseSupport]:
    """Validate everything and return the prepared support (None for the low-rank-only op)."""
    _checks.check_float("x", x, dtypes=_checks.KERNEL_DTYPES)
    _checks.check_float("lr_A", lr_A, 2, dtypes=_checks.KERNEL_DTYPES)
    _checks.check_float("lr_B", lr_B, 2, dtypes=_checks.KERNEL_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    _checks.check_in_features(x)
    K = x.shape[-1]
    r, N = lr_A.shape[0], lr_B.shape[0]
    if r == 0:
        raise ValueError("lr_A has rank 0: the rank r (lr_A.shape[0]) must be >= 1")
    if lr_A.shape[1] != K:
        raise ValueError(f"lr_A must be (r, in_features) = (r, {K}) to match x's last dim, got {tuple(lr_A.shape)}")
    if lr_B.shape[1] != r:
        raise ValueError(f"lr_B must be (out_features, r) with r = {r} (lr_A.shape[0]), got {tuple(lr_B.shape)}")
    if r > min(N, K):
        raise ValueError(f"rank r = {r} exceeds min(out_features, in_features) = {min(N, K)}")
    if lr_B.dtype != lr_A.dtype:
        raise TypeError(f"lr_B dtype {lr_B.dtype} must equal lr_A dtype {lr_A.dtype}")
    if lr_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lr_A has dtype {lr_A.dtype} for x of dtype {x.dtype}; parameters must share x's dtype "
                        "or be float32")
    tensors = {"lr_A": lr_A, "lr_B": lr_B}
    if (sp_values is None) != (sp_index is None):
        raise ValueError("sp_values and sp_index go together: give both, or neither for the low-rank-only op")
    support = None
    if sp_values is not None:
        _checks.check_float("sp_values", sp_values, 1, dtypes=_checks.KERNEL_DTYPES)
        if sp_values.dtype != lr_A.dtype:
            raise TypeError(f"sp_values dtype {sp_values.dtype} must equal lr_A dtype {lr_A.dtype}")
        if isinstance(sp_index, SparseSupport):
            support = sp_index
            if support.shape != (N, K):
                raise ValueError(f"sp_index is a support of shape {support.shape} but the layer is ({N}, {K})")
        elif isinstance(sp_index, Tensor):
            if sp_index.device != x.device:
                raise ValueError(f"sp_index is on {sp_index.device} but x is on {x.device}: all tensors must share "
                                 "one device")
            support = prepare_support(sp_index, (N, K))
        else:
            raise TypeError("sp_index must be a flat index tensor or a SparseSupport from prepare_support, got "
                            f"{type(sp_index).__name__}")
        if sp_values.numel() != support.nnz:
            raise ValueError(f"sp_values has {sp_values.numel()} entries but sp_index has {support.nnz} "
                             "(nnz must match)")
        tensors["sp_values"] = sp_values
        tensors["sp_index"] = support.index
    _checks.check_bias(bias, N, x)
    _checks.check_same_device("x", x, bias=bias, **tensors)
    _checks.check_scalar("scaling", scaling)
    return support


@_auto_backend.tuned("sparse_lowrank_linear")
def sparse_lowrank_linear(x, lr_A, lr_B, sp_values=None, sp_index=None, scaling=1.0, bias=None, backend=None):
    """Sparse-plus-low-rank linear (SLTrain): ``scaling · (x Aᵀ) Bᵀ + x Sᵀ + bias``.

    Args:
        x: (..., K) input, float32/float16/bfloat16, any leading dims, may be non-contiguous.
        lr_A: (r, K) and lr_B: (N, r), the low-rank factors; x's dtype or float32.
        sp_values: (nnz,) the trainable values of S, lr_A's dtype; None for the low-rank-only op.
        sp_index: where the values sit: a SparseSupport from ``prepare_support``/``random_support``
            (validated once: the fast path a module uses), or the sorted flat int64 index tensor
            (nnz,) into N×K (validated and converted on every call); None with sp_values None.
        scaling: s = alpha / r.
        bias: optional (N,), x's dtype.
        backend: None, "reference", "triton" or "cuda" (see lowrank_kernels.backend).

    Returns:
        (..., N) tensor in x's dtype. Gradients flow to x, lr_A, lr_B, sp_values and bias.
    """
    support = _check_inputs(x, lr_A, lr_B, sp_values, sp_index, scaling, bias)
    backend = _backend.resolve("sparse_lowrank_linear", backend, x=x)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    args = (x2, lr_A, lr_B, sp_values, bias, support, float(scaling), backend)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5]):
        y = SparseLowRankLinearFunction.apply(*args)
    else:
        y, _ = torch.ops.lowrank_kernels.sparse_lowrank_linear_fwd(
            x2, lr_A, lr_B, sp_values, *op_args(support), bias, float(scaling), backend
        )
    return y.reshape(*lead, lr_B.shape[0])
