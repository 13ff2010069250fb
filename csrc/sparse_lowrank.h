// Host API of the sparse part of the sparse-plus-low-rank linear (csrc/sparse_lowrank.cu).
// Torch-free: raw pointers, sizes, strides and a stream; the torch binding (csrc/sparse_lowrank_binding.cpp)
// validates, allocates and composes these with cuBLAS for the low-rank GEMMs.
//
// S (N, K) holds nnz values on a fixed support, in the order of its sorted flat row-major index
// (SLTrain's convention). T is S or Sᵀ. Dtypes: the dense operands (x, dy, y) are fp32, fp16 or
// bf16; the values share that dtype or are fp32. Everything accumulates in fp32 FMAs. Functions
// return the launch status (cudaErrorNotSupported for a dtype pair outside that set, or
// cudaErrorInvalidValue for a block larger than 1024 entries).
#pragma once

#include <cstdint>

#include "types.h"

namespace lowrank_kernels {
namespace sparse_lowrank {

// The kernels gather whole token columns, so token-major operands (View::stride0 == 1) coalesce.

// y (M, R) += x (M, C) · Tᵀ for a uniform support in CSR form: row_ptr (R + 1) over T's rows;
// the flat index (int64, into N×K with K = n_cols) gives each entry's column of T (index % K for
// T = S, index / K for T = Sᵀ); pos (nnz, T = Sᵀ only, else null) maps T's entry order to the
// value order.
cudaError_t spmm_csr(DType dense, DType values, View x, const void* vals, const int64_t* index,
                     const int32_t* row_ptr, const int32_t* pos, MutView y, int64_t M, int64_t R,
                     int64_t n_cols, bool transpose, cudaStream_t stream);

// out (nnz) = (dyᵀ x) at the support: out[p] = Σ_m dy[m, index[p] / K] · x[m, index[p] % K].
cudaError_t sddmm_csr(DType dense, DType values, View dy, View x, const int64_t* index, void* out,
                      int64_t M, int64_t K, int64_t nnz, cudaStream_t stream);

// A block support: blocks of bh × bw in block-row order, each with its first row and column and
// the offset of its (0, 0) value and the value stride between its rows.
struct Blocks {
  const int32_t* row0;
  const int32_t* col0;
  const int32_t* base;
  const int32_t* rowlen;
  int32_t bh, bw;
};

// y (M, R) += x (M, C) · Tᵀ for a block support: ptr (one more than T's block-rows) groups the
// blocks by T's block-rows, order (T = Sᵀ only, else null) lists block ids in that grouping.
cudaError_t spmm_block(DType dense, DType values, View x, const void* vals, Blocks blocks,
                       const int32_t* ptr, const int32_t* order, int64_t n_tiles, MutView y,
                       int64_t M, int64_t R, int64_t C, bool transpose, cudaStream_t stream);

// out (nnz) = (dyᵀ x) at a block support (dy (M, N), x (M, K)), n_blocks blocks.
cudaError_t sddmm_block(DType dense, DType values, View dy, View x, Blocks blocks, int64_t n_blocks,
                        void* out, int64_t M, int64_t N, int64_t K, cudaStream_t stream);

}  // namespace sparse_lowrank
}  // namespace lowrank_kernels
