// Host API of the random-basis products' CUDA kernels (csrc/random_basis.cu), for VeRA and
// RandLoRA (math in lowrank_kernels/ops/random_basis.py). Torch-free: raw pointers, sizes,
// strides and a stream; the torch binding (csrc/random_basis_binding.cpp) validates, allocates and composes
// these kernels with cuBLAS.
//
// Dtypes: the base (x, dy, bias and the outputs y, dx) is fp32, fp16 or bf16; the adapter (basis
// tensors and scales) shares the base dtype or is fp32. The rank-R intermediates (h, dh) are fp32.
// Every product accumulates in fp32. Functions return the launch status (cudaSuccess, or
// cudaErrorNotSupported for a dtype pair outside that set).
#pragma once

#include <cstdint>

#include "types.h"

namespace lowrank_kernels {
namespace random_basis {

// How a seeded base is drawn (the values of ops/gemm.py's Basis.dist).
enum class Gen : int { kStored = 0, kUniform = 1, kSign = 2 };

// A low-rank operand S (rows × cols), read or generated element by element, never stored:
//     S[j, f] = row_scale[hi, lo] · base[hi, lo, f] · col_scale[lo, f],   hi = j / groups, lo = j % groups
// (ops/gemm.py, Basis). A stored base lies at data + hi * s_hi + lo * s_lo + f * s_f, in the
// adapter dtype (a stride of 0 broadcasts). A seeded base is 2u - 1 (kUniform, u in [0, 1)) or
// ±1 (kSign) of rng::hash32(k0, k1, hi, f), or of hash32(k0, k1, f, hi) when `transposed`. The
// scales are optional (null: 1), in the adapter dtype, row_scale at hi * rs_hi + lo * rs_lo,
// col_scale at lo * cs_g + f * cs_f. rows is a multiple of groups and below 2^31.
struct Basis {
  int64_t rows, cols, groups;
  Gen gen;
  const void* data;
  int64_t s_hi, s_lo, s_f;
  uint32_t k0, k1;
  bool transposed;
  const void* row_scale;
  int64_t rs_hi, rs_lo;
  const void* col_scale;
  int64_t cs_g, cs_f;
};

// out (M, R) fp32 = alpha · drop(x) (M, F) · Sᵀ, S (R, F) = s: h = keep_scale · drop(x) Dᵀ
// (mask at (m, f)), and dh = dy Uᵀ without a mask.
int64_t down_workspace(int64_t M, const Basis& s, int num_sms);
cudaError_t down(DType base, DType adapter, View x, const Basis& s, MutView out, int64_t M, float alpha,
                 Dropout drop, const Launch& launch);

// out (M, F) in `base` = alpha · [keep ⊙] (h (M, R) fp32 · S) + bias, S (R, F) = s, bias (F) in
// `base` or null; the dropout mask, if any, indexes out at (m, f). The low-rank terms of y
// (s · h U + bias) and of dx (s · keep_scale · keep ⊙ (dh D)); the base GEMM accumulates on top.
int64_t up_workspace(int64_t M, const Basis& s, int num_sms);
cudaError_t up(DType base, DType adapter, View h, const Basis& s, const void* bias, MutView out, int64_t M,
               float alpha, Dropout drop, const Launch& launch);

// The gradients of s's scales given dL/dS = alpha · gᵀ drop(x), g (M, R) fp32, x (M, F) in `base`:
//     d_row_scale[j]    = Σ_f  dS[j, f] · base[j, f] · col_scale[j % G, f]          (R), flat j
//     d_col_scale[l, f] = Σ_{j % G = l} dS[j, f] · row_scale[j] · base[j, f]        (G, F)
// computed tile by tile where dS is formed, never storing it. Each block writes fp32 partials:
// d_row (splits, f_tiles, R) and d_col (splits, hi_tiles, G, F), both contiguous, every element
// written; their sums over the first two dimensions, in a fixed order, are the gradients.
struct ReducePlan {
  int64_t splits, f_tiles, hi_tiles;  // the partial buffers' leading dimensions
  int64_t lo_tiles, rows_per_split;
  int block_hi, block_lo;             // a tile's rows: block_hi values of hi × block_lo of lo
};
ReducePlan scale_grads_plan(int64_t M, const Basis& s, int num_sms);
cudaError_t scale_grads(DType base, DType adapter, View g, View x, const Basis& s, int64_t M, float alpha,
                        Dropout drop, const ReducePlan& plan, float* d_row, float* d_col, cudaStream_t stream);

}  // namespace random_basis
}  // namespace lowrank_kernels
