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
def _cuda_weight(weight):
    """(binding name suffix, weight arguments): a dense W, or a 4-bit one as its storage and sizes."""
    tensors, sizes = _quant.op_args(weight)
    return ("_4bit" if sizes else ""), (*tensors, *sizes)


def _cuda_forward(x2, weight, lora_A, lora_B, bias, scaling, dropout):
    k0, k1, threshold, keep_scale = gemm.dropout_args(dropout)
    suffix, w_args = _cuda_weight(weight)
    return getattr(_backend.cuda_extension(), "lora_fwd" + suffix)(
        x2, *w_args, lora_A, lora_B, bias, float(scaling), threshold, k0, k1, keep_scale
    )


def _cuda_backward(dy, x2, weight, lora_A, lora_B, h, scaling, dropout, need_dx):
    k0, k1, threshold, keep_scale = gemm.dropout_args(dropout)
    suffix, w_args = _cuda_weight(weight)
    dx, d_lora_A, d_lora_B = getattr(_backend.cuda_extension(), "lora_bwd" + suffix)(
        dy, x2, *w_args, lora_A, lora_B, h, float(scaling), threshold, k0, k1, keep_scale, need_dx
    )
    return (dx if need_dx else None), d_lora_A, d_lora_B


def _kernel_stages(forward, backward) -> dict:
    """The ``forward`` and ``backward`` stages of a backend whose launchers take a gemm.Dropout,
    called as the reference's are: with p and the seed's value."""

    def forward_stage(x2, weight, lora_A, lora_B, bias, scaling, p, seed):
        return forward(x2, weight, lora_A, lora_B, bias, scaling, gemm.Dropout.make(p, seed))

    def backward_stage(dy, x2, weight, lora_A, lora_B, h, scaling, p, seed, need_dx):
        return backward(dy, x2, weight, lora_A, lora_B, h, scaling, gemm.Dropout.make(p, seed), need_dx)

    return dict(forward=forward_stage, backward=backward_stage)


# ----------------------------------------------------------------------------------------------
# torch.library ops: one forward and one backward for a dense or a 4-bit W (a Quant4), each
# registered twice: on W, and on a 4-bit W's storage (ops/_quant.op_args)
# ----------------------------------------------------------------------------------------------
def _fwd_outputs(x: Tensor, out_features: int, lora_A: Tensor) -> tuple[Tensor, Tensor]:
    """(y, h) allocated: the fake implementations' results, and the real ones for an empty batch."""
    return (x.new_empty((x.shape[0], out_features)),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=_h_dtype(lora_A)))


def _bwd_outputs(x: Tensor, lora_A: Tensor, lora_B: Tensor, need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, d_lora_A, d_lora_B) allocated, for the fake implementations."""
    return x.new_empty(x.shape if need_dx else (0,)), torch.empty_like(lora_A), torch.empty_like(lora_B)


def _lora_fwd(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
    scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (y, h); ``weight`` is W, or a Quant4 from the 4-bit registration."""
    if x.shape[0] == 0:
        return _fwd_outputs(x, weight.shape[0], lora_A)
    return LORA.impl(backend).forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, _rng.seed_value(seed))


def _lora_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
    scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, d_lora_A, d_lora_B); dx is an empty tensor when need_dx is False."""
    if x.shape[0] == 0:
        dx, dA, dB = torch.zeros_like(x), torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    else:
        dx, dA, dB = LORA.impl(backend).backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p,
                                                 _rng.seed_value(seed), need_dx)
    if not need_dx:
        dx = x.new_empty((0,))
    return dx.contiguous(), dA.contiguous(), dB.contiguous()


def _lora_4bit_fwd(
    x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
    offset: Optional[Tensor], blocksize: int, blocksize2: int, out_features: int, lora_A: Tensor, lora_B: Tensor,
    bias: Optional[Tensor], scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str,
) -> tuple[Tensor, Tensor]:
    q = _quant.quant4(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, x.shape[1])
    return _lora_fwd(x, q, lora_A, lora_B, bias, scaling, dropout_p, seed, backend)


def _lora_4bit_bwd(
    dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
    code2: Optional[Tensor], offset: Optional[Tensor], blocksize: int, blocksize2: int, lora_A: Tensor,
    lora_B: Tensor, h: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    q = _quant.quant4(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, dy.shape[1], x.shape[1])
    return _lora_bwd(dy, x, q, lora_A, lora_B, h, scaling, dropout_p, seed, backend, need_dx)


_lora_fwd_op = torch.library.custom_op("lowrank_kernels::lora_linear_fwd", _lora_fwd, mutates_args=())
_lora_bwd_op = torch.library.custom_op("lowrank_kernels::lora_linear_bwd", _lora_bwd, mutates_args=())
_lora_4bit_fwd_op = torch.library.custom_op("lowrank_kernels::lora_linear_4bit_fwd", _lora_4bit_fwd, mutates_args=())
_lora_4bit_bwd_op = torch.library.custom_op("lowrank_kernels::lora_linear_4bit_bwd", _lora_4bit_bwd, mutates_args=())


@_lora_fwd_op.register_fake
def _(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    return _fwd_outputs(x, weight.shape[0], lora_A)


@_lora_bwd_op.register_fake
def _(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, backend, need_dx):
    return _bwd_outputs(x, lora_A, lora_B, need_dx)


@_lora_4bit_fwd_op.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, lora_A, lora_B, bias,
      scaling, dropout_p, seed, backend):
    return _fwd_outputs(x, out_features, lora_A)


@_lora_4bit_bwd_op.register_fake
def _(dy, x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, lora_A, lora_B, h, scaling,
      dropout_p, seed, backend, need_dx):
    return _bwd_outputs(x, lora_A, lora_B, need_dx)


LORA = registry.declare(
    "lora_linear", "y = x Wᵀ + bias + s·(drop(x) Aᵀ) Bᵀ; W dense or bitsandbytes 4-bit",
    library_ops=(_lora_fwd_op, _lora_bwd_op, _lora_4bit_fwd_op, _lora_4bit_bwd_op),
    reference=registry.Impl(registry.REFERENCE, quant4=registry.REFERENCE, forward=_reference_forward,
                            backward=_reference_backward),
    triton=registry.Impl(registry.TRITON, quant4=registry.TRITON, **_kernel_stages(_triton_forward, _triton_backward)),
    cuda=registry.Impl(registry.CUDA, quant4=registry.CUDA_16BIT, **_kernel_stages(_cuda_forward, _cuda_backward)),
)


# The caller's tensors behind the registered ops' tensor arguments (see _checks.layout_sources);
# "lora_linear_4bit" is lora_linear on a bitsandbytes 4-bit weight, whose storage is bnb's.
LAYOUT_SOURCES = _checks.layout_sources({
    "lora_linear_fwd": {"lora_linear": dict(x="x", weight="weight", lora_A="lora_A", lora_B="lora_B", bias="bias",
                                            seed=None)},
    "lora_linear_bwd": {"lora_linear": dict(dy="grad_output", x="x", weight="weight", lora_A="lora_A",
                                            lora_B="lora_B", h=None, seed=None)},
    "lora_linear_4bit_fwd": {"lora_linear_4bit": dict(x="x", **_checks.QUANT4_STORAGE, lora_A="lora_A",
                                                      lora_B="lora_B", bias="bias", seed=None)},
    "lora_linear_4bit_bwd": {"lora_linear_4bit": dict(dy="grad_output", x="x", **_checks.QUANT4_STORAGE,
                                                      lora_A="lora_A", lora_B="lora_B", h=None, seed=None)},
})


# ----------------------------------------------------------------------------------------------
# Autograd: one Function for a dense and a 4-bit W, which travels as its tensors and sizes
# (ops/_quant.op_args); which registration runs follows from the sizes alone
# ----------------------------------------------------------------------------------------------
def forward_op(x2, lora_A, lora_B, bias, scaling, p, seed, backend, w_sizes, *w):
    """(y, h) by the registered forward, W given as ``_quant.op_args`` gives it: its sizes
    ``w_sizes`` (none for a dense W) and tensors ``w``."""
    op, impl = (_lora_4bit_fwd_op, _lora_4bit_fwd) if w_sizes else (_lora_fwd_op, _lora_fwd)
    return _backend.call_op(op, impl, x2, *w, *w_sizes, lora_A, lora_B, bias, scaling, p, seed, backend)


def backward_op(dy, x2, lora_A, lora_B, h, scaling, p, seed, backend, need_dx, w_sizes, *w):
    """(dx, d_lora_A, d_lora_B) by the registered backward, W given as for forward_op (the 4-bit
    registration reads out_features from dy)."""
    op, impl = (_lora_4bit_bwd_op, _lora_4bit_bwd) if w_sizes else (_lora_bwd_op, _lora_bwd)
    return _backend.call_op(op, impl, dy, x2, *w, *w_sizes[:2], lora_A, lora_B, h, scaling, p, seed, backend,
                            need_dx)


def run_op(function, forward_op, x, weight, tensors: tuple, args: tuple) -> Tensor:
    """y (..., N) of an op on x flattened to 2-D and W (dense or a Quant4): its autograd
    ``function`` where autograd records the call on x, W or ``tensors``, else its registered
    forward through ``forward_op`` (y its first result). Both take (x2, *tensors, *args, W's sizes,
    *W's tensors), W as ``_quant.op_args`` gives it."""
    x2 = x.reshape(-1, x.shape[-1])
    w, w_sizes = _quant.op_args(weight)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (x2, *tensors, *w)):
        y = function.apply(x2, *tensors, *args, w_sizes, *w)
    else:
        y = forward_op(x2, *tensors, *args, w_sizes, *w)[0]
    return y.reshape(*x.shape[:-1], weight.shape[0])


def bias_grad(dy: Tensor) -> Tensor:
    """dbias = Σ_m dy, summed in fp32."""
    return dy.sum(0, dtype=torch.float32).to(dy.dtype)


class LoRALinearFunction(torch.autograd.Function):
    """Autograd for the 2-D op, W given as its tensors ``w`` and sizes ``w_sizes``
    (ops/_quant.op_args): a dense W, trainable or frozen, or a frozen 4-bit one's storage. Saves x
    (no copy), h (M, r) fp32 and W's tensors."""

    @staticmethod
    def forward(ctx, x2, lora_A, lora_B, bias, scaling, dropout_p, seed, backend, w_sizes, *w):
        y, h = forward_op(x2, lora_A, lora_B, bias, scaling, dropout_p, seed, backend, w_sizes, *w)
        ctx.save_for_backward(x2, lora_A, lora_B, h, seed, *w)
        ctx.w_sizes, ctx.scaling, ctx.dropout_p, ctx.backend = w_sizes, scaling, dropout_p, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, lora_A, lora_B, h, seed, *w = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        need_w = ctx.needs_input_grad[9]  # W's first tensor: only a dense W can require grad
        dy = dy.contiguous()
        dx, d_lora_A, d_lora_B = backward_op(dy, x2, lora_A, lora_B, h, ctx.scaling, ctx.dropout_p, seed, ctx.backend,
                                              need_x, ctx.w_sizes, *w)
        return (
            dx if need_x else None,
            d_lora_A if need_a else None,
            d_lora_B if need_b else None,
            bias_grad(dy) if (need_bias and ctx.has_bias) else None,
            None, None, None, None, None,
            (dy.t() @ x2).to(w[0].dtype) if need_w else None,
            *(None for _ in w[1:]),
        )


# ----------------------------------------------------------------------------------------------
# Validation and the functional entry point
# ----------------------------------------------------------------------------------------------
def check_adapters(weight, lora_A, lora_B, scaling) -> None:
    """W (dense, or a Quant4, whose storage bnb made) and the adapters: kinds, shapes, scaling."""
    if not isinstance(weight, _quant.Quant4):
        _checks.check_float("weight", weight, 2)
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
    _checks.check_same_dtype("lora_B", lora_B, "lora_A", lora_A)
    _checks.check_scalar("scaling", scaling)


def check_input(x, weight, lora_A) -> None:
    """x against W (a dense W shares x's dtype; a Quant4 is computed in it) and lora_A's dtype."""
    quant = isinstance(weight, _quant.Quant4)
    _checks.check_input(x, weight.shape[1], f"{'the 4-bit ' if quant else ''}weight (N, K) = {tuple(weight.shape)}")
    if not quant:
        _checks.check_same_dtype("weight", weight, "x", x)
    _checks.check_adapter_dtype(x.dtype, lora_A.dtype, "lora_A")


def autocast_inputs(x, weight, *tensors) -> tuple:
    """(x, weight, *tensors) cast as ``backend.autocast_inputs`` casts them; a Quant4 W unchanged."""
    if not isinstance(x, Tensor):
        return (x, weight, *tensors)
    if isinstance(weight, Tensor):
        return _backend.autocast_inputs(x, weight, *tensors)
    x, *tensors = _backend.autocast_inputs(x, *tensors)
    return (x, weight, *tensors)


@_auto_backend.tuned("lora_linear")
def lora_linear(x, weight, lora_A, lora_B, scaling=1.0, bias=None, dropout_p=0.0, training=True, seed=None,
                backend=None):
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
    x, weight, lora_A, lora_B, bias = autocast_inputs(x, _quant.base_weight(weight), lora_A, lora_B, bias)
    check_adapters(weight, lora_A, lora_B, scaling)
    check_input(x, weight, lora_A)
    _checks.check_bias(bias, weight.shape[0], x)
    _checks.check_same_device("x", x, **_quant.device_tensors(weight), lora_A=lora_A, lora_B=lora_B, bias=bias)
    _checks.check_dropout_p(dropout_p)
    _checks.check_seed("seed", seed)
    quant = isinstance(weight, _quant.Quant4)
    backend = _backend.resolve("lora_linear", backend, x=x, lora_A=lora_A, weight_4bit=quant)
    p, seed_t = _rng.dropout_seed(dropout_p, training, seed)
    return run_op(LoRALinearFunction, forward_op, x, weight, (lora_A, lora_B, bias),
                  (float(scaling), p, seed_t, backend))
