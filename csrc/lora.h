// Host API of the fused LoRA linear's CUDA kernels (csrc/lora.cu). Torch-free: raw pointers,
// sizes, strides and a stream, so the kernels compile without the torch headers; the torch
// binding (csrc/lora_binding.cpp) validates, allocates and composes them with cuBLAS.
//
// Dtypes: the base (x, dy, weight, bias, y, dx) is fp32, fp16 or bf16; the adapters (A, B and
// the rank-r intermediates h, g) share the base dtype or are fp32. Every product accumulates in
// fp32. Functions return the launch status (cudaSuccess, or cudaErrorNotSupported for a dtype
// pair outside that set).
#pragma once

#include <cstdint>

#include "types.h"

namespace lowrank_kernels {
namespace lora {

// out (M, R) fp32 = alpha · drop(x) (M, K) · aᵀ, with x in `base` and a (R, K) in `adapter`.
// Also g = dy · B, as down_proj(dy, Bᵀ): a (R, K) may be any strided view.
int64_t down_proj_workspace(int64_t M, int64_t K, int64_t R, int num_sms);
cudaError_t down_proj(DType base, DType adapter, View x, View a, MutView out, int64_t M, int64_t K,
                      int64_t R, float alpha, Dropout drop, const Launch& launch);

// out (R, K) in `adapter` = alpha · gᵀ (R, M) · drop(x) (M, K), with g (M, R) in `adapter`, x in
// `base`: dA = s · gᵀ drop(x), and dBᵀ = s · hᵀ dy. Reduced over M deterministically.
int64_t outer_reduce_workspace(int64_t M, int64_t K, int64_t R, int num_sms);
cudaError_t outer_reduce(DType base, DType adapter, View g, View x, MutView out, int64_t M, int64_t K,
                         int64_t R, float alpha, Dropout drop, const Launch& launch);

// out (M, N) in `base` = alpha · [keep ⊙] (h (M, R) · bᵀ) + bias, with h, b (N, R) in `adapter`
// and bias (N) in `base` or null; the dropout mask, if any, indexes out at (m, n). Writes out
// (never reads it): the base GEMM accumulates on top afterwards with beta = 1.
int64_t rank_product_workspace(int64_t M, int64_t N, int64_t R, int num_sms);
cudaError_t rank_product(DType base, DType adapter, View h, View b, const void* bias, MutView out,
                         int64_t M, int64_t N, int64_t R, float alpha, Dropout drop, const Launch& launch);

// A bitsandbytes 4-bit matrix W (N, K) (QLoRA's base; lowrank_kernels/ops/_quant.py): its values
// flattened row-major, two 4-bit codes a byte (the even flat index e in the high nibble), and
//   W[e] = code[q(e)] · absmax(e >> log2_blocksize),
//   absmax(b) = nested ? code2[absmax8[b]] · absmax2[b >> log2_blocksize2] + *offset : absmax[b].
struct Quant4 {
  const uint8_t* packed;
  const void* absmax;    // fp32 (blocks), or uint8 (blocks) when nested
  const float* code;     // 16 values (NF4 or FP4)
  const float* absmax2;  // nested only: fp32 (ceil(blocks / blocksize2))
  const float* code2;    // nested only: 256 values
  const float* offset;   // nested only: one value
  int log2_blocksize, log2_blocksize2;
  bool nested;
};

// out (M, J) in `base` += x (M, L) · Wq (L, J), where Wq(l, j) is W's flat element
// j · stride_j + l · stride_l: the forward's x Wᵀ is (J, L) = (N, K) with strides (K, 1), the
// backward's dy W is (J, L) = (K, N) with strides (1, K). W is dequantised tile by tile into
// shared memory (never into global memory) and multiplied on tensor cores: `base` is fp16 or
// bf16 (cudaErrorNotSupported otherwise). Reads out once and writes it once; no workspace.
cudaError_t quant4_gemm_accumulate(DType base, View x, const Quant4& w, int64_t stride_j, int64_t stride_l,
                                   MutView out, int64_t M, int64_t J, int64_t L, const Launch& launch);

}  // namespace lora
}  // namespace lowrank_kernels
