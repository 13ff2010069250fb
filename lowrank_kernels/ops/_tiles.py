"""GEMM tile loops shared by the low-rank ops.

Three kernels cover the products every low-rank layer needs, with the dropout mask of the
package's counter-based RNG (ops/_rng.py) regenerated inside the tiles, never stored:

``down_proj``     O (M, R) = drop(X) (M, K) @ Aᵀ          skinny: reads X once, R <= a few hundred
``outer_reduce``  O (R, K) = Gᵀ (R, M) @ drop(X) (M, K)    reduction over tokens, split over M into
                                                             fp32 partials summed in a fixed order
``lowrank_gemm``  O (M, N) = X Wᵀ + bias + s·[mask ⊙] (H Bᵀ ⊙ β)
                            the base GEMM with the low-rank tail as extra K-steps of the same
                            accumulator: no (M, N) temporary. β is an optional per-column scale,
                            the mask an optional dropout mask on the tail (the dx of LoRA).

All accumulate in fp32. Operands of a product are cast to one "dot dtype" chosen by the caller
(the adapter's dtype for adapter products, so fp32 adapters on a bf16 base compute in fp32 as
PEFT does). fp32 products follow torch's matmul precision setting (ieee unless tf32 is allowed).
Row offsets are int64 so tensors past 2**31 elements index correctly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lowrank_kernels.backend import interpreter_enabled, triton_available
from lowrank_kernels.ops import _rng


class Dropout(NamedTuple):
    """Dropout with keep-probability 1 - p, drawn from (seed, token, feature)."""

    k0: int
    k1: int
    threshold: int
    scale: float  # 1 / (1 - p)

    @classmethod
    def make(cls, p: float, seed: int | None) -> "Dropout | None":
        if p == 0.0 or seed is None:
            return None
        k0, k1 = _rng.split_seed(seed)
        return cls(k0, k1, _rng.dropout_threshold(p), 1.0 / (1.0 - p))


def fp32_precision() -> str:
    """Triton input_precision for fp32 products, following torch's matmul setting."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


if triton_available():
    import triton
    import triton.language as tl

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

    def _cfg(bm, bn, bk, warps, stages, group=8):
        return triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
            num_warps=warps,
            num_stages=stages,
        )

    def _gemm_configs():
        if interpreter_enabled():
            # The interpreter runs every autotune candidate: one small tile keeps tests fast.
            return [_cfg(32, 32, 32, 4, 1)]
        # Hopper/Ampere tiles for bf16/fp16 with K and N in the thousands; the last two suit
        # small M (decode) and fp32.
        return [
            _cfg(128, 256, 64, 8, 3),
            _cfg(256, 128, 64, 8, 3),
            _cfg(128, 128, 64, 4, 4),
            _cfg(128, 128, 64, 8, 4),
            _cfg(64, 128, 64, 4, 4),
            _cfg(64, 64, 64, 4, 4),
            _cfg(32, 64, 32, 4, 4),
            _cfg(16, 128, 64, 4, 4),
        ]

    def _skinny_configs():
        if interpreter_enabled():
            return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in [(64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (32, 128, 4, 4), (16, 256, 4, 3)]
        ]

    @triton.jit
    def _dropout_tile(x, rows, cols, k0, k1, threshold, scale):
        keep = _rng.tl_dropout_keep(k0, k1, threshold, rows[:, None], cols[None, :])
        return tl.where(keep, x * scale, 0.0)

    # ------------------------------------------------------------------------------------------
    # down_proj: O = drop(X) @ Aᵀ
    # ------------------------------------------------------------------------------------------
    @triton.autotune(configs=_skinny_configs(), key=["M", "K", "R", "DROPOUT"], restore_value=[])
    @triton.jit(do_not_specialize=["k0", "k1", "threshold"])
    def down_proj_kernel(
        # pointers and strides
        X_ptr, stride_xm, stride_xk,
        A_ptr, stride_ar, stride_ak,
        O_ptr, stride_om, stride_or,
        # sizes
        M, K, R,
        # dropout on X: keys, threshold, 1/(1-p)
        k0, k1, threshold, keep_scale,
        # meta
        DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0_ in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = k0_ * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(
                X_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0,
            )
            if DROPOUT:
                keep = _rng.tl_dropout_keep(k0, k1, threshold, offs_m[:, None], offs_k[None, :])
                x = tl.where(keep, x, 0.0)
            a = tl.load(
                A_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0,
            )
            acc = tl.dot(x.to(DOT_DTYPE), a.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if DROPOUT:
            acc = acc * keep_scale
        tl.store(
            O_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or,
            acc.to(O_ptr.dtype.element_ty),
            mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
        )

    # ------------------------------------------------------------------------------------------
    # outer_reduce: P[split] = Gᵀ[:, rows of split] @ drop(X)[rows of split]
    # ------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["k0", "k1", "threshold"])
    def outer_reduce_kernel(
        G_ptr, stride_gm, stride_gr,
        X_ptr, stride_xm, stride_xk,
        P_ptr, stride_ps, stride_pr, stride_pk,
        M, K, R, rows_per_split,
        k0, k1, threshold, keep_scale,
        DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_r = tl.program_id(2)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_start = pid_s * rows_per_split
        row_end = tl.minimum(row_start + rows_per_split, M)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            in_rows = offs_m < row_end
            g = tl.load(
                G_ptr + offs_m[None, :] * stride_gm + offs_r[:, None] * stride_gr,
                mask=in_rows[None, :] & (offs_r[:, None] < R), other=0.0,
            )
            x = tl.load(
                X_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=in_rows[:, None] & (offs_k[None, :] < K), other=0.0,
            )
            if DROPOUT:
                keep = _rng.tl_dropout_keep(k0, k1, threshold, offs_m[:, None], offs_k[None, :])
                x = tl.where(keep, x, 0.0)
            acc = tl.dot(g.to(DOT_DTYPE), x.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if DROPOUT:
            acc = acc * keep_scale
        tl.store(
            P_ptr + pid_s * stride_ps + offs_r[:, None] * stride_pr + offs_k[None, :] * stride_pk,
            acc,
            mask=(offs_r[:, None] < R) & (offs_k[None, :] < K),
        )

    # ------------------------------------------------------------------------------------------
    # lowrank_gemm: O = X Wᵀ + bias + s·[mask ⊙](H Bᵀ ⊙ β)
    # ------------------------------------------------------------------------------------------
    @triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "R", "TAIL_DROPOUT"], restore_value=[])
    @triton.jit(do_not_specialize=["k0", "k1", "threshold"])
    def lowrank_gemm_kernel(
        # base operands: X (M, K), W (N, K)
        X_ptr, stride_xm, stride_xk,
        W_ptr, stride_wn, stride_wk,
        # low-rank tail: H (M, R), B (N, R), optional column scale β (N), bias (N)
        H_ptr, stride_hm, stride_hr,
        B_ptr, stride_bn, stride_br,
        beta_ptr, bias_ptr,
        # output (M, N)
        O_ptr, stride_om, stride_on,
        # sizes and scalars
        M, N, K, R, scaling,
        k0, k1, threshold, keep_scale,
        # meta
        HAS_BIAS: tl.constexpr, HAS_BETA: tl.constexpr, TAIL_DROPOUT: tl.constexpr,
        BASE_DTYPE: tl.constexpr, TAIL_DTYPE: tl.constexpr,
        BASE_PRECISION: tl.constexpr, TAIL_PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # Grouped ordering: programs sharing an X row-panel run together, so it stays in L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group_size = GROUP_M * num_n
        first_m = (pid // group_size) * GROUP_M
        rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % rows_in_group
        pid_n = (pid % group_size) // rows_in_group

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_ok = offs_m < M
        n_ok = offs_n < N

        # The tail first: the dropout mask and scales apply to it alone, and then the base GEMM
        # accumulates on top, so one accumulator holds the whole output tile.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            h = tl.load(
                H_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                mask=m_ok[:, None] & (offs_r[None, :] < R), other=0.0,
            )
            b = tl.load(
                B_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                mask=n_ok[None, :] & (offs_r[:, None] < R), other=0.0,
            )
            acc = tl.dot(h.to(TAIL_DTYPE), b.to(TAIL_DTYPE), acc, input_precision=TAIL_PRECISION)
        acc = acc * scaling
        if HAS_BETA:
            beta = tl.load(beta_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc * beta[None, :]
        if TAIL_DROPOUT:
            acc = _dropout_tile(acc, offs_m, offs_n, k0, k1, threshold, keep_scale)

        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(
                X_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0,
            )
            w = tl.load(
                W_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=n_ok[None, :] & (offs_k[:, None] < K), other=0.0,
            )
            acc = tl.dot(x.to(BASE_DTYPE), w.to(BASE_DTYPE), acc, input_precision=BASE_PRECISION)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(
            O_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
            acc.to(O_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )


# ----------------------------------------------------------------------------------------------
# Launchers. Callers validate; these only allocate and launch. Each takes an optional `out=`.
# ----------------------------------------------------------------------------------------------
def _block_r(r: int) -> int:
    # tl.dot needs every dimension >= 16; 64 keeps register tiles small for large ranks.
    return min(64, max(16, triton.next_power_of_2(r)))


def _precision(dtype: torch.dtype) -> str:
    return fp32_precision() if dtype == torch.float32 else "ieee"


def _no_dropout():
    return 0, 0, 0, 1.0


def down_proj(x, a, dot_dtype, dropout=None, out=None):
    """O (M, R) fp32 = drop(x) @ aᵀ for x (M, K), a (R, K); products in ``dot_dtype``."""
    M, K = x.shape
    R = a.shape[0]
    if out is None:
        out = torch.empty((M, R), device=x.device, dtype=torch.float32)
    block_r = _block_r(R)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))  # noqa: E731
    down_proj_kernel[grid](
        x, x.stride(0), x.stride(1),
        a, a.stride(0), a.stride(1),
        out, out.stride(0), out.stride(1),
        M, K, R,
        *(dropout or _no_dropout()),
        DROPOUT=dropout is not None, DOT_DTYPE=_TL_DTYPES[dot_dtype], PRECISION=_precision(dot_dtype),
        BLOCK_R=block_r,
    )
    return out


def outer_reduce(g, x, dot_dtype, dropout=None, block_m=None, block_k=None):
    """fp32 (R, K) = gᵀ @ drop(x) for g (M, R), x (M, K), reduced over M deterministically.

    The M range is split so the grid fills the GPU; partial sums land in an fp32 buffer
    (splits, R, K) that is summed in a fixed order: no atomics, bit-reproducible.
    """
    M, K = x.shape
    R = g.shape[1]
    interp = interpreter_enabled()
    block_m = block_m or (32 if interp else 64)
    block_k = block_k or (32 if interp else 128)
    block_r = _block_r(R)
    tiles = triton.cdiv(K, block_k) * triton.cdiv(R, block_r)
    target = 1 if interp else 4 * _sm_count(x.device)
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(target, tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split) if M else 1
    partial = torch.empty((splits, R, K), device=x.device, dtype=torch.float32)
    if M == 0:
        return partial.zero_()[0]
    outer_reduce_kernel[(triton.cdiv(K, block_k), splits, triton.cdiv(R, block_r))](
        g, g.stride(0), g.stride(1),
        x, x.stride(0), x.stride(1),
        partial, partial.stride(0), partial.stride(1), partial.stride(2),
        M, K, R, rows_per_split,
        *(dropout or _no_dropout()),
        DROPOUT=dropout is not None, DOT_DTYPE=_TL_DTYPES[dot_dtype], PRECISION=_precision(dot_dtype),
        BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=4,
    )
    return partial[0] if splits == 1 else partial.sum(0)


def lowrank_gemm(x, w, h, b, scaling, tail_dtype, bias=None, beta=None, tail_dropout=None, out=None, out_dtype=None):
    """O (M, N) = x wᵀ + bias + scaling·[mask ⊙](h bᵀ ⊙ beta), x (M, K), w (N, K), h (M, R), b (N, R).

    x and w are multiplied in x's dtype, h and b in ``tail_dtype``. Transposed operands are
    passed as strided views (the dx of a linear layer is lowrank_gemm(dy, weight.t(), ...)).
    """
    M, K = x.shape
    N = w.shape[0]
    R = h.shape[1]
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=out_dtype or x.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    lowrank_gemm_kernel[grid](
        x, x.stride(0), x.stride(1),
        w, w.stride(0), w.stride(1),
        h, h.stride(0), h.stride(1),
        b, b.stride(0), b.stride(1),
        beta if beta is not None else out, bias if bias is not None else out,
        out, out.stride(0), out.stride(1),
        M, N, K, R, float(scaling),
        *(tail_dropout or _no_dropout()),
        HAS_BIAS=bias is not None, HAS_BETA=beta is not None, TAIL_DROPOUT=tail_dropout is not None,
        BASE_DTYPE=_TL_DTYPES[x.dtype], TAIL_DTYPE=_TL_DTYPES[tail_dtype],
        BASE_PRECISION=_precision(x.dtype), TAIL_PRECISION=_precision(tail_dtype),
        BLOCK_R=_block_r(R),
    )
    return out


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
