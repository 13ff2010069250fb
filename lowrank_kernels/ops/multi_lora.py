"""Multi-adapter LoRA linear: many LoRA adapters (or a mixture of them) in one batch.

Shapes (x flattened to (M, K) over its leading dims): weight W (N, K), bias (N), a stack of n
adapters lora_A (n, r, K) and lora_B (n, N, r) (PEFT's ``lora_A.weight`` / ``lora_B.weight`` of
each adapter, stacked), per-adapter ranks ρ_a <= r (the padded rows of A_a and columns of B_a are
ignored) and scales s_a. Each token m has k slots (k = 1 without a mixture): adapters a_mj in
[-1, n) with weights w_mj (1 without a mixture); a_mj = -1 means no adapter in that slot.

Forward, with h_mj = drop(x_m) A_aᵀ (ρ_a values per slot, kept for backward) and c_mj = s_a·w_mj:
    y_m = x_m Wᵀ + bias + Σ_j c_mj · h_mj B_aᵀ                       a = a_mj
Backward, with g_mj = dy_m B_a and drop' the forward's mask and 1/(1-p) scale:
    dx_m  = dy_m W + Σ_j c_mj · drop'(g_mj A_a)
    dA_a  = Σ_{(m,j): a_mj = a} c_mj · g_mjᵀ drop(x_m)     dB_a = Σ_{(m,j): a_mj = a} c_mj · dy_mᵀ h_mj
    dc_mj = g_mj · h_mj  (so dw_mj = s_a · g_mj · h_mj, and ds_a = Σ w_mj · g_mj · h_mj)
Tokens of adapter a reach only adapter a's gradients. One dropout mask per token (shared by its
slots), drawn from (seed, token, feature) with the package's counter-based RNG (ops/_rng.py).

Implementations, selected per call by ``backend`` and declared with the backend registry
(``MULTI_LORA``); the Triton and CUDA ones are in ops/multi_lora_kernels.py:
- reference: plain torch, a loop over adapters: the specification (float64-checkable).
- triton: the slots are grouped by adapter once per call (a stable sort of the adapter ids and
  a searchsorted of the segment bounds, no host synchronisation), kept for backward. Forward:
  a segmented down-projection h (each tile of sorted slots loops over the few adapters it holds,
  reading only those adapters' A), then one GEMM pass per output tile: the low-rank term of every
  adapter present in the tile as extra K-steps of the base GEMM's accumulator, rows gathered in
  sorted order, bias in the epilogue: no (M, N) temporary. Backward: g = dy B by the same
  segmented down-projection, dx by the same fused GEMM (the tail masked by dropout), dA and dB
  as segmented reductions over each adapter's slots (fp32 partials summed in a fixed order: no
  atomics, bit-reproducible). Decode (at most DECODE_SLOTS slots, no gradient): no sort; a
  BGMV-style kernel (one program per slot and rank block, its adapter's A read as a matrix-vector
  product) and the fused GEMM over rows in arrival order.
- cuda: cuBLAS (through ATen) for x Wᵀ + bias and dy W, csrc/multi_lora.cu's segmented tensor-core
  kernels (csrc/tiles.cuh) for the rank-space products, which accumulate onto those outputs.

Validation. Shapes, dtypes and devices are checked on every call. The values of adapter_index and
ranks are checked (ValueError) in eager mode when those tensors are on the CPU, or on every device
when the environment variable LOWRANK_KERNELS_CHECK_INDEX=1 is set: reading them from a GPU would
cost a device synchronisation per call. Unchecked, an index outside [-1, n) acts as -1 (base only) in
every backend, and ranks are clamped to [0, r]: never an out-of-bounds read.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lowrank_kernels import auto_backend as _auto_backend
from lowrank_kernels import backend as _backend
from lowrank_kernels import registry
from lowrank_kernels.ops import _checks, _rng
from lowrank_kernels.ops.multi_lora_kernels import cuda_backward, cuda_forward, group, triton_backward, triton_forward

CHECK_ENV = "LOWRANK_KERNELS_CHECK_INDEX"
# Up to this many (token, slot) pairs a forward without gradient skips the grouping sort.
DECODE_SLOTS = 128


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification
# ----------------------------------------------------------------------------------------------
def _h_dtype(lora_A: Tensor) -> torch.dtype:
    """h, g and the slot coefficients are fp32 (float64 for float64 adapters)."""
    return torch.promote_types(lora_A.dtype, torch.float32)


def _slots_of(key: Tensor, a: int) -> Tensor:
    return (key.reshape(-1) == a).nonzero().squeeze(1)


def _reference_forward(x2, weight, lora_A, lora_B, bias, key, coef, ranks, p, seed):
    """(y, h): differentiable in every tensor argument. key (M, k) holds n for empty slots,
    coef (M, k) the slot coefficients c = s·w, ranks a list of ints."""
    M, K = x2.shape
    kslots = key.shape[1]
    R, adt = lora_A.shape[1], lora_A.dtype
    xd = _rng.dropped(x2, _rng.keep_mask(seed, p, M, K, x2.device), p, adt)
    y = F.linear(x2, weight, bias)
    lora = x2.new_zeros((M, weight.shape[0]), dtype=adt)
    h = x2.new_zeros((key.numel(), R), dtype=_h_dtype(lora_A))
    cflat = coef.reshape(-1)
    for a, ra in enumerate(ranks):
        slots = _slots_of(key, a)
        if slots.numel() == 0 or ra == 0:
            continue
        toks = slots // kslots
        h_a = xd[toks] @ lora_A[a, :ra].t()
        h = h.index_put((slots,), F.pad(h_a.to(h.dtype), (0, R - ra)))
        lora = lora.index_add(0, toks, (h_a @ lora_B[a, :, :ra].t()) * cflat[slots, None].to(adt))
    return (y + lora).to(x2.dtype), h


def _reference_backward(dy, x2, weight, lora_A, lora_B, h, key, coef, ranks, p, seed, need_dx):
    """(dx or None, dA, dB, dcoef (M, k)) by the formulas of the module docstring."""
    M, K = x2.shape
    adt = lora_A.dtype
    keep = _rng.keep_mask(seed, p, M, K, x2.device)
    xd = _rng.dropped(x2, keep, p, adt)
    dy_a = dy.to(adt)
    d_A, d_B = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    dxl = x2.new_zeros((M, K), dtype=adt)
    dcoef = h.new_zeros(key.numel())
    cflat = coef.reshape(-1)
    for a, ra in enumerate(ranks):
        slots = _slots_of(key, a)
        if slots.numel() == 0 or ra == 0:
            continue
        toks = slots // key.shape[1]
        c = cflat[slots, None].to(adt)
        g = dy_a[toks] @ lora_B[a, :, :ra]
        d_A[a, :ra] = (g * c).t() @ xd[toks]
        d_B[a, :, :ra] = dy_a[toks].t() @ (h[slots, :ra].to(adt) * c)
        dcoef[slots] = (g.to(h.dtype) * h[slots, :ra]).sum(1)
        if need_dx:
            dxl.index_add_(0, toks, (g * c) @ lora_A[a, :ra])
    dx = None
    if need_dx:
        if keep is not None:
            dxl = dxl * keep / (1.0 - p)
        dx = dy @ weight + dxl.to(dy.dtype)
    return dx, d_A, d_B, dcoef.reshape(key.shape)


def _reference_fwd(x2, weight, lora_A, lora_B, bias, key, coef, ranks, grouping, p, seed):
    """_reference_forward on the registered op's arguments (the grouping is the kernels')."""
    return _reference_forward(x2, weight, lora_A, lora_B, bias, key, coef, ranks.tolist(), p, seed)


def _reference_bwd(dy, x2, weight, lora_A, lora_B, h, key, coef, ranks, grouping, p, seed, need_dx):
    """_reference_backward on the registered op's arguments."""
    return _reference_backward(dy, x2, weight, lora_A, lora_B, h, key, coef, ranks.tolist(), p, seed, need_dx)


def _grouped_beyond_decode(slots: int) -> bool:
    """Whether a forward without gradient groups its ``slots``: not up to DECODE_SLOTS (Triton
    decodes few slots in arrival order)."""
    return slots > DECODE_SLOTS


def _always_grouped(slots: int) -> bool:
    """The CUDA kernels always work on grouped slots."""
    return True


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------
def _grouping_size(S: int, M: int, n: int, grouped: bool) -> int:
    return S + M + n + 2 if grouped else 0


def _multi_lora_fwd(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor], key: Tensor,
    coef: Tensor, ranks: Tensor, dropout_p: float, seed: Optional[Tensor], backend: str, grouped: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y (M, N), h (S, R), grouping): grouping is empty unless ``grouped`` (see multi_lora_kernels.group)."""
    n = lora_A.shape[0]
    M = x.shape[0]
    grouping = group(key, n) if grouped else key.new_empty((0,))
    if M == 0:
        return x.new_empty((0, weight.shape[0])), x.new_empty((0, lora_A.shape[1]), dtype=_h_dtype(lora_A)), grouping
    y, h = MULTI_LORA.impl(backend).forward(x, weight, lora_A, lora_B, bias, key, coef, ranks, grouping, dropout_p,
                                            _rng.seed_value(seed))
    return y, h, grouping


_fwd_op = torch.library.custom_op("lowrank_kernels::multi_lora_linear_fwd", _multi_lora_fwd, mutates_args=())


@_fwd_op.register_fake
def _(x, weight, lora_A, lora_B, bias, key, coef, ranks, dropout_p, seed, backend, grouped):
    M, S, n = x.shape[0], key.numel(), lora_A.shape[0]
    return (
        x.new_empty((M, weight.shape[0])),
        x.new_empty((S, lora_A.shape[1]), dtype=_h_dtype(lora_A)),
        key.new_empty((_grouping_size(S, M, n, grouped),)),
    )


def _multi_lora_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor, key: Tensor,
    coef: Tensor, ranks: Tensor, grouping: Tensor, dropout_p: float, seed: Optional[Tensor], backend: str,
    need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_lora_A, d_lora_B, d_coef); dx is empty when need_dx is False."""
    expected = _grouping_size(key.numel(), x.shape[0], lora_A.shape[0], True)
    if x.shape[0] and grouping.numel() != expected:
        # the kernels read the slot order through it: a shorter one would be read past its end
        raise ValueError(f"grouping must be the grouping of a forward that grouped its slots ({expected} entries "
                         f"for these shapes), got {grouping.numel()}: call the forward with grouped=True")
    if x.shape[0] == 0:
        dx, dA, dB = torch.zeros_like(x), torch.zeros_like(lora_A), torch.zeros_like(lora_B)
        dc = torch.zeros(key.shape, device=x.device, dtype=_h_dtype(lora_A))
    else:
        dx, dA, dB, dc = MULTI_LORA.impl(backend).backward(dy, x, weight, lora_A, lora_B, h, key, coef, ranks,
                                                           grouping, dropout_p, _rng.seed_value(seed), need_dx)
    if not need_dx:
        dx = x.new_empty((0,))
    return dx.contiguous(), dA.contiguous(), dB.contiguous(), dc.to(_h_dtype(lora_A)).contiguous()


_bwd_op = torch.library.custom_op("lowrank_kernels::multi_lora_linear_bwd", _multi_lora_bwd, mutates_args=())


@_bwd_op.register_fake
def _(dy, x, weight, lora_A, lora_B, h, key, coef, ranks, grouping, dropout_p, seed, backend, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    dc = x.new_empty(key.shape, dtype=_h_dtype(lora_A))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), dc


# ``grouped(slots)``: whether a forward without gradient groups its slots by adapter.
MULTI_LORA = registry.declare(
    "multi_lora_linear", "y_m = x_m Wᵀ + bias + Σ_k w_mk s_k·(x_m A_kᵀ) B_kᵀ over each row's adapters",
    library_ops=(_fwd_op, _bwd_op),
    reference=registry.Impl(registry.REFERENCE, forward=_reference_fwd, backward=_reference_bwd,
                            grouped=_grouped_beyond_decode),
    triton=registry.Impl(registry.TRITON, forward=triton_forward, backward=triton_backward,
                         grouped=_grouped_beyond_decode),
    cuda=registry.Impl(registry.CUDA, forward=cuda_forward, backward=cuda_backward, grouped=_always_grouped),
)


# The caller's tensors behind the registered ops' tensor arguments (see _checks.layout_sources):
# each token's adapter keys, coefficients and the ranks are computed from the public arguments.
_SLOTS = dict(key=("adapter_index",), coef=("scaling", "adapter_weight"), ranks=("ranks",))
LAYOUT_SOURCES = _checks.layout_sources({
    "multi_lora_linear_fwd": {"multi_lora_linear": dict(x="x", weight="weight", lora_A="lora_A", lora_B="lora_B",
                                                        bias="bias", **_SLOTS, seed=None)},
    "multi_lora_linear_bwd": {"multi_lora_linear": dict(dy="grad_output", x="x", weight="weight", lora_A="lora_A",
                                                        lora_B="lora_B", h=None, **_SLOTS, grouping=None,
                                                        seed=None)},
})


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class MultiLoRALinearFunction(torch.autograd.Function):
    """Autograd for the 2-D op; saves x (no copy), h (S, R) fp32 and the grouping."""

    @staticmethod
    def forward(ctx, x2, weight, lora_A, lora_B, bias, key, coef, ranks, dropout_p, seed, backend):
        y, h, grouping = _backend.call_op(
            _fwd_op, _multi_lora_fwd, x2, weight, lora_A, lora_B, bias, key, coef, ranks, dropout_p, seed, backend, True
        )
        ctx.save_for_backward(x2, weight, lora_A, lora_B, h, key, coef, ranks, grouping, seed)
        ctx.dropout_p, ctx.backend = dropout_p, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, h, key, coef, ranks, grouping, seed = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_bias, _, need_c = ctx.needs_input_grad[:7]
        dy = dy.contiguous()
        dx, d_A, d_B, d_c = _backend.call_op(
            _bwd_op, _multi_lora_bwd, dy, x2, weight, lora_A, lora_B, h, key, coef, ranks, grouping,
            ctx.dropout_p, seed, ctx.backend, need_x,
        )
        d_weight = (dy.t() @ x2).to(weight.dtype) if need_w else None
        d_bias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if (need_bias and ctx.has_bias) else None
        return (
            dx if need_x else None, d_weight, d_A if need_a else None, d_B if need_b else None, d_bias,
            None, d_c.to(coef.dtype) if need_c else None, None, None, None, None,
        )


# ----------------------------------------------------------------------------------------------
# Validation, normalisation and the functional entry point
# ----------------------------------------------------------------------------------------------
def _stack_adapters(lora_A: Sequence[Tensor], lora_B: Sequence[Tensor]):
    """A list of adapters (A_i (r_i, K), B_i (N, r_i)) as a zero-padded stack and its ranks.
    Differentiable: the stack's gradient flows back to each A_i and B_i (padding excluded)."""
    if len(lora_A) != len(lora_B) or len(lora_A) == 0:
        raise ValueError("lora_A and lora_B must be lists of the same non-zero length, "
                         f"got {len(lora_A)} and {len(lora_B)}")
    for i, (a, b) in enumerate(zip(lora_A, lora_B)):
        _checks.check_float(f"lora_A[{i}]", a, 2)
        _checks.check_float(f"lora_B[{i}]", b, 2)
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"lora_B[{i}] must be (out_features, {a.shape[0]}) to match lora_A[{i}], "
                             f"got {tuple(b.shape)}")
        if a.dtype != lora_A[0].dtype or b.dtype != lora_A[0].dtype:
            raise TypeError(f"adapter {i} has dtype {a.dtype}/{b.dtype}; every lora_A[i], lora_B[i] must share "
                            f"{lora_A[0].dtype}")
        if a.shape[1] != lora_A[0].shape[1] or b.shape[0] != lora_B[0].shape[0]:
            raise ValueError(f"adapter {i} has shape A {tuple(a.shape)}, B {tuple(b.shape)}: every adapter must "
                             f"share in_features {lora_A[0].shape[1]} and out_features {lora_B[0].shape[0]}")
    r = max(a.shape[0] for a in lora_A)
    A = torch.stack([F.pad(a, (0, 0, 0, r - a.shape[0])) for a in lora_A])
    B = torch.stack([F.pad(b, (0, r - b.shape[1])) for b in lora_B])
    return A, B, torch.tensor([a.shape[0] for a in lora_A], dtype=torch.int32)


def _check_values(adapter_index: Tensor, ranks: Optional[Tensor], n: int, r: int) -> None:
    if torch.compiler.is_compiling():
        return  # a value check is a data-dependent branch: compiled graphs map bad indices to -1
    if adapter_index.device.type == "cpu" or os.environ.get(CHECK_ENV, "0") not in ("", "0"):
        if adapter_index.numel() and (adapter_index.min() < -1 or adapter_index.max() >= n):
            bad = adapter_index[(adapter_index < -1) | (adapter_index >= n)][0].item()
            raise ValueError(f"adapter_index must hold values in [-1, {n}) (n = {n} adapters), got {bad}")
    if ranks is not None and (ranks.device.type == "cpu" or os.environ.get(CHECK_ENV, "0") not in ("", "0")):
        if ranks.numel() and (ranks.min() < 0 or ranks.max() > r):
            raise ValueError(f"ranks must hold values in [0, {r}] (r = lora_A.shape[1]), got {ranks.tolist()}")


def _check_inputs(x, weight, lora_A, lora_B, adapter_index, scaling, bias, dropout_p, seed, adapter_weight, ranks):
    _checks.check_float("weight", weight, 2)
    _checks.check_input(x, weight.shape[1], f"weight (N, K) = {tuple(weight.shape)}")
    N, K = weight.shape
    _checks.check_float("lora_A", lora_A, 3)
    _checks.check_float("lora_B", lora_B, 3)
    n, r = lora_A.shape[:2]
    if n == 0 or r == 0:
        raise ValueError(f"lora_A must be (n, r, K) with n >= 1 adapters and rank r >= 1, got {tuple(lora_A.shape)}")
    if lora_A.shape[2] != K:
        raise ValueError(f"lora_A must be (n, r, {K}) to match weight's in_features, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, N, r):
        raise ValueError(f"lora_B must be (n, out_features, r) = ({n}, {N}, {r}), got {tuple(lora_B.shape)}")
    _checks.check_same_dtype("weight", weight, "x", x)
    _checks.check_same_dtype("lora_B", lora_B, "lora_A", lora_A)
    _checks.check_adapter_dtype(x.dtype, lora_A.dtype, "lora_A")
    _checks.check_bias(bias, N, x)
    M = x.numel() // K if K else 0
    if not isinstance(adapter_index, Tensor):
        raise TypeError(f"adapter_index must be a torch.Tensor of int64, got {type(adapter_index).__name__}")
    if adapter_index.dtype != torch.int64:
        raise TypeError(f"adapter_index must be int64, got {adapter_index.dtype}")
    if adapter_weight is None:
        if adapter_index.numel() != M or adapter_index.shape not in (x.shape[:-1], (M,)):
            raise ValueError(f"adapter_index must have x's leading shape {tuple(x.shape[:-1])} or ({M},), "
                             f"got {tuple(adapter_index.shape)}")
    else:
        _checks.check_float("adapter_weight", adapter_weight)
        _checks.check_adapter_dtype(x.dtype, adapter_weight.dtype, "adapter_weight")
        if adapter_weight.shape != adapter_index.shape:
            raise ValueError(f"adapter_weight must have adapter_index's shape {tuple(adapter_index.shape)}, "
                             f"got {tuple(adapter_weight.shape)}")
        if adapter_index.dim() < 1 or adapter_index.shape[:-1] not in (x.shape[:-1], (M,)):
            raise ValueError(f"with adapter_weight, adapter_index must be (*x.shape[:-1], k) or ({M}, k), "
                             f"got {tuple(adapter_index.shape)}")
    if ranks is not None:
        if not isinstance(ranks, Tensor) or ranks.dtype not in (torch.int32, torch.int64):
            raise TypeError("ranks must be an int32 or int64 tensor of shape (n,)")
        if tuple(ranks.shape) != (n,):
            raise ValueError(f"ranks must be ({n},), one rank per adapter, got {tuple(ranks.shape)}")
    if isinstance(scaling, Tensor):
        _checks.check_float("scaling", scaling, 1)
        if scaling.shape[0] != n:
            raise ValueError(f"scaling must be a float or a ({n},) tensor, one scale per adapter, "
                             f"got {tuple(scaling.shape)}")
    else:
        _checks.check_scalar("scaling", scaling)
    _checks.check_same_device("x", x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias,
                              adapter_index=adapter_index, adapter_weight=adapter_weight,
                              scaling=scaling if isinstance(scaling, Tensor) else None)
    _checks.check_dropout_p(dropout_p)
    _checks.check_seed("seed", seed)
    _check_values(adapter_index, ranks, n, r)


def _prepare(x, lora_A, lora_B, adapter_index, scaling, adapter_weight, ranks):
    """(key (M, k), coef (M, k), ranks (n,) int32 on x's device): empty slots hold key = n; coef
    = s_a · w is formed with torch ops so its gradient reaches adapter_weight and scaling."""
    n, r = lora_A.shape[:2]
    M = x.numel() // x.shape[-1]
    idx = adapter_index.reshape(M, 1 if adapter_weight is None else adapter_index.shape[-1])
    valid = (idx >= 0) & (idx < n)
    key = torch.where(valid, idx, n)
    hdt = _h_dtype(lora_A)
    if isinstance(scaling, Tensor):
        coef = scaling.to(hdt)[key.clamp(max=n - 1)]
    else:
        coef = torch.full(key.shape, float(scaling), device=x.device, dtype=hdt)
    if adapter_weight is not None:
        coef = coef * adapter_weight.reshape(idx.shape).to(hdt)
    coef = torch.where(valid, coef, 0.0)
    if ranks is None:
        ranks = torch.full((n,), r, dtype=torch.int32, device=x.device)
    else:
        ranks = ranks.to(device=x.device, dtype=torch.int32).clamp(0, r)
    # The kernels index these as plain row-major arrays; elementwise results follow their inputs'
    # layout (a transposed adapter_index gives a transposed key), and they are small (M·k, n).
    return key.contiguous(), coef.contiguous(), ranks.contiguous()


@_auto_backend.tuned("multi_lora_linear", rows=("x", "adapter_index", "adapter_weight"))
def multi_lora_linear(x, weight, lora_A, lora_B, adapter_index, scaling=1.0, bias=None, dropout_p=0.0,
                      training=True, seed=None, backend=None, *, adapter_weight=None, ranks=None):
    """Many LoRA adapters in one batch: ``y_m = x_m Wᵀ + bias + s_a · (drop(x_m) A_aᵀ) B_aᵀ``,
    a = adapter_index[m]; or, with ``adapter_weight``, a mixture
    ``y_m = x_m Wᵀ + bias + Σ_j w_mj · s_a · (drop(x_m) A_aᵀ) B_aᵀ``, a = adapter_index[m, j].

    Args:
        x: (..., K) input, float32/float16/bfloat16, any leading dims, may be non-contiguous.
        weight: (N, K) base weight, x's dtype (frozen or trainable). bias: optional (N,).
        lora_A: (n, r, K) and lora_B: (n, N, r), a stack of n adapters (x's dtype or float32); or
            two lists of the adapters' A_i (r_i, K) and B_i (N, r_i), ranks may differ.
        adapter_index: int64, x's leading shape (or (M,)): each token's adapter in [-1, n), -1 for
            the base alone. With ``adapter_weight``: (..., k), k adapters per token.
        scaling: s, a float or an (n,) tensor, one per adapter (alpha_a / r_a in PEFT). A tensor
            that requires grad receives its gradient.
        dropout_p, training, seed: dropout on the adapters' input (one mask per token, from the
            package RNG; seed=None draws one, kept for backward), as in ``lora_linear``.
        backend: None, "reference", "triton" or "cuda" (see lowrank_kernels.backend).
        adapter_weight: (..., k) mixture weights (x's dtype or float32), e.g. a router's top-k
            probabilities; differentiable.
        ranks: optional (n,) int tensor with the stack's per-adapter ranks r_a <= r: rows r_a..r
            of A_a and columns of B_a are padding, skipped by the kernels (no flops beyond the tile
            granularity) and given zero gradient.

    Gradients reach x, weight/bias (when they require grad), every adapter (only from its own
    tokens), adapter_weight and a scaling tensor. Index values are checked on CPU tensors, or on
    any device with LOWRANK_KERNELS_CHECK_INDEX=1; unchecked, an index outside [-1, n) counts as -1.

    Returns:
        (..., N) tensor in x's dtype.
    """
    if isinstance(lora_A, (list, tuple)):
        if ranks is not None:
            raise ValueError("ranks is given by the lists' shapes: pass ranks only with a stacked lora_A")
        lora_A, lora_B, ranks = _stack_adapters(lora_A, lora_B)
    if isinstance(x, Tensor):
        x, weight, lora_A, lora_B, bias = _backend.autocast_inputs(x, weight, lora_A, lora_B, bias)
    _check_inputs(x, weight, lora_A, lora_B, adapter_index, scaling, bias, dropout_p, seed, adapter_weight, ranks)
    backend = _backend.resolve("multi_lora_linear", backend, x=x, lora_A=lora_A)
    p, seed_t = _rng.dropout_seed(dropout_p, training, seed)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    key, coef, ranks_d = _prepare(x, lora_A, lora_B, adapter_index, scaling, adapter_weight, ranks)
    args = (x2, weight, lora_A, lora_B, bias, key, coef, ranks_d, p, seed_t, backend)
    tensors = (x2, weight, lora_A, lora_B, bias, coef)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y = MultiLoRALinearFunction.apply(*args)
    else:
        y, _, _ = _backend.call_op(_fwd_op, _multi_lora_fwd, *args, MULTI_LORA.impl(backend).grouped(key.numel()))
    return y.reshape(*lead, weight.shape[0])


def multi_lora_linear_reference(x, weight, lora_A, lora_B, adapter_index, scaling=1.0, bias=None,
                                dropout_p=0.0, seed=None, *, adapter_weight=None, ranks=None):
    """Differentiable plain-torch multi-adapter LoRA (a loop over adapters), the specification
    every backend is tested against; arguments as multi_lora_linear's. Dropout (``dropout_p > 0``
    and a ``seed``) uses the package's RNG, so it agrees with every backend for the same seed."""
    if isinstance(lora_A, (list, tuple)):
        lora_A, lora_B, ranks = _stack_adapters(lora_A, lora_B)
    lead, K = x.shape[:-1], x.shape[-1]
    key, coef, ranks_d = _prepare(x, lora_A, lora_B, adapter_index, scaling, adapter_weight, ranks)
    y, _ = _reference_forward(x.reshape(-1, K), weight, lora_A, lora_B, bias, key, coef, ranks_d.tolist(),
                              dropout_p, seed)
    return y.reshape(*lead, weight.shape[0])

