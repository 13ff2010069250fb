"""Tile configuration of the package's Triton GEMM kernels: what each product class may run with.

A few candidate tiles per class of product (tensor-core or FMA operands, a 4-bit base, the
interpreter), the register and shared-memory budgets that prune them before compiling to those
that fit the target (backend.tile_arch: sm_80, sm_90a, or the interpreter), and the launch-time
choices that depend on the product or the device: the Triton dtype and input precision of a
product, its rank block, the autotune key's token bucket, how a reduction over tokens is split.
``make gpu-check`` proves that every tile the pruning keeps compiles for sm_80 and sm_90a without
spills, for every signature the ops launch.

The kernels are in ops/gemm.py (shared by the low-rank ops) and beside the ops that own them
(e.g. ops/multi_lora_kernels.py), whose own pruning builds on the helpers here.
"""

from __future__ import annotations

import functools
import os

import torch

from lowrank_kernels.backend import tile_arch, triton_available

AUTOTUNE_ENV = "LOWRANK_KERNELS_AUTOTUNE"

# Shared memory a block may opt into (bytes), for planning without a device: A100, H100/H200.
SMEM_LIMITS = {80: 166912, 90: 232448}


def smem_limit(device: torch.device) -> int:
    """Per-block shared memory limit of ``device``, or of the GPU a compile-only run plans for."""
    if device.type == "cuda":
        return _device_smem(device.index if device.index is not None else torch.cuda.current_device())
    return SMEM_LIMITS.get(tile_arch(device) or 90, SMEM_LIMITS[80])


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def fp32_precision() -> str:
    """Triton input_precision for fp32 products, following torch's matmul setting."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


if triton_available():
    import triton
    import triton.language as tl

    TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

    def cfg(bm, bn, bk, warps, stages, group=8):
        """A GEMM tile: BLOCK_M x BLOCK_N outputs, BLOCK_K deep, GROUP_M row-panels swept together."""
        return triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
            num_warps=warps,
            num_stages=stages,
        )

    def skinny_cfg(bm, bk, warps, stages):
        """A skinny product's tile (the rank block is chosen by the launcher): BLOCK_M rows, BLOCK_K deep."""
        return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)

    # Candidate tiles per class of product; the prune_* hooks keep those of a call's class that
    # stay within its register budget and the device's shared memory, and `make gpu-check` proves
    # that what they keep compiles for sm_80 and sm_90a without spills, for every signature the
    # ops launch. Few candidates keep the first call's compile-and-tune cost bounded.
    # - tensor-core products (bf16/fp16, TF32 when allowed, 3xTF32 tails): big tiles, deep pipelines.
    # - fp32 operands (IEEE on FMA units, or split for 3xTF32) keep more in registers: small tiles.
    # - the last tile of each list suits small M (decode).
    GEMM_TC = [cfg(128, 256, 64, 8, 3), cfg(128, 128, 64, 8, 4), cfg(64, 128, 64, 4, 4), cfg(64, 128, 64, 8, 4),
               cfg(32, 64, 64, 4, 4)]
    GEMM_FMA = [cfg(128, 64, 32, 8, 3), cfg(32, 64, 32, 8, 3)]
    SKINNY_TC = [skinny_cfg(64, 128, 4, 3), skinny_cfg(128, 128, 8, 3), skinny_cfg(64, 64, 4, 4)]
    SKINNY_FMA = [skinny_cfg(64, 32, 4, 3), skinny_cfg(128, 32, 8, 3)]
    # A 4-bit W (W_QUANT) is dequantised in registers from several gathers an element (codes, code
    # table, scales), each pipelined through shared memory like a tile: about 6.5 bytes an element
    # and stage, 9.5 with nested scales (make gpu-check), so these tiles are shorter along K.
    GEMM_TC_Q = [cfg(128, 128, 32, 8, 3), cfg(64, 128, 32, 8, 3), cfg(32, 64, 32, 4, 3)]
    GEMM_FMA_Q = [cfg(32, 64, 32, 8, 2)]
    INTERP_GEMM = [cfg(32, 32, 32, 4, 1)]
    INTERP_SKINNY = [skinny_cfg(32, 32, 4, 1)]

    def autotuned(configs, key, prune):
        """``triton.autotune`` over ``configs`` keyed on ``key``, the candidates of a call pruned by
        ``prune(configs, named_args, **meta)`` before anything compiles. Keys use M_BUCKET (M
        rounded up to a power of two, see m_bucket) rather than M: token counts change from batch
        to batch, and re-tuning for each would cost more than it gains."""
        return triton.autotune(configs=configs, key=key, restore_value=[],
                               prune_configs_by={"early_config_prune": prune})

    def fitting(candidates, device, smem):
        """The candidates whose shared memory ``smem(cfg)`` fits ``device`` (the last one if none
        does), as the autotuner will time them: LOWRANK_KERNELS_AUTOTUNE=0 takes the first alone
        (no timing, one compile per kernel variant: for test suites and quick starts)."""
        limit = smem_limit(device)
        fits = [c for c in candidates if smem(c) <= limit] or candidates[-1:]
        return fits[:1] if os.environ.get(AUTOTUNE_ENV, "1") == "0" else fits

    def on_tensor_cores(dot_dtype, precision) -> bool:
        return dot_dtype != tl.float32 or precision != "ieee"

    def per_thread(cfg):
        """Accumulator values a thread holds at ``cfg``."""
        return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] // (32 * cfg.num_warps)

    def gemm_smem(cfg, base_es, tail_es, block_r, w_es=None):
        """Shared bytes of lowrank_gemm at ``cfg``: the larger of its two pipelined loops (W's
        bytes an element ``w_es``, when they differ from x's)."""
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        base = cfg.num_stages * (bm * bk * base_es + bk * bn * (w_es or base_es))
        tail = cfg.num_stages * (bm * block_r + block_r * bn) * tail_es
        return max(base, tail)

    def skinny_smem(cfg, x_es, a_es, block_r):
        """Shared bytes of a skinny product (down_proj) at ``cfg``."""
        bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
        return cfg.num_stages * (bm * bk * x_es + bk * block_r * a_es)

    def prune_gemm(configs, named_args, **meta):
        """lowrank_gemm's candidates for one call (its early_config_prune)."""
        arch = tile_arch(named_args["X_ptr"].device)
        if arch is None:
            return INTERP_GEMM
        # The base loop sets the tile when there is one (K > 0); a tail-only product follows the tail.
        if named_args["K"] > 0:
            tc = on_tensor_cores(meta["BASE_DTYPE"], meta["BASE_PRECISION"])
        else:
            tc = on_tensor_cores(meta["TAIL_DTYPE"], meta["TAIL_PRECISION"])
        if meta["W_QUANT"]:
            candidates = GEMM_TC_Q if tc else GEMM_FMA_Q
        else:
            candidates = GEMM_TC if tc else GEMM_FMA
        # Accumulator values a thread can hold without spilling: 128 on sm_90a (wgmma reads its
        # operands from shared memory), 64 on sm_80 (mma.sync holds operand fragments in
        # registers) or with a dropout mask over the tile; 32 beside an fp32 tail on tensor cores
        # (3xTF32 splits each operand in two), and for a tail-only product (K = 0), 16 on FMA: its
        # base loop never runs but is compiled, and its W, a zero-width slice, may have a stride
        # that is no multiple of 16, which makes every W load scalar with a 64-bit pointer each.
        budget = 128 if arch >= 90 else 64
        if meta["TAIL_DROPOUT"]:
            budget = 64
        if (tc and meta["TAIL_DTYPE"] == tl.float32) or named_args["K"] == 0:
            budget = 32 if tc else 16
        candidates = [c for c in candidates if per_thread(c) <= budget] or candidates[-1:]
        base_es = named_args["X_ptr"].element_size()
        tail_es = named_args["H_ptr"].element_size()
        w_es = (10 if meta["W_NESTED"] else 7) if meta["W_QUANT"] else None
        return fitting(candidates, named_args["X_ptr"].device,
                       lambda c: gemm_smem(c, base_es, tail_es, meta["BLOCK_R"], w_es))

    def prune_skinny(configs, named_args, **meta):
        """down_proj's candidates for one call (its early_config_prune)."""
        arch = tile_arch(named_args["X_ptr"].device)
        if arch is None:
            return INTERP_SKINNY
        # fp32 operands (FMA, or split in three for 3xTF32) take the small tiles
        tc = meta["DOT_DTYPE"] != tl.float32
        candidates = SKINNY_TC if tc else SKINNY_FMA
        if meta["DROPOUT"] and meta["A_GEN"]:
            # the mask's and the basis's hashes over the tile: at most 32 x values a thread
            candidates = [c for c in candidates if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= 32 * 32 * c.num_warps]
        x_es = max(named_args["X_ptr"].element_size(), 2 if tc else 4)
        a_es = 4 if (meta["A_ROW_SCALE"] or meta["A_COL_SCALE"] or meta["A_GEN"]) else x_es
        return fitting(candidates, named_args["X_ptr"].device,
                       lambda c: skinny_smem(c, x_es, a_es, meta["BLOCK_R"]))


# ----------------------------------------------------------------------------------------------
# Launch-time choices (the launchers call these only where Triton is available)
# ----------------------------------------------------------------------------------------------
def rank_block(r: int, dot_dtype: torch.dtype, cap: int = 64) -> int:
    """The rank block of a product: tl.dot needs every dimension >= 16; 16-bit products take up
    to ``cap`` (fewer passes over the other operand); fp32 ones keep more in registers (FMA, or
    3xTF32's split operands), so 16: wider blocks spill."""
    if dot_dtype == torch.float32:
        return 16
    return min(cap, max(16, triton.next_power_of_2(r)))


def skinny_rank_block(r: int, dot_dtype: torch.dtype, device: torch.device) -> int:
    """The rank block of a skinny product (x (M, K) times a rank-r operand's transpose): sm_80's
    mma.sync holds operand fragments in registers, where 64-wide rank blocks spill."""
    return rank_block(r, dot_dtype, cap=64 if (tile_arch(device) or 90) >= 90 else 32)


def dot_precision(dot_dtype: torch.dtype, data_dtype: "torch.dtype | None" = None) -> str:
    """Triton input_precision of a product in ``dot_dtype`` whose other operand (activations,
    gradients) is ``data_dtype``. fp32 follows torch's matmul setting: IEEE unless TF32 is allowed.
    One exception: fp32 adapters on a 16-bit layer (PEFT's default) run as 3xTF32 on tensor cores,
    whose error (about 2**-21 relative) is fp32's, far below the 16-bit output's rounding, where
    IEEE FMA tiles would cost the base GEMM its tensor-core tile sizes."""
    if dot_dtype != torch.float32:
        return "ieee"
    if fp32_precision() == "tf32":
        return "tf32"
    return "tf32x3" if data_dtype in (torch.float16, torch.bfloat16) else "ieee"


def m_bucket(m: int) -> int:
    """The autotune key's token count: ``m`` rounded up to a power of two."""
    return triton.next_power_of_2(max(m, 1))


def m_splits(M: int, tiles: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of a reduction over M, enough to fill the GPU with ``tiles`` per split."""
    target = 1 if tile_arch(device) is None else 4 * sm_count(device)
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(target, tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    return (triton.cdiv(M, rows_per_split) if M else 1), rows_per_split


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
