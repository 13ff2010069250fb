"""The kernels of multi_lora_linear: Triton kernels and launchers, and the CUDA extension's calls
(csrc/multi_lora.cu). ops/multi_lora.py has the math and how each backend computes it.

``group`` / ``ungroup``: the slots grouped by adapter (both backends read this layout).
``seg_down``: h = drop(x) A_aᵀ per slot, over sorted slots or, for a few ungrouped ones, BGMV.
``seg_gemm``: x Wᵀ + bias + [mask ⊙] Σ_j c_j h_j B_aᵀ in one GEMM pass. ``seg_reduce``: dA, dB.
Tiles come from ops/tile_config.py; the pruning here narrows its budgets for what these kernels
keep live beside the accumulator. The backends' stages (``triton_forward``, ``cuda_forward``, ...)
take the registered ops' arguments and make the kernels' dropout from (p, seed) themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowrank_kernels import backend as _backend
from lowrank_kernels.ops import _rng, gemm, tile_config

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if _backend.triton_available():
    import triton
    import triton.language as tl

    def _prune_down(configs, named_args, **meta):
        """seg_down's candidates for one call (its early_config_prune): the skinny tiles of its class."""
        arch = _backend.tile_arch(named_args["X_ptr"].device)
        if arch is None:
            return tile_config.INTERP_SKINNY
        tc = meta["DOT_DTYPE"] != tl.float32
        candidates = tile_config.SKINNY_TC if tc else tile_config.SKINNY_FMA
        if meta["DROPOUT"] and (arch < 90 or not tc):
            # beside the mask's hashes 4-warp tiles spill: on sm_80 (mma.sync operands in
            # registers), and with fp32 FMA operands on sm_90a too (Triton 3.6: 8 B a thread)
            candidates = [c for c in candidates if c.num_warps == 8] or candidates
        x_es = max(named_args["X_ptr"].element_size(), 2 if tc else 4)
        a_es = named_args["A_ptr"].element_size()
        return tile_config.fitting(candidates, named_args["X_ptr"].device,
                                   lambda c: tile_config.skinny_smem(c, x_es, a_es, meta["BLOCK_R"]))

    # IEEE fp32 (FMA) tiles: the adapter loop's gathered rows and coefficients stay live beside
    # the FMA operands: 32 x 32 tiles, 16 deep (lowrank_gemm's 128 x 64 and 32 x 64 spill here),
    # spread over 8 warps on sm_80, where 4 spill.
    _GEMM_FMA = [tile_config.cfg(32, 32, 16, 4, 2)]
    _GEMM_FMA_80 = [tile_config.cfg(32, 32, 16, 8, 2)]

    def _prune_gemm(configs, named_args, **meta):
        """seg_gemm's candidates for one call (its early_config_prune): lowrank_gemm's tensor-core
        tiles or its own FMA ones, within smaller register budgets."""
        arch = _backend.tile_arch(named_args["X_ptr"].device)
        if arch is None:
            return tile_config.INTERP_GEMM
        tc = tile_config.on_tensor_cores(meta["BASE_DTYPE"], meta["BASE_PRECISION"])
        candidates = tile_config.GEMM_TC if tc else (_GEMM_FMA if arch >= 90 else _GEMM_FMA_80)
        # lowrank_gemm's register budgets (see tile_config.prune_gemm), less for the gathered row
        # indices and slot coefficients the adapter loop keeps live: 112 accumulator values a
        # thread on sm_90a (64 with a dropout mask), 32 on sm_80, 16 beside a 3xTF32 tail.
        budget = 32 if arch < 90 else (64 if meta["TAIL_DROPOUT"] else 112)
        if tc and meta["TAIL_DTYPE"] == tl.float32:
            budget = 16
        candidates = [c for c in candidates if tile_config.per_thread(c) <= budget] or candidates[-1:]
        base_es = named_args["X_ptr"].element_size()
        tail_es = 4 if meta["TAIL_DTYPE"] == tl.float32 else 2
        return tile_config.fitting(candidates, named_args["X_ptr"].device,
                                   lambda c: tile_config.gemm_smem(c, base_es, tail_es, meta["BLOCK_R"]))

    @triton.jit
    def _adapter_range(a_s, n_adapters):
        """(lo, hi): the smallest and largest adapter ids among a tile's slots (hi < lo when none)."""
        lo = tl.min(a_s)
        hi = tl.max(tl.where(a_s < n_adapters, a_s, -1))
        return lo, hi

    # ------------------------------------------------------------------------------------------
    # seg_down: O[slot] = drop(X[token]) A_aᵀ over tiles of slots sorted by adapter
    # ------------------------------------------------------------------------------------------
    @tile_config.autotuned(tile_config.SKINNY_TC + tile_config.SKINNY_FMA,
                           ["M_BUCKET", "K", "R", "DROPOUT", "PRECISION"], _prune_down)
    @triton.jit(do_not_specialize=["k0", "k1", "threshold"])
    def seg_down_kernel(
        # X (M, K) by token, the adapters' A (n, R, K), O (S, R) fp32 by slot
        X_ptr, stride_xm, stride_xk,
        A_ptr, stride_an, stride_ar, stride_ak,
        O_ptr, stride_om, stride_or,
        # grouping: order (S,) the slot at each sorted position, key (S,) each slot's adapter
        # (n_adapters for none), ranks (n,)
        order_ptr, key_ptr, rank_ptr,
        S, K, R, n_adapters, slots_per_token, M_BUCKET,
        k0, k1, threshold, keep_scale,
        DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pos_ok = pos < S
        slot = tl.load(order_ptr + pos, mask=pos_ok, other=0)
        a_s = tl.load(key_ptr + slot, mask=pos_ok, other=n_adapters)
        tok = (slot // slots_per_token).to(tl.int64)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        lo, hi = _adapter_range(a_s, n_adapters)
        # Sorted slots: a tile holds a run of consecutive adapters, most often one or two.
        for a in range(lo, hi + 1):
            rows = a_s == a
            rank = tl.load(rank_ptr + a)
            if (tl.max(rows.to(tl.int32)) > 0) & (pid_r * BLOCK_R < rank):
                r_ok = offs_r < rank
                for kk in range(0, tl.cdiv(K, BLOCK_K)):
                    offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
                    # other adapters' rows load as 0 and add nothing to the shared accumulator
                    x = tl.load(X_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                                mask=rows[:, None] & (offs_k[None, :] < K), other=0.0)
                    if DROPOUT:
                        keep = _rng.tl_dropout_keep(k0, k1, threshold, tok[:, None], offs_k[None, :])
                        x = tl.where(keep, x, 0.0)
                    w = tl.load(A_ptr + tl.cast(a, tl.int64) * stride_an + offs_r[None, :] * stride_ar
                                + offs_k[:, None] * stride_ak,
                                mask=r_ok[None, :] & (offs_k[:, None] < K), other=0.0)
                    acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if DROPOUT:
            acc = acc * keep_scale
        tl.store(O_ptr + slot.to(tl.int64)[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
                 mask=pos_ok[:, None] & (offs_r[None, :] < R))

    # ------------------------------------------------------------------------------------------
    # bgmv_down: the same product for few slots, one program per (slot, rank block)
    # ------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["k0", "k1", "threshold"])
    def bgmv_down_kernel(
        X_ptr, stride_xm, stride_xk,
        A_ptr, stride_an, stride_ar, stride_ak,
        O_ptr, stride_om, stride_or,
        key_ptr, rank_ptr,
        K, R, n_adapters, slots_per_token,
        k0, k1, threshold, keep_scale,
        DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        slot = tl.program_id(0).to(tl.int64)
        pid_r = tl.program_id(1)
        a = tl.load(key_ptr + slot)
        valid = a < n_adapters
        a = tl.where(valid, a, 0).to(tl.int64)
        rank = tl.where(valid, tl.load(rank_ptr + a), 0)
        tok = slot // slots_per_token
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        if pid_r * BLOCK_R < rank:
            for kk in range(0, tl.cdiv(K, BLOCK_K)):
                offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                x = tl.load(X_ptr + tok * stride_xm + offs_k * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
                if DROPOUT:
                    x = tl.where(_rng.tl_dropout_keep(k0, k1, threshold, tok, offs_k), x, 0.0)
                w = tl.load(A_ptr + a * stride_an + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                            mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(w * x[None, :], axis=1)
        if DROPOUT:
            acc = acc * keep_scale
        tl.store(O_ptr + slot * stride_om + offs_r * stride_or, acc, mask=offs_r < R)

    # ------------------------------------------------------------------------------------------
    # seg_gemm: O[token] = X[token] Wᵀ + bias + [mask ⊙] Σ_j c_j · H[slot_j] B_aᵀ, in one pass
    # ------------------------------------------------------------------------------------------
    @tile_config.autotuned(tile_config.GEMM_TC + _GEMM_FMA + _GEMM_FMA_80,
                           ["M_BUCKET", "N", "K", "R", "ORDERED", "TAIL_DROPOUT", "BASE_PRECISION", "TAIL_PRECISION"],
                           _prune_gemm)
    @triton.jit(do_not_specialize=["k0", "k1", "threshold"])
    def seg_gemm_kernel(
        # base operands: X (M, K) and W (N, K)
        X_ptr, stride_xm, stride_xk,
        W_ptr, stride_wn, stride_wk,
        # tail: H (S, R) fp32 by slot, the adapters' B (n, N, R), coefficients (S,) fp32
        H_ptr, stride_hm, stride_hr,
        B_ptr, stride_bn_a, stride_bn, stride_br,
        coef_ptr, key_ptr, rank_ptr,
        # rows (M,): the token at each position (tokens sorted by their first slot's adapter)
        rows_ptr, bias_ptr,
        O_ptr, stride_om, stride_on,
        M, N, K, R, n_adapters, slots_per_token, M_BUCKET,
        k0, k1, threshold, keep_scale,
        ORDERED: tl.constexpr, HAS_BIAS: tl.constexpr, TAIL_DROPOUT: tl.constexpr,
        BASE_DTYPE: tl.constexpr, TAIL_DTYPE: tl.constexpr,
        BASE_PRECISION: tl.constexpr, TAIL_PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = gemm.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = pos < M
        if ORDERED:
            tok = tl.load(rows_ptr + pos, mask=m_ok, other=0)
        else:
            tok = pos
        tok = tok.to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = offs_n < N

        # The tail first (the dropout mask applies to it alone), then the base GEMM on top.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in range(0, slots_per_token):
            slot = tok * slots_per_token + j
            a_s = tl.load(key_ptr + slot, mask=m_ok, other=n_adapters)
            c = tl.load(coef_ptr + slot, mask=m_ok, other=0.0)
            lo, hi = _adapter_range(a_s, n_adapters)
            for a in range(lo, hi + 1):
                rows = a_s == a
                if tl.max(rows.to(tl.int32)) > 0:
                    rank = tl.load(rank_ptr + a)
                    for r0 in range(0, rank, BLOCK_R):
                        offs_r = r0 + tl.arange(0, BLOCK_R)
                        r_ok = offs_r < rank
                        h = tl.load(H_ptr + slot[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                                    mask=rows[:, None] & r_ok[None, :], other=0.0)
                        b = tl.load(B_ptr + tl.cast(a, tl.int64) * stride_bn_a + offs_r[:, None] * stride_br
                                    + offs_n[None, :] * stride_bn,
                                    mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                        acc = tl.dot((h * c[:, None]).to(TAIL_DTYPE), b.to(TAIL_DTYPE), acc,
                                     input_precision=TAIL_PRECISION)
        if TAIL_DROPOUT:
            acc = gemm.dropout_tile(acc, tok, offs_n, k0, k1, threshold, keep_scale)

        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(X_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_ok[:, None] & (offs_k[None, :] < K), other=0.0)
            w = tl.load(W_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                        mask=n_ok[None, :] & (offs_k[:, None] < K), other=0.0)
            acc = tl.dot(x.to(BASE_DTYPE), w.to(BASE_DTYPE), acc, input_precision=BASE_PRECISION)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(O_ptr + tok[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(O_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    # ------------------------------------------------------------------------------------------
    # seg_reduce: P[split, a] = Σ_{sorted slots of a in the split} G[slot]ᵀ drop(X[token])
    # ------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["k0", "k1", "threshold"])
    def seg_reduce_kernel(
        G_ptr, stride_gm, stride_gr,
        X_ptr, stride_xm, stride_xf,
        P_ptr, stride_ps, stride_pa, stride_pr, stride_pf,
        order_ptr, offsets_ptr, rank_ptr,
        F, R, slots_per_token, n_splits,
        k0, k1, threshold, keep_scale,
        DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
    ):
        pid_f = tl.program_id(0)
        a = tl.program_id(1) // n_splits
        split = tl.program_id(1) % n_splits
        pid_r = tl.program_id(2)
        start = tl.load(offsets_ptr + a)
        end = tl.load(offsets_ptr + a + 1)
        chunk = tl.cdiv(tl.cdiv(end - start, n_splits), BLOCK_M) * BLOCK_M
        row_start = start + split * chunk
        row_end = tl.minimum(row_start + chunk, end)
        rank = tl.load(rank_ptr + a)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        if pid_r * BLOCK_R >= rank:
            row_end = row_start  # a rank block past this adapter's rank: zeros
        # Transposed, Pᵀ = drop(X)ᵀ G, so the product's M side is BLOCK_F (see outer_reduce).
        acc = tl.zeros((BLOCK_F, BLOCK_R), dtype=tl.float32)
        for p0 in range(row_start, row_end, BLOCK_M):
            pos = p0 + tl.arange(0, BLOCK_M)
            ok = pos < row_end
            slot = tl.load(order_ptr + pos, mask=ok, other=0).to(tl.int64)
            tok = slot // slots_per_token
            xt = tl.load(X_ptr + tok[None, :] * stride_xm + offs_f[:, None] * stride_xf,
                         mask=ok[None, :] & f_ok[:, None], other=0.0)
            if DROPOUT:
                keep = _rng.tl_dropout_keep(k0, k1, threshold, tok[None, :], offs_f[:, None])
                xt = tl.where(keep, xt, 0.0)
            g = tl.load(G_ptr + slot[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                        mask=ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(xt.to(DOT_DTYPE), g.to(DOT_DTYPE), acc, input_precision=PRECISION)
        if DROPOUT:
            acc = acc * keep_scale
        tl.store(P_ptr + split * stride_ps + tl.cast(a, tl.int64) * stride_pa + offs_r[None, :] * stride_pr
                 + offs_f[:, None] * stride_pf, acc,
                 mask=(offs_r[None, :] < R) & f_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Triton launchers. Callers validate; these only allocate and launch.
# ----------------------------------------------------------------------------------------------
def group(key: Tensor, n: int) -> Tensor:
    """The grouping of the slots by adapter, as one int64 tensor (S + M + n + 2,):
    order (S,) the slots sorted by adapter (stable), rows (M,) the tokens sorted by their first
    slot's adapter, offsets (n + 2,) where adapter a's sorted slots begin (a = n: the empty ones).
    A sort and a searchsorted: no atomics, no host synchronisation."""
    flat = key.reshape(-1)
    sorted_key, order = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(sorted_key, torch.arange(n + 2, device=key.device, dtype=key.dtype))
    rows = order if key.shape[1] == 1 else torch.sort(key[:, 0], stable=True)[1]
    return torch.cat([order, rows, offsets])


def ungroup(grouping: Tensor, S: int, M: int):
    """(order (S,), rows (M,), offsets (n + 2,)) of a grouping (see group)."""
    return grouping[:S], grouping[S:S + M], grouping[S + M:]


def seg_down(x2, a3, key, ranks, order, kslots, dot_dtype, dropout, out=None):
    """(S, R) fp32 = drop(x[token]) a3[adapter]ᵀ per slot; a3 (n, R, K) any strides; order None:
    the BGMV kernel over slots in arrival order."""
    S, K, R, n = key.numel(), x2.shape[1], a3.shape[1], a3.shape[0]
    if out is None:
        out = torch.empty((S, R), device=x2.device, dtype=torch.float32)
    flat = key.reshape(-1)
    drop = gemm.dropout_args(dropout)
    if order is None:
        block_r = min(64, max(16, triton.next_power_of_2(R)))
        bgmv_down_kernel[(S, triton.cdiv(R, block_r))](
            x2, x2.stride(0), x2.stride(1), a3, *a3.stride(), out, out.stride(0), out.stride(1),
            flat, ranks, K, R, n, kslots, *drop,
            DROPOUT=dropout is not None, BLOCK_R=block_r, BLOCK_K=128 if _backend.tile_arch(x2.device) else 32,
        )
        return out
    block_r = tile_config.skinny_rank_block(R, dot_dtype, x2.device)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), triton.cdiv(R, block_r))  # noqa: E731
    seg_down_kernel[grid](
        x2, x2.stride(0), x2.stride(1), a3, *a3.stride(), out, out.stride(0), out.stride(1),
        order, flat, ranks, S, K, R, n, kslots, tile_config.m_bucket(S), *drop,
        DROPOUT=dropout is not None, DOT_DTYPE=tile_config.TL_DTYPES[dot_dtype],
        PRECISION=tile_config.dot_precision(dot_dtype, x2.dtype), BLOCK_R=block_r,
    )
    return out


def seg_gemm(x, w, bias, h, b3, coef, key, ranks, rows, kslots, tail_dtype, tail_dropout=None, out=None):
    """O (M, N) = x wᵀ + bias + [mask ⊙] Σ_j coef · h[slot] b3[adapter]ᵀ; w (N, K), b3 (n, N, R)."""
    M, K = x.shape
    N, R, n = w.shape[0], b3.shape[2], b3.shape[0]
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    # The epilogue reads bias (N,) as contiguous: its copy is negligible next to the (M, N) output.
    bias = None if bias is None else bias.contiguous()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    seg_gemm_kernel[grid](
        x, x.stride(0), x.stride(1), w, w.stride(0), w.stride(1),
        h, h.stride(0), h.stride(1), b3, *b3.stride(),
        coef.reshape(-1), key.reshape(-1), ranks,
        rows if rows is not None else key, bias if bias is not None else out,
        out, out.stride(0), out.stride(1),
        M, N, K, R, n, kslots, tile_config.m_bucket(M), *gemm.dropout_args(tail_dropout),
        ORDERED=rows is not None, HAS_BIAS=bias is not None, TAIL_DROPOUT=tail_dropout is not None,
        BASE_DTYPE=tile_config.TL_DTYPES[x.dtype], TAIL_DTYPE=tile_config.TL_DTYPES[tail_dtype],
        BASE_PRECISION=tile_config.dot_precision(x.dtype),
        TAIL_PRECISION=tile_config.dot_precision(tail_dtype, x.dtype),
        BLOCK_R=tile_config.rank_block(R, tail_dtype, cap=32),
    )
    return out


def seg_reduce(g, x, order, offsets, ranks, kslots, n, dot_dtype, dropout=None, splits=None, partial=None):
    """(n, R, F) fp32: for each adapter, Σ over its slots of g[slot]ᵀ drop(x[token]), g (S, R), x (M, F).
    ``partial`` (splits, n, R, F) fp32 may be given (tests poison it)."""
    R, F = g.shape[1], x.shape[1]
    arch = _backend.tile_arch(x.device)
    small = arch is None or dot_dtype == torch.float32
    # 16-bit tiles: 64 x 128, or 64 x 64 on sm_80 (mma.sync's register operands spill the wider one)
    block_m, block_f = (32, 32) if arch is None else ((32, 64) if small else (64, 128 if arch >= 90 else 64))
    block_r = tile_config.rank_block(R, dot_dtype)
    tiles = triton.cdiv(F, block_f) * triton.cdiv(R, block_r) * n
    if splits is None:
        # Split each adapter's slots when the adapters alone leave the GPU idle (few adapters, or
        # most tokens on one), bounded so the fp32 partials stay within 4x the output.
        target = 1 if arch is None else 4 * tile_config.sm_count(x.device)
        splits = max(1, min(4, triton.cdiv(target, tiles), triton.cdiv(g.shape[0], block_m)))
    if partial is None:
        partial = torch.empty((splits, n, R, F), device=x.device, dtype=torch.float32)
    seg_reduce_kernel[(triton.cdiv(F, block_f), n * splits, triton.cdiv(R, block_r))](
        g, g.stride(0), g.stride(1), x, x.stride(0), x.stride(1),
        partial, *partial.stride(), order, offsets, ranks, F, R, kslots, splits,
        *gemm.dropout_args(dropout),
        DROPOUT=dropout is not None, DOT_DTYPE=tile_config.TL_DTYPES[dot_dtype],
        PRECISION=tile_config.dot_precision(dot_dtype, x.dtype),
        BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_F=block_f, num_warps=4,
    )
    return partial[0] if splits == 1 else partial.sum(0)


# ----------------------------------------------------------------------------------------------
# The op's stages per backend (registry.Impl callables of ops/multi_lora.py): arguments as the
# registered ops', the dropout (p, seed) made into the kernels' Dropout here
# ----------------------------------------------------------------------------------------------
def triton_forward(x2, weight, lora_A, lora_B, bias, key, coef, ranks, grouping, dropout_p, seed):
    """(y (M, N), h (S, R) fp32); an empty grouping decodes the slots in arrival order."""
    dropout = gemm.Dropout.make(dropout_p, seed)
    S, M = key.numel(), x2.shape[0]
    order, rows = (None, None) if grouping.numel() == 0 else ungroup(grouping, S, M)[:2]
    h = seg_down(x2, lora_A, key, ranks, order, key.shape[1], lora_A.dtype, dropout)
    y = seg_gemm(x2, weight, bias, h, lora_B, coef, key, ranks, rows, key.shape[1], lora_A.dtype)
    return y, h


def triton_backward(dy, x2, weight, lora_A, lora_B, h, key, coef, ranks, grouping, dropout_p, seed, need_dx):
    """(dx or None, d lora_A, d lora_B, d coef (M, k))."""
    dropout = gemm.Dropout.make(dropout_p, seed)
    S, M, n = key.numel(), x2.shape[0], lora_A.shape[0]
    kslots, adt = key.shape[1], lora_A.dtype
    order, rows, offsets = ungroup(grouping, S, M)
    g = seg_down(dy, lora_B.transpose(1, 2), key, ranks, order, kslots, adt, None)
    cflat = coef.reshape(-1, 1).to(torch.float32)
    d_A = seg_reduce(g * cflat, x2, order, offsets, ranks, kslots, n, adt, dropout).to(adt)
    d_B = seg_reduce(h * cflat, dy, order, offsets, ranks, kslots, n, adt).transpose(1, 2).to(adt)
    dcoef = (g * h).sum(1).reshape(key.shape)
    dx = None
    if need_dx:
        dx = seg_gemm(dy, weight.t(), None, g, lora_A.transpose(1, 2), coef, key, ranks, rows, kslots, adt,
                      tail_dropout=dropout)
    return dx, d_A, d_B, dcoef


def cuda_forward(x2, weight, lora_A, lora_B, bias, key, coef, ranks, grouping, dropout_p, seed):
    """triton_forward's result from csrc/multi_lora.cu (through csrc/multi_lora_binding.cpp); slots grouped."""
    k0, k1, threshold, keep_scale = gemm.dropout_args(gemm.Dropout.make(dropout_p, seed))
    return _backend.cuda_extension().multi_lora_fwd(
        x2, weight, lora_A, lora_B, bias, key, coef.to(torch.float32), ranks, grouping,
        threshold, k0, k1, keep_scale,
    )


def cuda_backward(dy, x2, weight, lora_A, lora_B, h, key, coef, ranks, grouping, dropout_p, seed, need_dx):
    """triton_backward's result from csrc/multi_lora.cu (through csrc/multi_lora_binding.cpp)."""
    k0, k1, threshold, keep_scale = gemm.dropout_args(gemm.Dropout.make(dropout_p, seed))
    dx, d_A, d_B, dcoef = _backend.cuda_extension().multi_lora_bwd(
        dy, x2, weight, lora_A, lora_B, h, key, coef.to(torch.float32), ranks, grouping,
        threshold, k0, k1, keep_scale, need_dx,
    )
    return (dx if need_dx else None), d_A, d_B, dcoef
