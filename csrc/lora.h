// Host API of the fused LoRA linear's CUDA kernels (csrc/lora.cu). Torch-free: raw pointers,
// sizes, strides and a stream, so the kernels compile without the torch headers; the torch
// binding (csrc/bindings.cpp) validates, allocates and composes them with cuBLAS.
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

}  // namespace lora
}  // namespace lowrank_kernels
