"""Fused DoRA linear: y = γ ⊙ (x Wᵀ + s · (drop(x) Aᵀ) Bᵀ) + bias, γ = m / ‖W + s·BA‖_c.

Shapes (x flattened to (M, K) over its leading dims): weight W (N, K), lora_A A (r, K), lora_B
B (N, r), magnitude m (N), bias (N): PEFT's ``base_layer.weight``, ``lora_A.weight``,
``lora_B.weight`` and ``lora_magnitude_vector[adapter].weight``. ‖·‖_c is the norm of each output
row W_j + s(BA)_j (PEFT's ``torch.linalg.norm(W + s·BA, dim=1)``), treated as a constant in
backward (DoRA paper §4.3, PEFT's ``weight_norm.detach()``): n_j = ‖W_j + s(BA)_j‖, γ_j = m_j / n_j.

PEFT's order of operations (``DoraLinearLayer.forward`` under ``DoraLinearVariant.forward``), with
x̃ = drop(x) and h = x̃ Aᵀ (M, r):
    no dropout (p = 0, eval, nn.Identity):  y = x Wᵀ + bias + (γ − 1) ⊙ x Wᵀ + γ ⊙ s·h Bᵀ
                                             = γ ⊙ v + bias,                  v = x Wᵀ + s·h Bᵀ
    dropout active:                          y = x Wᵀ + bias + (γ − 1) ⊙ x̃ Wᵀ + γ ⊙ s·h Bᵀ
                                             = x Wᵀ + s·h Bᵀ + bias + (γ − 1) ⊙ v,  v = x̃ Wᵀ + s·h Bᵀ
(PEFT applies the magnitude's (γ − 1) to the base layer on the *dropped* input: with dropout the
base GEMM runs twice, on x and on x̃, in PEFT and here alike.)

Backward, γ constant, dy (M, N), ŷ = γ ⊙ dy, dz = (γ − 1) ⊙ dy, g = ŷ B (M, r), drop' the
forward's mask and 1/(1−p) scale (the identity without dropout):
    dx = dy W + drop'(dz W) + s·drop'(g A)  =  [ŷ W + s·drop'(g A)] + (drop' − 1)(dz W)
    dA = s·gᵀ x̃        dB = s·ŷᵀ h        dm_j = Σ_i dy_ij v_ij / n_j
    dW = dyᵀ x + dzᵀ x̃ (= ŷᵀ x without dropout; only if W requires grad)     dbias = Σ_i dy_i
The bracket is LoRA's backward with dy replaced by ŷ (the registered lora_linear_bwd op), so
without dropout the whole backward is LoRA's on ŷ plus the column dot for dm.

The norms without forming W + s·BA (N×K). Expanding the square of row j,
    n_j² = ‖W_j‖² + 2s·Σ_r B_jr (W Aᵀ)_jr + s²·Σ_{r,q} B_jr (A Aᵀ)_rq B_jq
since (BA)_j = Σ_r B_jr A_r, so W_j·(BA)_j = Σ_r B_jr (W_j·A_r) = Σ_r B_jr (W Aᵀ)_jr and
‖(BA)_j‖² = Σ_{r,q} B_jr B_jq (A_r·A_q) = (B (A Aᵀ) Bᵀ)_jj. The pieces: ‖W_j‖² (N), computed
once while W is frozen (``weight_sq_norm=``, cached by the modules on W's identity and version
counter), W Aᵀ (N, r, one skinny pass over W), A Aᵀ (r, r). All three and the sum are fp32
(float64 for float64 inputs), whatever W's dtype: the cross term can cancel part of ‖W_j‖², and a
16-bit sum would lose those digits (PEFT sums W + s·BA in the adapter dtype, then takes the norm).
n² is clamped at 0 before the square root (rounding can take a vanishing norm below it).

Dropout draws its mask from (seed, token, feature) with the package's counter-based RNG
(ops/_rng.py), as lora_linear does: the same mask in every backend.

Implementations, selected per call by ``backend`` (see lowrank_kernels.backend):
- reference: plain torch, the norm from the expansion above (W read by row blocks).
- triton: h = x Aᵀ (ops/gemm.down_proj), then one GEMM (ops/gemm.lowrank_gemm) with the LoRA
  tail as extra K-steps and γ applied in its epilogue, which also stores v for backward; W Aᵀ by
  down_proj over W. Backward: LoRA's Triton backward on ŷ = γ ⊙ dy.
- cuda: LoRA's CUDA forward (cuBLAS + csrc/lora.cu) for v, γ and the bias as one elementwise pass
  (not fused into the GEMM); backward LoRA's CUDA backward on ŷ.
With dropout active every backend runs LoRA's forward for x Wᵀ + s·h Bᵀ + bias plus a second
base GEMM on x̃ (materialised, M×K, as PEFT does), and the (drop' − 1)(dz W) term of dx as one more
GEMM; the column dot for dm is a torch reduction in every backend.

Memory: no N×K temporary anywhere (the reference reads W by row blocks of N/8 rows); saved for
backward: x, h (M, r) and v (M, N) in x's dtype, against PEFT's two (M, N) products.

QLoRA + DoRA: ``weight`` may be a frozen bitsandbytes 4-bit ``Params4bit`` (NF4/FP4, any bnb
blocksize, nested absmax or not; ops/_quant.py). The math above is unchanged, with W read from
its packed storage as lora_linear reads it (ops/lora.py): the base products x Wᵀ and dy W use W
dequantised to x's dtype (bnb's 4-bit matmul, PEFT's base layer), ‖W_j‖² uses W as
``dequantize_4bit(W, quant_state)`` gives it, in quant_state.dtype (what PEFT's DoRA norm
dequantises), and W Aᵀ reads W at fp32 (at lora_A's dtype on Triton). Where the pieces run:
- ‖W_j‖² (``weight_sq_norm``): row blocks of N/8 rows dequantised in turn (ops/_quant
  ``dequantize_rows``), cached by the modules as for a dense W;
- W Aᵀ: Triton, lowrank_gemm(A, W) with W dequantised inside its main loop (A Wᵀ = (W Aᵀ)ᵀ, no
  tail); reference and CUDA, row blocks as for ‖W_j‖²;
- forward: Triton, lowrank_gemm's 4-bit main loop with the γ epilogue (as above); reference and
  CUDA, LoRA's 4-bit forward op (lora_linear_4bit_fwd) for v, then γ and the bias;
- backward: LoRA's 4-bit backward op (lora_linear_4bit_bwd) on ŷ = γ ⊙ dy; W is frozen (no dW).
  With dropout, dz W is that op again on dz with a zero B and s = 0 (its skinny products vanish).
The reference backend dequantises the whole W inside LoRA's reference (the specification); the
Triton path never holds more than an N/8-row block of it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lowrank_kernels import auto_backend as _auto_backend
from lowrank_kernels import backend as _backend
from lowrank_kernels import registry
from lowrank_kernels.ops import _checks, _quant, _rng, gemm
from lowrank_kernels.ops import lora as _lora

# W is read by this many row blocks where a product needs a wider dtype than W's.
_ROW_BLOCKS = 8


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or float64 for float64 inputs (the reference's verification dtype)."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------
# Reference (plain torch): the specification, PEFT's formula as written
# ----------------------------------------------------------------------------------------------
def dora_linear_reference(x, weight, lora_A, lora_B, magnitude, scaling=1.0, bias=None, dropout_p=0.0, seed=None):
    """Differentiable plain-torch DoRA linear in PEFT's order of operations (``DoraLinearLayer``):
    forms W + s·BA to take its row norms, exactly as PEFT does. Dropout (``dropout_p > 0`` with a
    ``seed``) uses the package's RNG, so this agrees with every backend for the same seed."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    adt = lora_A.dtype
    keep = _rng.keep_mask(seed, dropout_p, x2.shape[0], K, x.device)
    result = torch.nn.functional.linear(x2, weight, bias)
    xa = x2.to(adt)
    weight_norm = torch.linalg.norm(weight.to(adt) + scaling * (lora_B @ lora_A).detach(), dim=1).detach()
    gamma = (magnitude / weight_norm).view(1, -1)
    if keep is None:
        base_result = result if bias is None else result - bias
    else:
        xa = xa * keep / (1.0 - dropout_p)
        base_result = torch.nn.functional.linear(xa, weight.to(adt))
    lora = (xa @ lora_A.t()) @ lora_B.t()
    y = result + (gamma - 1) * base_result + gamma * lora * scaling
    return y.to(x.dtype).reshape(*lead, weight.shape[0])


def _row_slices(n: int):
    step = max(1, -(-n // _ROW_BLOCKS))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _rows(weight, rows: slice, dtype: torch.dtype) -> Tensor:
    """Rows of W in ``dtype``: a slice of a dense W, or a 4-bit W dequantised on those rows only."""
    if isinstance(weight, _quant.Quant4):
        return _quant.dequantize_rows(weight, rows, dtype)
    return weight[rows].to(dtype)


def weight_sq_norm(weight: Tensor) -> Tensor:
    """‖W_j‖² for each row j of ``weight`` (N, K): (N,) fp32 (float64 for float64 W), computed
    by row blocks so that no full-size fp32 copy of W exists. This is the piece of DoRA's norm that
    stays fixed while W is frozen: compute it once and pass it as ``weight_sq_norm=``.

    ``weight`` may be a bitsandbytes 4-bit ``Params4bit``: its rows are dequantised block by block
    to quant_state.dtype, as ``dequantize_4bit(W, quant_state)`` (PEFT's DoRA norm) gives them."""
    if _quant.is_4bit(weight):
        w, wdtype = _quant.from_params4bit(weight), _quant.storage_dtype(weight)
    else:
        _checks.check_float("weight", weight, 2)
        w, wdtype = weight, weight.dtype
    acc = _acc_dtype(wdtype)
    out = torch.empty(w.shape[0], device=w.device, dtype=acc)
    with torch.no_grad():
        for rows in _row_slices(w.shape[0]):
            out[rows] = _rows(w, rows, wdtype).to(acc).square().sum(1)
    return out


_weight_sq_norm = weight_sq_norm  # for the entry points, whose argument of that name shadows it


def _rows_weight_a(weight, lora_A: Tensor) -> Tensor:
    """W Aᵀ (N, r) in the accumulation dtype, W read by row blocks (reference and CUDA)."""
    acc = _acc_dtype(lora_A.dtype)
    a = lora_A.to(acc)
    out = torch.empty(weight.shape[0], lora_A.shape[0], device=lora_A.device, dtype=acc)
    for rows in _row_slices(weight.shape[0]):
        out[rows] = _rows(weight, rows, acc) @ a.t()
    return out


def _triton_weight_a(weight, lora_A: Tensor) -> Tensor:
    """W Aᵀ (N, r): down_proj over a dense W; for a 4-bit one (W Aᵀ)ᵀ = A Wᵀ, the GEMM with W
    dequantised in its main loop and its tail zero (s = 0)."""
    if isinstance(weight, _quant.Quant4):
        r = lora_A.shape[0]
        zeros_h, zeros_b = lora_A.new_zeros((r, 1)), lora_A.new_zeros((weight.shape[0], 1))
        return gemm.lowrank_gemm(lora_A, weight, zeros_h, zeros_b, 0.0, lora_A.dtype, out_dtype=torch.float32).t()
    return gemm.down_proj(weight, lora_A, lora_A.dtype)


def _norms(weight, lora_A, lora_B, scaling, w_sq, backend) -> Tensor:
    """n (N,) = ‖W_j + s(BA)_j‖ from ‖W_j‖², W Aᵀ and A Aᵀ (the module docstring's expansion)."""
    acc = _acc_dtype(lora_A.dtype)
    if w_sq is None:
        w_sq = weight_sq_norm(weight)
    a, b = lora_A.to(acc), lora_B.to(acc)
    cross = (b * DORA.impl(backend).weight_a(weight, lora_A).to(acc)).sum(1)
    lora_sq = ((b @ (a @ a.t())) * b).sum(1)
    return (w_sq.to(acc) + 2.0 * scaling * cross + scaling * scaling * lora_sq).clamp_min(0.0).sqrt()


# ----------------------------------------------------------------------------------------------
# Forward and backward of the 2-D op: the backends' stages, then every backend's path
# ----------------------------------------------------------------------------------------------
def _lora_forward(x, weight, lora_A, lora_B, bias, scaling, p, seed, backend):
    """LoRA's registered forward (y, h) on a dense or a 4-bit W (ops/lora.py)."""
    w, w_sizes = _quant.op_args(weight)
    return _lora.forward_op(x, lora_A, lora_B, bias, scaling, p, seed, backend, w_sizes, *w)


def _lora_backward(dy, x, weight, lora_A, lora_B, h, scaling, p, seed, backend, need_dx):
    """LoRA's registered backward (dx, dA, dB) on a dense or a 4-bit W (ops/lora.py)."""
    w, w_sizes = _quant.op_args(weight)
    return _lora.backward_op(dy, x, lora_A, lora_B, h, scaling, p, seed, backend, need_dx, w_sizes, *w)


def _with_gamma(u: Tensor, v: Tensor, gamma: Tensor) -> Tensor:
    """PEFT's y = u + (γ − 1) ⊙ v, summed in γ's dtype, in u's."""
    return (u.to(gamma.dtype) + v.to(gamma.dtype) * (gamma - 1)).to(u.dtype)


def _lora_op_forward(x, weight, lora_A, lora_B, bias, scaling, gamma, save, out, backend):
    """(y, h, v) without dropout (reference and CUDA): u = x Wᵀ + bias + s·h Bᵀ by LoRA's op, then
    PEFT's y = u + (γ − 1)(u − bias): at γ = 1 and B = 0 (DoRA's initialisation) y is the base
    layer's output bit for bit, as in PEFT."""
    u, h = _lora_forward(x, weight, lora_A, lora_B, bias, scaling, 0.0, None, backend)
    v = u if bias is None else u - bias
    return _with_gamma(u, v, gamma), h, v


def _triton_forward(x, weight, lora_A, lora_B, bias, scaling, gamma, save, out, backend):
    """(y, h, v) without dropout: h = x Aᵀ, then one GEMM with the LoRA tail as extra K-steps and γ
    in its epilogue, which stores v when ``save`` (None otherwise) and y into ``out`` if given."""
    adt = lora_A.dtype
    h = gemm.down_proj(x, lora_A, adt)
    v = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype) if save else None
    y = gemm.lowrank_gemm(x, weight, h, lora_B, scaling, adt, bias=bias, col_scale=gamma.float(), unscaled_out=v,
                          out=out)
    return y, h, v


def _lora_op_dropped(x_drop, weight, h, lora_A, lora_B, scaling, backend):
    """v = x̃ Wᵀ + s·h Bᵀ with dropout (reference and CUDA): a matmul for a dense W; for a 4-bit one
    LoRA's forward on x̃ (W never dequantised outside the reference)."""
    if isinstance(weight, _quant.Quant4):
        return _lora_forward(x_drop, weight, lora_A, lora_B, None, scaling, 0.0, None, backend)[0]
    adt = lora_A.dtype
    return torch.nn.functional.linear(x_drop, weight) + ((h.to(adt) @ lora_B.t()) * scaling).to(x_drop.dtype)


def _triton_dropped(x_drop, weight, h, lora_A, lora_B, scaling, backend):
    """v = x̃ Wᵀ + s·h Bᵀ with dropout: one GEMM, the LoRA tail as extra K-steps."""
    return gemm.lowrank_gemm(x_drop, weight, h, lora_B, scaling, lora_A.dtype)


def _times_weight(dz, x, weight, lora_A, lora_B, h, backend):
    """dz W (M, K): a matmul for a dense W; for a 4-bit one LoRA's backward with a zero B and s = 0,
    whose dx is then dz W exactly (the dequantised W never formed outside the reference)."""
    if not isinstance(weight, _quant.Quant4):
        return dz @ weight
    return _lora_backward(dz, x, weight, lora_A, torch.zeros_like(lora_B), h, 0.0, 0.0, None, backend, True)[0]


def _forward(x, weight, lora_A, lora_B, magnitude, bias, w_sq, scaling, p, seed, backend, save, out=None):
    """(y, h, v, n): v is (0,) when ``save`` is False; ``out`` (Triton, no dropout) receives y."""
    impl = DORA.impl(backend)
    n = _norms(weight, lora_A, lora_B, scaling, w_sq, backend)
    gamma = magnitude.to(n.dtype) / n
    keep = _rng.keep_mask(_rng.seed_value(seed), p, x.shape[0], x.shape[1], x.device)
    if keep is None:
        y, h, v = impl.forward(x, weight, lora_A, lora_B, bias, scaling, gamma, save, out, backend)
    else:
        # x Wᵀ + s·h Bᵀ + bias by LoRA's op (the mask fused in h), plus PEFT's second base GEMM on
        # the dropped input for v.
        u, h = _lora_forward(x, weight, lora_A, lora_B, bias, scaling, p, seed, backend)
        v = impl.dropped(x * keep / (1.0 - p), weight, h, lora_A, lora_B, scaling, backend)
        y = _with_gamma(u, v, gamma)
    return y, h, (v if save else x.new_empty((0,))), n


# ----------------------------------------------------------------------------------------------
# torch.library ops: one forward and one backward for a dense or a 4-bit W (a Quant4, its
# ‖W_j‖² always given: computed by the entry point in quant_state.dtype), each registered twice:
# on W, and on a 4-bit W's storage (ops/_quant.op_args)
# ----------------------------------------------------------------------------------------------
def _h_dtype(lora_A: Tensor) -> torch.dtype:
    return _acc_dtype(lora_A.dtype)


def _fwd_outputs(x: Tensor, out_features: int, lora_A: Tensor, save: bool) -> tuple:
    """(y, h, v, n) allocated: the fake implementations' results (for an empty batch, all but n)."""
    return (
        x.new_empty((x.shape[0], out_features)),
        x.new_empty((x.shape[0], lora_A.shape[0]), dtype=_h_dtype(lora_A)),
        x.new_empty((x.shape[0], out_features) if save else (0,)),
        x.new_empty((out_features,), dtype=_acc_dtype(lora_A.dtype)),
    )


def _bwd_outputs(x: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, need_dx: bool) -> tuple:
    """(dx, d_lora_A, d_lora_B, d_magnitude) allocated, for the fake implementations."""
    return (x.new_empty(x.shape if need_dx else (0,)), torch.empty_like(lora_A), torch.empty_like(lora_B),
            torch.empty_like(magnitude))


def _dora_fwd(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, bias: Optional[Tensor],
    weight_sq: Optional[Tensor], scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, h, v, n); ``weight`` is W, or a Quant4 from the 4-bit registration."""
    if x.shape[0] == 0:
        y, h, v, _ = _fwd_outputs(x, weight.shape[0], lora_A, save)
        return y, h, v, _norms(weight, lora_A, lora_B, scaling, weight_sq, backend)
    return _forward(x, weight, lora_A, lora_B, magnitude, bias, weight_sq, scaling, dropout_p, seed, backend, save)


def _dora_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, h: Tensor,
    v: Tensor, n: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor], backend: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d_lora_A, d_lora_B, d_magnitude); dx is an empty tensor when need_dx is False."""
    gamma = magnitude.to(n.dtype) / n
    dy_hat = dy * gamma.to(dy.dtype)
    dx, d_lora_A, d_lora_B = _lora_backward(dy_hat, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, backend,
                                            need_dx)
    keep = _rng.keep_mask(_rng.seed_value(seed), dropout_p, x.shape[0], x.shape[1], x.device)
    if need_dx and keep is not None and x.shape[0] > 0:
        # dx = [ŷ W + s·drop'(g A)] + (drop' − 1)(dz W): PEFT's (γ − 1) term on the dropped input.
        dz_w = _times_weight(dy * (gamma - 1).to(dy.dtype), x, weight, lora_A, lora_B, h, backend)
        dx = dx + dz_w * (keep.to(dz_w.dtype) / (1.0 - dropout_p) - 1.0)
    d_magnitude = (dy * v).sum(0, dtype=n.dtype) / n if x.shape[0] else torch.zeros_like(n)
    return dx.contiguous(), d_lora_A, d_lora_B, d_magnitude.to(magnitude.dtype)


def _dora_4bit_fwd(
    x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
    offset: Optional[Tensor], blocksize: int, blocksize2: int, out_features: int, lora_A: Tensor, lora_B: Tensor,
    magnitude: Tensor, bias: Optional[Tensor], weight_sq: Tensor, scaling: float, dropout_p: float,
    seed: Optional[Tensor], backend: str, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q = _quant.quant4(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, x.shape[1])
    return _dora_fwd(x, q, lora_A, lora_B, magnitude, bias, weight_sq, scaling, dropout_p, seed, backend, save)


def _dora_4bit_bwd(
    dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, absmax2: Optional[Tensor],
    code2: Optional[Tensor], offset: Optional[Tensor], blocksize: int, blocksize2: int, lora_A: Tensor,
    lora_B: Tensor, magnitude: Tensor, h: Tensor, v: Tensor, n: Tensor, scaling: float, dropout_p: float,
    seed: Optional[Tensor], backend: str, need_dx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q = _quant.quant4(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, dy.shape[1], x.shape[1])
    return _dora_bwd(dy, x, q, lora_A, lora_B, magnitude, h, v, n, scaling, dropout_p, seed, backend, need_dx)


_dora_fwd_op = torch.library.custom_op("lowrank_kernels::dora_linear_fwd", _dora_fwd, mutates_args=())
_dora_bwd_op = torch.library.custom_op("lowrank_kernels::dora_linear_bwd", _dora_bwd, mutates_args=())
_dora_4bit_fwd_op = torch.library.custom_op("lowrank_kernels::dora_linear_4bit_fwd", _dora_4bit_fwd, mutates_args=())
_dora_4bit_bwd_op = torch.library.custom_op("lowrank_kernels::dora_linear_4bit_bwd", _dora_4bit_bwd, mutates_args=())


@_dora_fwd_op.register_fake
def _(x, weight, lora_A, lora_B, magnitude, bias, weight_sq, scaling, dropout_p, seed, backend, save):
    return _fwd_outputs(x, weight.shape[0], lora_A, save)


@_dora_bwd_op.register_fake
def _(dy, x, weight, lora_A, lora_B, magnitude, h, v, n, scaling, dropout_p, seed, backend, need_dx):
    return _bwd_outputs(x, lora_A, lora_B, magnitude, need_dx)


@_dora_4bit_fwd_op.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, out_features, lora_A, lora_B, magnitude,
      bias, weight_sq, scaling, dropout_p, seed, backend, save):
    return _fwd_outputs(x, out_features, lora_A, save)


@_dora_4bit_bwd_op.register_fake
def _(dy, x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, lora_A, lora_B, magnitude, h, v, n,
      scaling, dropout_p, seed, backend, need_dx):
    return _bwd_outputs(x, lora_A, lora_B, magnitude, need_dx)


# The backends' stages: W Aᵀ for the norms, the forward without dropout (y, h, v), and v with it.
DORA = registry.declare(
    "dora_linear", "y = m/‖W + s·BA‖_row ⊙ (x Wᵀ + s·(drop(x) Aᵀ) Bᵀ) + bias; W dense or bitsandbytes 4-bit",
    library_ops=(_dora_fwd_op, _dora_bwd_op, _dora_4bit_fwd_op, _dora_4bit_bwd_op),
    reference=registry.Impl(registry.REFERENCE, quant4=registry.REFERENCE, weight_a=_rows_weight_a,
                            forward=_lora_op_forward, dropped=_lora_op_dropped),
    triton=registry.Impl(registry.TRITON, quant4=registry.TRITON, weight_a=_triton_weight_a, forward=_triton_forward,
                         dropped=_triton_dropped),
    cuda=registry.Impl(registry.CUDA, quant4=registry.CUDA_16BIT, weight_a=_rows_weight_a, forward=_lora_op_forward,
                       dropped=_lora_op_dropped),
)


# The caller's tensors behind the registered ops' tensor arguments (see _checks.layout_sources);
# "dora_linear_4bit" is dora_linear on a bitsandbytes 4-bit weight, whose storage is bnb's.
_DORA = dict(lora_A="lora_A", lora_B="lora_B", magnitude="magnitude")
LAYOUT_SOURCES = _checks.layout_sources({
    "dora_linear_fwd": {"dora_linear": dict(x="x", weight="weight", **_DORA, bias="bias", weight_sq="weight_sq_norm",
                                            seed=None)},
    "dora_linear_bwd": {"dora_linear": dict(dy="grad_output", x="x", weight="weight", **_DORA, h=None, v=None, n=None,
                                            seed=None)},
    "dora_linear_4bit_fwd": {"dora_linear_4bit": dict(x="x", **_checks.QUANT4_STORAGE, **_DORA, bias="bias",
                                                      weight_sq="weight_sq_norm", seed=None)},
    "dora_linear_4bit_bwd": {"dora_linear_4bit": dict(dy="grad_output", x="x", **_checks.QUANT4_STORAGE, **_DORA,
                                                      h=None, v=None, n=None, seed=None)},
})


# ----------------------------------------------------------------------------------------------
# Autograd: one Function for a dense and a 4-bit W, which travels as its tensors and sizes
# (ops/_quant.op_args), as in ops/lora.py
# ----------------------------------------------------------------------------------------------
def _forward_op(x2, lora_A, lora_B, magnitude, bias, weight_sq, scaling, p, seed, backend, w_sizes, *w, save=False):
    """(y, h, v, n) by the registered forward, W given as ``_quant.op_args`` gives it; v is saved
    for backward where ``save``."""
    op, impl = (_dora_4bit_fwd_op, _dora_4bit_fwd) if w_sizes else (_dora_fwd_op, _dora_fwd)
    return _backend.call_op(op, impl, x2, *w, *w_sizes, lora_A, lora_B, magnitude, bias, weight_sq, scaling, p, seed,
                            backend, save)


def _backward_op(dy, x2, lora_A, lora_B, magnitude, h, v, n, scaling, p, seed, backend, need_dx, w_sizes, *w):
    """(dx, d_lora_A, d_lora_B, d_magnitude) by the registered backward, W as for _forward_op."""
    op, impl = (_dora_4bit_bwd_op, _dora_4bit_bwd) if w_sizes else (_dora_bwd_op, _dora_bwd)
    return _backend.call_op(op, impl, dy, x2, *w, *w_sizes[:2], lora_A, lora_B, magnitude, h, v, n, scaling, p, seed,
                            backend, need_dx)


def _weight_grad(dy, x2, magnitude, n, p, seed) -> Tensor:
    """dW = dyᵀ x + dzᵀ x̃ (ŷᵀ x without dropout) in dy's dtype, γ a constant (module docstring)."""
    gamma = (magnitude.to(n.dtype) / n).to(dy.dtype)
    keep = _rng.keep_mask(_rng.seed_value(seed), p, *x2.shape, x2.device)
    if keep is None:
        return (dy * gamma).t() @ x2
    return dy.t() @ x2 + (dy * (gamma - 1)).t() @ (x2 * keep / (1.0 - p))


class DoRALinearFunction(torch.autograd.Function):
    """Autograd for the 2-D op, W given as its tensors ``w`` and sizes ``w_sizes``
    (ops/_quant.op_args): a dense W, trainable or frozen, or a frozen 4-bit one's storage. Saves x
    (no copy), h (M, r) fp32, v (M, N), the norms (N) and W's tensors."""

    @staticmethod
    def forward(ctx, x2, lora_A, lora_B, magnitude, bias, weight_sq, scaling, dropout_p, seed, backend, w_sizes, *w):
        y, h, v, n = _forward_op(x2, lora_A, lora_B, magnitude, bias, weight_sq, scaling, dropout_p, seed, backend,
                                 w_sizes, *w, save=True)
        ctx.save_for_backward(x2, lora_A, lora_B, magnitude, h, v, n, seed, *w)
        ctx.w_sizes, ctx.scaling, ctx.dropout_p, ctx.backend = w_sizes, scaling, dropout_p, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, lora_A, lora_B, magnitude, h, v, n, seed, *w = ctx.saved_tensors
        need_x, need_a, need_b, need_m, need_bias = ctx.needs_input_grad[:5]
        need_w = ctx.needs_input_grad[11]  # W's first tensor: only a dense W can require grad
        dy = dy.contiguous()
        dx, d_lora_A, d_lora_B, d_magnitude = _backward_op(dy, x2, lora_A, lora_B, magnitude, h, v, n, ctx.scaling,
                                                           ctx.dropout_p, seed, ctx.backend, need_x, ctx.w_sizes, *w)
        d_weight = _weight_grad(dy, x2, magnitude, n, ctx.dropout_p, seed).to(w[0].dtype) if need_w else None
        return (
            dx if need_x else None,
            d_lora_A if need_a else None,
            d_lora_B if need_b else None,
            d_magnitude if need_m else None,
            _lora.bias_grad(dy) if (need_bias and ctx.has_bias) else None,
            None, None, None, None, None, None,
            d_weight,
            *(None for _ in w[1:]),
        )


# ----------------------------------------------------------------------------------------------
# Validation and the functional entry points
# ----------------------------------------------------------------------------------------------
def _check_weight_sq(weight_sq_norm, weight, wdtype):
    if weight_sq_norm is None:
        return
    _checks.check_float("weight_sq_norm", weight_sq_norm, 1)
    if weight_sq_norm.shape[0] != weight.shape[0] or weight_sq_norm.dtype != _acc_dtype(wdtype):
        raise ValueError(f"weight_sq_norm must be ({weight.shape[0]},) {_acc_dtype(wdtype)} "
                         f"(weight_sq_norm(weight)), got {tuple(weight_sq_norm.shape)} {weight_sq_norm.dtype}")
    _checks.check_same_device("weight_sq_norm", weight_sq_norm, **_quant.device_tensors(weight))


def _unpack_4bit(weight, weight_sq_norm):
    """(W as the ops take it, ‖W_j‖², the dtype ‖W_j‖² is formed in): for a Params4bit its Quant4,
    ‖W_j‖² (computed when not given: its ops take it always) and quant_state.dtype; a dense W and
    ``weight_sq_norm`` unchanged, W's dtype."""
    if not _quant.is_4bit(weight):
        return weight, weight_sq_norm, weight.dtype if isinstance(weight, Tensor) else None
    q = _quant.base_weight(weight)
    return q, (_weight_sq_norm(weight) if weight_sq_norm is None else weight_sq_norm), _quant.storage_dtype(weight)


def dora_weight_norm(weight, lora_A, lora_B, scaling=1.0, weight_sq_norm=None, backend=None):
    """DoRA's row norms n_j = ‖W_j + scaling·(B A)_j‖, (N,) fp32 (float64 for float64 inputs),
    without forming W + s·BA (see the module docstring); no gradient flows through them.

    ``weight_sq_norm``: ‖W_j‖² from ``weight_sq_norm(weight)``, computed here when None.
    ``weight`` may be a frozen bitsandbytes 4-bit ``Params4bit`` (QLoRA + DoRA, module docstring).
    """
    weight, weight_sq_norm, wdtype = _unpack_4bit(weight, weight_sq_norm)
    _lora.check_adapters(weight, lora_A, lora_B, scaling)
    _checks.check_same_device("lora_A", lora_A, **_quant.device_tensors(weight), lora_B=lora_B)
    _check_weight_sq(weight_sq_norm, weight, wdtype)
    dense = {"weight": weight} if isinstance(weight, Tensor) else {}
    backend = _backend.resolve("dora_linear", backend, lora_A=lora_A, weight_4bit=not dense, **dense)
    with torch.no_grad():
        return _norms(weight, lora_A, lora_B, float(scaling), weight_sq_norm, backend)


@_auto_backend.tuned("dora_linear")
def dora_linear(x, weight, lora_A, lora_B, magnitude, scaling=1.0, bias=None, dropout_p=0.0, training=True, seed=None,
                weight_sq_norm=None, backend=None):
    """Fused DoRA linear, PEFT's ``DoraLinearLayer`` exactly:
    ``(m / ‖W + s·BA‖_c) ⊙ (x Wᵀ + s·(dropout(x) Aᵀ) Bᵀ) + bias``, the norm a constant in backward,
    and with dropout active PEFT's placement of it (module docstring).

    Args:
        x: (..., K) input, float32/float16/bfloat16, any leading dims, may be non-contiguous.
        weight: (N, K) base weight, x's dtype (frozen, or trainable: then dW is returned; pass no
            cached ``weight_sq_norm`` for a weight that changes); or a frozen bitsandbytes 4-bit
            ``Params4bit`` (NF4/FP4, any bnb blocksize, nested absmax or not) whose
            quant_state.shape is (N, K): QLoRA + DoRA, x float32/float16/bfloat16 (on the CUDA
            backend 16-bit only), W dequantised to x's dtype tile by tile (module docstring).
        lora_A: (r, K), lora_B: (N, r): PEFT's ``lora_A.weight`` / ``lora_B.weight``; x's dtype or
            float32.
        magnitude: (N,) DoRA's magnitude vector m (PEFT's ``lora_magnitude_vector[name].weight``),
            lora_A's dtype.
        scaling: s = alpha / r (alpha / sqrt(r) for rsLoRA).
        bias: optional (N,), x's dtype.
        dropout_p: dropout probability on the adapter's input, in [0, 1); active only when
            ``training`` is True.
        seed: dropout seed (int in [0, 2**62)); None draws one from torch's default generator.
        weight_sq_norm: optional (N,) fp32 ‖W_j‖² from ``weight_sq_norm(weight)``, cached by the
            caller while W is frozen; None computes it on every call.
        backend: None, "reference", "triton" or "cuda" (see lowrank_kernels.backend).

    Returns:
        (..., N) tensor in x's dtype. Under torch.no_grad / inference_mode nothing is saved.
    """
    weight, weight_sq_norm, wdtype = _unpack_4bit(weight, weight_sq_norm)
    x, weight, lora_A, lora_B, magnitude, bias = _lora.autocast_inputs(x, weight, lora_A, lora_B, magnitude, bias)
    if isinstance(weight, Tensor):
        wdtype = weight.dtype
    _lora.check_adapters(weight, lora_A, lora_B, scaling)
    _lora.check_input(x, weight, lora_A)
    _checks.check_float("magnitude", magnitude, 1)
    if magnitude.shape[0] != weight.shape[0]:
        raise ValueError(f"magnitude must be (out_features,) = ({weight.shape[0]},), got {tuple(magnitude.shape)}")
    _checks.check_same_dtype("magnitude", magnitude, "lora_A", lora_A)
    _checks.check_bias(bias, weight.shape[0], x)
    _checks.check_same_device("x", x, **_quant.device_tensors(weight), lora_A=lora_A, lora_B=lora_B,
                              magnitude=magnitude, bias=bias)
    _check_weight_sq(weight_sq_norm, weight, wdtype)
    _checks.check_dropout_p(dropout_p)
    _checks.check_seed("seed", seed)
    quant = isinstance(weight, _quant.Quant4)
    backend = _backend.resolve("dora_linear", backend, x=x, lora_A=lora_A, weight_4bit=quant)
    p, seed_t = _rng.dropout_seed(dropout_p, training, seed)
    return _lora.run_op(DoRALinearFunction, _forward_op, x, weight, (lora_A, lora_B, magnitude, bias),
                        (weight_sq_norm, float(scaling), p, seed_t, backend))
