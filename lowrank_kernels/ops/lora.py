"""Fused LoRA linear: y = x Wᵀ + bias + s · (drop(x) Aᵀ) Bᵀ.

Shapes (x flattened to (M, K) over its leading dims): weight W (N, K), lora_A A (r, K),
lora_B B (N, r), bias (N). The same tensors and semantics as PEFT's LoRA ``Linear``
(``lora_A.weight``, ``lora_B.weight``), with s = alpha / r (or alpha / sqrt(r) for rsLoRA).

Forward, with h = drop(x) Aᵀ (M, r), kept for backward:
    y = x Wᵀ + bias + s · h Bᵀ
Backward, with g = dy B (M, r) and drop' the same mask and 1/(1-p) scale as the forward:
    dx = dy W + s · drop'(g A)      dA = s · gᵀ drop(x)      dB = s · dyᵀ h
    dW = dyᵀ x  (only if W requires grad)     dbias = Σ_m dy

Precision: x, W (and bias) share one dtype (the base dtype, also the output's); A and B share
one dtype, either the base's or fp32 on a bf16/fp16 base (PEFT's default). Adapter products run
in the adapter dtype; every kernel accumulates in fp32.

Dropout draws its mask from (seed, token, feature) with the package's counter-based RNG
(ops/_rng.py): the same mask in every backend, regenerated in backward instead of stored.

Implementations, selected per call by ``backend`` (see lowrank_kernels.backend):
- reference: plain torch, the specification.
- triton: two launches forward (the skinny h = drop(x)Aᵀ, then one GEMM computing x Wᵀ with
  s·h Bᵀ as extra K-steps of the same accumulator and the bias in the epilogue: no (M, N)
  temporary) and four backward (g = dy B; dx = dy W + s·drop'(g A) as one GEMM with the masked
  tail; dA and dB as deterministic split-M reductions).
- cuda: cuBLAS (through ATen) for the two big GEMMs with the low-rank term accumulated into the
  output (beta = 1), custom kernels (csrc/lora.cu) for the dropout-fused skinny products.

QLoRA: ``weight`` may be a bitsandbytes 4-bit parameter (``bnb.nn.Params4bit`` with its
``quant_state``: NF4 or FP4, any blocksize bnb allows, nested absmax or not; ops/_quant.py). Then
W[n, k] = code[q] · absmax[block] rounded once to x's dtype (bnb's dequantize_4bit(..., x.dtype),
what its 4-bit matmul computes with), W is frozen (no dW), and the same math runs with W read from
its packed storage: the reference dequantises it (the specification), the Triton GEMMs
dequantise each W tile in registers inside their main loop (forward x Wᵀ and backward dy W alike),
and the CUDA path dequantises each tile into shared memory for its tensor-core loop
(csrc/lora.cu); neither ever holds the dequantised W in memory.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lowrank_kernels import auto_backend as _auto_backend
from lowrank_kernels import backend as _backend
from lowrank_kernels import registry
from lowrank_kernels.ops import _checks, _quant, _rng, gemm



# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification
# ----------------------------------------------------------------------------------------------
def lora_linear_reference(x, weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, seed=None):
    """Differentiable plain-torch LoRA linear with PEFT's order of operations.

    Dropout (when ``dropout_p > 0`` and ``seed`` is given) uses the package's RNG, so this
    agrees with every backend for the same seed.
    """
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    keep = _rng.keep_mask(seed, dropout_p, x2.shape[0], K, x.device)
    y = torch.nn.functional.linear(x2, weight, bias)
    lora = (_rng.dropped(x2, keep, dropout_p, lora_A.dtype) @ lora_A.t()) @ lora_B.t()
    return (y + lora * scaling).to(x.dtype).reshape(*lead, weight.shape[0])


def _dense(weight, dtype: torch.dtype) -> Tensor:
    """The base weight as a matrix: itself, or a 4-bit one dequantised to ``dtype`` (the reference)."""
    return weight if isinstance(weight, Tensor) else _quant.dequantize(weight, dtype)


def _h_dtype(lora_A: Tensor) -> torch.dtype:
    """h is kept in fp32 (float64 for float64 adapters on the reference backend)."""
    return torch.promote_types(lora_A.dtype, torch.float32)


def _reference_forward(x2, weight, lora_A, lora_B, bias, scaling, p, seed):
    keep = _rng.keep_mask(seed, p, x2.shape[0], x2.shape[1], x2.device)
    h = _rng.dropped(x2, keep, p, lora_A.dtype) @ lora_A.t()
    y = torch.nn.functional.linear(x2, _dense(weight, x2.dtype), bias)
    return (y + (h @ lora_B.t()) * scaling).to(x2.dtype), h.to(_h_dtype(lora_A))


def _reference_backward(dy, x2, weight, lora_A, lora_B, h, scaling, p, seed, need_dx):
    adt = lora_A.dtype
    keep = _rng.keep_mask(seed, p, x2.shape[0], x2.shape[1], x2.device)
    dy_a = dy.to(adt)
    g = dy_a @ lora_B
    d_lora_A = (g.t() @ _rng.dropped(x2, keep, p, adt)) * scaling
    d_lora_B = (dy_a.t() @ h.to(adt)) * scaling
    dx = None
    if need_dx:
        dxd = (g @ lora_A) * scaling
        if keep is not None:
            dxd = dxd * keep / (1.0 - p)
        dx = dy @ _dense(weight, dy.dtype) + dxd.to(dy.dtype)
    return dx, d_lora_A, d_lora_B


# ----------------------------------------------------------------------------------------------
# Triton launchers (kernels in ops/gemm.py)
# ----------------------------------------------------------------------------------------------
def _triton_forward(x2, weight, lora_A, lora_B, bias, scaling, dropout, out=None):
    h = gemm.down_proj(x2, lora_A, lora_A.dtype, dropout=dropout)
    y = gemm.lowrank_gemm(x2, weight, h, lora_B, scaling, lora_A.dtype, bias=bias, out=out)
    return y, h


def _triton_backward(dy, x2, weight, lora_A, lora_B, h, scaling, dropout, need_dx):
    adt = lora_A.dtype
    g = gemm.down_proj(dy, lora_B.t(), adt)
    d_lora_B = (gemm.outer_reduce(h, dy, adt) * scaling).t().to(adt)
    d_lora_A = (gemm.outer_reduce(g, x2, adt, dropout=dropout) * scaling).to(adt)
    dx = None
    if need_dx:
        dx = gemm.lowrank_gemm(dy, weight.t(), g, lora_A.t(), scaling, adt, tail_dropout=dropout)
    return dx, d_lora_A, d_lora_B


# ----------------------------------------------------------------------------------------------
# CUDA launchers (csrc/lora.cu, csrc/lora_binding.cpp)
# ----------------------------------------------------------------------------------------------
def _cuda_dropout_args(dropout):
    return tuple(dropout) if dropout is not None else (0, 0, 0, 1.0)


def _cuda_weight(weight):
    """(binding name suffix, weight arguments): a dense W, or a 4-bit one as its storage."""
    if isinstance(weight, Tensor):
        return "", (weight,)
    return "_4bit", (*weight.tensors(), weight.blocksize, weight.blocksize2, weight.n)


def _cuda_forward(x2, weight, lora_A, lora_B, bias, scaling, dropout):
    k0, k1, threshold, keep_scale = _cuda_dropout_args(dropout)
    suffix, w_args = _cuda_weight(weight)
    return getattr(_backend.cuda_extension(), "lora_fwd" + suffix)(
        x2, *w_args, lora_A, lora_B, bias, float(scaling), threshold, k0, k1, keep_scale
    )


def _cuda_backward(dy, x2, weight, lora_A, lora_B, h, scaling, dropout, need_dx):
    k0, k1, threshold, keep_scale = _cuda_dropout_args(dropout)
    suffix, w_args = _cuda_weight(weight)
    dx, d_lora_A, d_lora_B = getattr(_backend.cuda_extension(), "lora_bwd" + suffix)(
        dy, x2, *w_args, lora_A, lora_B, h, float(scaling), threshold, k0, k1, keep_scale, need_dx
    )
    return (dx if need_dx else None), d_lora_A, d_lora_B


# ----------------------------------------------------------------------------------------------
# torch.library ops: one forward and one backward op, each dispatching on `backend`
# ----------------------------------------------------------------------------------------------
def _seed_value(seed: Optional[Tensor]) -> Optional[int]:
    # The seed travels as a CPU int64 tensor so torch.compile traces its draw without a graph
    # break; reading it here costs no device synchronisation.
    return None if seed is None else int(seed.item())


def _lora_fwd(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
    scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str,
) -> tuple[Tensor, Tensor]:
    s = _seed_value(seed)
    if x.shape[0] == 0:
        return (x.new_empty((0, weight.shape[0])), x.new_empty((0, lora_A.shape[0]), dtype=_h_dtype(lora_A)))
    if backend == "reference":
        return _reference_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, s)
    dropout = gemm.Dropout.make(dropout_p, s)
    if backend == "triton":
        return _triton_forward(x, weight, lora_A, lora_B, bias, scaling, dropout)
    return _cuda_forward(x, weight, lora_A, lora_B, bias, scaling, dropout)


_lora_fwd_op = torch.library.custom_op("lowrank_kernels::lora_linear_fwd", _lora_fwd, mutates_args=())


@_lora_fwd_op.register_fake
def _(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    return (
        x.new_empty((x.shape[0], weight.shape[0])),
        x.new_empty((x.shape[0], lora_A.shape[0]), dtype=_h_dtype(lora_A)),
    )


def _lora_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
    scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, d_lora_A, d_lora_B); dx is an empty tensor when need_dx is False."""
    s = _seed_value(seed)
    if x.shape[0] == 0:
        dx, dA, dB = torch.zeros_like(x), torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    elif backend == "reference":
        dx, dA, dB = _reference_backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, s, need_dx)
    else:
        dropout = gemm.Dropout.make(dropout_p, s)
        impl = _triton_backward if backend == "triton" else _cuda_backward
        dx, dA, dB = impl(dy, x, weight, lora_A, lora_B, h, scaling, dropout, need_dx)
    if not need_dx:
        dx = x.new_empty((0,))
    return dx.contiguous(), dA.contiguous(), dB.contiguous()


_lora_bwd_op = torch.library.custom_op("lowrank_kernels::lora_linear_bwd", _lora_bwd, mutates_args=())


@_lora_bwd_op.register_fake
def _(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, backend, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


# The 4-bit base: the same implementations, with W passed as its storage (ops/_quant.Quant4).
def _quant4(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features):
    return _quant.Quant4(packed, absmax, code, blocksize, out_features, in_features, absmax2, code2, offset, blocksize2)


def _lora_4bit_fwd(
    x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
    offset: Optional[Tensor], blocksize: int, blocksize2: int, out_features: int, lora_A: Tensor, lora_B: Tensor,
    bias: Optional[Tensor], scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str,
) -> tuple[Tensor, Tensor]:
    q = _quant4(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, x.shape[1])
    return _lora_fwd(x, q, lora_A, lora_B, bias, scaling, dropout_p, seed, backend)


_lora_4bit_fwd_op = torch.library.custom_op("lowrank_kernels::lora_linear_4bit_fwd", _lora_4bit_fwd, mutates_args=())


@_lora_4bit_fwd_op.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, lora_A, lora_B, bias,
      scaling, dropout_p, seed, backend):
    return (
        x.new_empty((x.shape[0], out_features)),
        x.new_empty((x.shape[0], lora_A.shape[0]), dtype=_h_dtype(lora_A)),
    )


def _lora_4bit_bwd(
    dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
    code2: Optional[Tensor], offset: Optional[Tensor], blocksize: int, blocksize2: int, lora_A: Tensor,
    lora_B: Tensor, h: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, d_lora_A, d_lora_B); dx is an empty tensor when need_dx is False."""
    q = _quant4(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, dy.shape[1], x.shape[1])
    return _lora_bwd(dy, x, q, lora_A, lora_B, h, scaling, dropout_p, seed, backend, need_dx)


_lora_4bit_bwd_op = torch.library.custom_op("lowrank_kernels::lora_linear_4bit_bwd", _lora_4bit_bwd, mutates_args=())


@_lora_4bit_bwd_op.register_fake
def _(dy, x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, lora_A, lora_B, h, scaling,
      dropout_p, seed, backend, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)



# The caller's tensors behind the registered ops' tensor arguments (see _checks.layout_sources);
# "lora_linear_4bit" is lora_linear on a bitsandbytes 4-bit weight, whose storage is bnb's.
LAYOUT_SOURCES = _checks.layout_sources({
    "lora_linear_fwd": {"lora_linear": dict(x="x", weight="weight", lora_A="lora_A", lora_B="lora_B", bias="bias",
                                            seed=None)},
    "lora_linear_bwd": {"lora_linear": dict(dy="grad_output", x="x", weight="weight", lora_A="lora_A",
                                            lora_B="lora_B", h=None, seed=None)},
    "lora_linear_4bit_fwd": {"lora_linear_4bit": dict(x="x", **_checks.QUANT4_STORAGE, lora_A="lora_A", lora_B="lora_B",
                                                      bias="bias", seed=None)},
    "lora_linear_4bit_bwd": {"lora_linear_4bit": dict(dy="grad_output", x="x", **_checks.QUANT4_STORAGE, lora_A="lora_A",
                                                      lora_B="lora_B", h=None, seed=None)},
})


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class LoRALinearFunction(torch.autograd.Function):
    """Autograd for the 2-D op; saves x (no copy) and h (M, r) fp32 only."""

    @staticmethod
    def forward(ctx, x2, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
        y, h = _backend.call_op(
            _lora_fwd_op, _lora_fwd, x2, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend
        )
        ctx.save_for_backward(x2, weight, lora_A, lora_B, h, seed)
        ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, h, seed = ctx.saved_tensors
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        dx, d_lora_A, d_lora_B = _backend.call_op(
            _lora_bwd_op, _lora_bwd, dy, x2, weight, lora_A, lora_B, h, ctx.scaling, ctx.dropout_p, seed, ctx.backend, need_x
        )
        d_weight = (dy.t() @ x2).to(weight.dtype) if need_w else None
        d_bias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if (need_bias and ctx.has_bias) else None
        return (
            dx if need_x else None,
            d_weight,
            d_lora_A if need_a else None,
            d_lora_B if need_b else None,
            d_bias,
            None, None, None, None,
        )


class LoRA4bitLinearFunction(torch.autograd.Function):
    """Autograd for the 2-D op on a frozen 4-bit W (no dW); saves x (no copy), h (M, r) fp32 and
    references to W's packed storage."""

    @staticmethod
    def forward(ctx, x2, lora_A, lora_B, bias, q_tensors, q_sizes, scaling, dropout_p, seed, backend):
        y, h = _backend.call_op(
            _lora_4bit_fwd_op, _lora_4bit_fwd, x2, *q_tensors, *q_sizes, lora_A, lora_B, bias, scaling, dropout_p,
            seed, backend,
        )
        ctx.save_for_backward(x2, lora_A, lora_B, h, seed, *q_tensors)
        ctx.q_sizes = q_sizes[:2]
        ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, lora_A, lora_B, h, seed, *q_tensors = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        dy = dy.contiguous()
        dx, d_lora_A, d_lora_B = _backend.call_op(
            _lora_4bit_bwd_op, _lora_4bit_bwd, dy, x2, *q_tensors, *ctx.q_sizes, lora_A, lora_B, h, ctx.scaling,
            ctx.dropout_p, seed, ctx.backend, need_x,
        )
        d_bias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if (need_bias and ctx.has_bias) else None
        return (
            dx if need_x else None,
            d_lora_A if need_a else None,
            d_lora_B if need_b else None,
            d_bias,
            None, None, None, None, None, None,
        )


# ----------------------------------------------------------------------------------------------
# Validation and the functional entry point
# ----------------------------------------------------------------------------------------------
def _check_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed):
    quant = isinstance(weight, _quant.Quant4)
    if not quant:
        _checks.check_float("weight", weight, 2)
    _checks.check_input(x, weight.shape[1], f"{'the 4-bit ' if quant else ''}weight (N, K) = {tuple(weight.shape)}")
    _checks.check_float("lora_A", lora_A, 2)
    _checks.check_float("lora_B", lora_B, 2)
    N, K = weight.shape
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError("lora_A has rank 0: the rank r (lora_A.shape[0]) must be >= 1")
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A must be (r, {K}) to match weight's in_features, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B must be (out_features, r) = ({N}, {r}), got {tuple(lora_B.shape)}")
    if not quant:
        _checks.check_same_dtype("weight", weight, "x", x)
    _checks.check_same_dtype("lora_B", lora_B, "lora_A", lora_A)
    _checks.check_adapter_dtype(x.dtype, lora_A.dtype, "lora_A")
    _checks.check_bias(bias, N, x)
    _checks.check_same_device("x", x, weight=weight.packed if quant else weight, lora_A=lora_A, lora_B=lora_B,
                              bias=bias)
    if quant:
        _checks.check_same_device("x", x, **dict(zip(("weight.quant_state.absmax", "weight.quant_state.code",
                                                      "weight.quant_state.state2.absmax",
                                                      "weight.quant_state.state2.code", "weight.quant_state.offset"),
                                                     weight.tensors()[1:])))
    _checks.check_scalar("scaling", scaling)
    _checks.check_dropout_p(dropout_p)
    _checks.check_seed("seed", seed)


@_auto_backend.tuned("lora_linear")
def lora_linear(x, weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, training=True, seed=None, backend=None):
    """Fused LoRA linear: ``x Wᵀ + bias + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Args:
        x: (..., K) input, float32/float16/bfloat16, any leading dims, may be non-contiguous.
        weight: (N, K) base weight, x's dtype (frozen or trainable); or a frozen bitsandbytes
            4-bit ``Params4bit`` (NF4/FP4, any bnb blocksize, nested absmax or not) whose
            quant_state.shape is (N, K), dequantised to x's dtype tile by tile (QLoRA). x may then be
            float32, float16 or bfloat16 (on the CUDA backend 16-bit only).
        lora_A: (r, K), lora_B: (N, r): PEFT's ``lora_A.weight`` / ``lora_B.weight``; x's dtype
            or float32.
        scaling: s = alpha / r (alpha / sqrt(r) for rsLoRA).
        bias: optional (N,), x's dtype.
        dropout_p: dropout probability on the adapter's input, in [0, 1); active only when
            ``training`` is True.
        seed: dropout seed (int in [0, 2**62)); None draws one from torch's default generator,
            kept for backward so activation checkpointing recomputes the same mask.
        backend: None, "reference", "triton" or "cuda" (see lowrank_kernels.backend).

    Under torch.autocast every operand is cast to the autocast dtype first, as the unfused
    nn.Linear and adapter matmuls would be.

    Returns:
        (..., N) tensor in x's dtype. Under torch.no_grad / inference_mode nothing is saved.
    """
    if _quant.is_4bit(weight):
        if weight.requires_grad:
            raise ValueError("weight: a 4-bit base weight is frozen; it must not require grad")
        weight = _quant.from_params4bit(weight)
    if isinstance(x, Tensor) and isinstance(weight, Tensor):
        x, weight, lora_A, lora_B, bias = _backend.autocast_inputs(x, weight, lora_A, lora_B, bias)
    elif isinstance(x, Tensor):
        x, lora_A, lora_B, bias = _backend.autocast_inputs(x, lora_A, lora_B, bias)
    _check_inputs(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)
    backend = _backend.resolve("lora_linear", backend, x=x, lora_A=lora_A, weight_4bit=isinstance(weight, _quant.Quant4))
    p = float(dropout_p) if training else 0.0
    seed_t = _rng.seed_tensor(seed) if p > 0.0 else None
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, weight, lora_A, lora_B, bias)
                                            if isinstance(t, Tensor))
    if isinstance(weight, _quant.Quant4):
        q_tensors, q_sizes = weight.tensors(), (weight.blocksize, weight.blocksize2, weight.n)
        if grad:
            y = LoRA4bitLinearFunction.apply(x2, lora_A, lora_B, bias, q_tensors, q_sizes, float(scaling), p, seed_t,
                                             backend)
        else:
            y, _ = _backend.call_op(_lora_4bit_fwd_op, _lora_4bit_fwd, x2, *q_tensors, *q_sizes, lora_A, lora_B, bias,
                                    float(scaling), p, seed_t, backend)
    else:
        args = (x2, weight, lora_A, lora_B, bias, float(scaling), p, seed_t, backend)
        y = LoRALinearFunction.apply(*args) if grad else _backend.call_op(_lora_fwd_op, _lora_fwd, *args)[0]
    return y.reshape(*lead, weight.shape[0])


LORA = registry.declare(
    "lora_linear", "y = x Wᵀ + bias + s·(drop(x) Aᵀ) Bᵀ; W dense or bitsandbytes 4-bit",
    library_ops=(_lora_fwd_op, _lora_bwd_op, _lora_4bit_fwd_op, _lora_4bit_bwd_op),
    reference=registry.Impl(registry.REFERENCE, quant4=registry.REFERENCE),
    triton=registry.Impl(registry.TRITON, quant4=registry.TRITON),
    cuda=registry.Impl(registry.CUDA, quant4=registry.CUDA_16BIT),
)
