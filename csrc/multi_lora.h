// Host API of the multi-adapter LoRA linear's CUDA kernels (csrc/multi_lora.cu). Torch-free: raw
// pointers, sizes, strides and a stream; csrc/multi_lora_binding.cpp validates, allocates and composes them
// with cuBLAS. Math in lowrank_kernels/ops/multi_lora.py.
//
// The (token, slot) pairs ("slots", S = M · k of them) arrive grouped by adapter: `order` lists the
// slots sorted by adapter, and adapter a's slots sit at sorted positions offsets[a] ..
// offsets[a + 1]; slot s belongs to token s / k. Every kernel works on those segments, one adapter
// per tile, so each tile reads one adapter's weights. Dtypes as in csrc/lora.h: the base (x, dy,
// weight, y, dx) fp32, fp16 or bf16, the adapters the base's dtype or fp32; fp32 accumulation.
#pragma once

#include <cstdint>

#include "types.h"

namespace lowrank_kernels {
namespace multi_lora {

struct Segments {
  const int64_t* order;    // (S,) device: the slot at each sorted position
  const int64_t* offsets;  // (n + 1,) device: where each adapter's sorted positions begin
  const int32_t* ranks;    // (n,) device: each adapter's rank, <= R
  int64_t n, S, slots_per_token;
};

// out (S, R) fp32, row p = sorted position p of adapter a's segment:
//   alpha · drop(x[token(p)]) (K) · A_aᵀ,   A_a (R, K) at a + adapter · stride_a (a: r, k strides)
// Columns from rank_a on are 0; rows of the slots without adapter are not written.
cudaError_t seg_down(DType base, DType adapter, View x, View a, int64_t stride_a, MutView out, int64_t K,
                     int64_t R, float alpha, Dropout drop, const Segments& seg, const Launch& launch);

// out[token(p)] += alpha · [keep ⊙] (h[p] (R) · B_aᵀ) for the sorted positions p whose slot % k ==
// phase (one token at most once per call: callers run the phases in turn), with h (S, R) in
// `adapter` by sorted position, B_a (N, R) at b + adapter · stride_b (b: n, r strides), out (M, N)
// in `base`; the dropout mask, if any, indexes out at (token, n).
cudaError_t seg_expand(DType base, DType adapter, View h, View b, int64_t stride_b, MutView out, int64_t N,
                       int64_t R, float alpha, Dropout drop, const Segments& seg, int64_t phase,
                       const Launch& launch);

// out (n, R, F) fp32, out[a] = alpha · Σ_{p in adapter a's segment} g[p]ᵀ (R) drop(x[token(p)]) (F),
// g (S, R) in `adapter` by sorted position, x (M, F) in `base`: dA (with x) and dBᵀ (with dy).
// Rows from rank_a on, and adapters without slots, get 0. No split, no atomics: deterministic.
cudaError_t seg_reduce(DType base, DType adapter, View g, View x, float* out, int64_t F, int64_t R,
                       float alpha, Dropout drop, const Segments& seg, const Launch& launch);

}  // namespace multi_lora
}  // namespace lowrank_kernels
