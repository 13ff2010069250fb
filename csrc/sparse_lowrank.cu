// CUDA kernels for the sparse part of the sparse-plus-low-rank linear (SLTrain); the math is in
// lowrank_kernels/ops/sparse_lowrank.py and the host API in sparse_lowrank.h.
//
// The low-rank GEMMs go to cuBLAS from the binding; these kernels do what cuBLAS cannot: the SpMM
// y += x Tᵀ (T = S forward, Sᵀ for dx) and the SDDMM (dyᵀ x) at the support, without ever forming
// a dense N×K matrix. All arithmetic is fp32 FMA on operands widened exactly to fp32.
//
// Uniform support (CSR): each warp walks one row of T and gathers whole token columns of x, so
// with a token-major x (the launcher passes one) every gather is a coalesced 128-token segment;
// a block's 32 rows × 128 tokens are staged in shared memory and written (accumulated into y)
// with consecutive threads on consecutive columns of y. The SDDMM gives each entry one warp that
// reduces over tokens in a fixed order (deterministic, no atomics).
// Block support: one thread block per (token tile, block-row of T), the current block's values
// in shared memory, x read along tokens. These use CUDA-core FMAs, not mma: the Triton path is
// the tensor-core one (see the README's backend table).
//
// Index math is int64 (token offsets, flat indices); per-support counts are int32 (nnz < 2^31).
#include "sparse_lowrank.h"
#include "tiles.cuh"

namespace lowrank_kernels {
namespace sparse_lowrank {
namespace {

using tiles::from_float;
using tiles::to_float;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------------------------
// Uniform support
// ---------------------------------------------------------------------------------------------
constexpr int kCsrRows = 32;         // rows of T per thread block
constexpr int kCsrTokensPerLane = 4;
constexpr int kCsrTokens = 32 * kCsrTokensPerLane;

template <typename TX, typename TV>
__global__ void __launch_bounds__(kThreads) spmm_csr_kernel(
    const TX* __restrict__ x, int64_t xs0, int64_t xs1, const TV* __restrict__ vals,
    const int64_t* __restrict__ index, const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ pos,
    TX* __restrict__ y, int64_t ys0, int64_t ys1, int64_t M, int64_t R, int64_t n_cols, bool transpose) {
  __shared__ float tile[kCsrRows][kCsrTokens + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kCsrTokens;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kCsrRows;
  for (int rl = warp; rl < kCsrRows; rl += kWarps) {
    float acc[kCsrTokensPerLane] = {};
    const int64_t r = r0 + rl;
    if (r < R) {
      const int32_t end = row_ptr[r + 1];
      for (int32_t q = row_ptr[r]; q < end; ++q) {
        const int64_t p = pos ? pos[q] : q;
        const int64_t flat = index[p];
        const int64_t col = transpose ? flat / n_cols : flat % n_cols;
        const float v = to_float(vals[p]);
        const TX* xc = x + col * xs1;
#pragma unroll
        for (int i = 0; i < kCsrTokensPerLane; ++i) {
          const int64_t m = m0 + lane + 32 * i;
          if (m < M) acc[i] = fmaf(v, to_float(xc[m * xs0]), acc[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kCsrTokensPerLane; ++i) tile[rl][lane + 32 * i] = acc[i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kCsrRows * kCsrTokens; idx += kThreads) {
    const int rl = idx % kCsrRows, ml = idx / kCsrRows;
    const int64_t m = m0 + ml, r = r0 + rl;
    if (m < M && r < R) {
      TX* out = y + m * ys0 + r * ys1;
      *out = from_float<TX>(to_float(*out) + tile[rl][ml]);
    }
  }
}

template <typename TX, typename TV>
__global__ void __launch_bounds__(kThreads) sddmm_csr_kernel(
    const TX* __restrict__ dy, int64_t ds0, int64_t ds1, const TX* __restrict__ x, int64_t xs0, int64_t xs1,
    const int64_t* __restrict__ index, TV* __restrict__ out, int64_t M, int64_t K, int64_t nnz) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (p >= nnz) return;
  const int64_t flat = index[p];
  const int64_t row = flat / K, col = flat - row * K;
  const TX* d = dy + row * ds1;
  const TX* xc = x + col * xs1;
  float acc = 0.f;
  for (int64_t m = lane; m < M; m += 32) acc = fmaf(to_float(d[m * ds0]), to_float(xc[m * xs0]), acc);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) out[p] = from_float<TV>(acc);
}

// ---------------------------------------------------------------------------------------------
// Block support
// ---------------------------------------------------------------------------------------------
constexpr int kMaxBlock = 1024;  // bh · bw: one block's values fit shared memory, <= 4 outputs per thread

template <typename TX, typename TV>
__global__ void __launch_bounds__(kThreads) spmm_block_kernel(
    const TX* __restrict__ x, int64_t xs0, int64_t xs1, const TV* __restrict__ vals, Blocks blocks,
    const int32_t* __restrict__ ptr, const int32_t* __restrict__ order, TX* __restrict__ y, int64_t ys0,
    int64_t ys1, int64_t M, int64_t R, int64_t C, bool transpose, int tokens) {
  __shared__ float s[kMaxBlock];
  const int th = transpose ? blocks.bw : blocks.bh;  // T's block is th × tw
  const int tw = transpose ? blocks.bh : blocks.bw;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * tokens;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * th;
  const int outputs = tokens * th;
  float acc[kMaxBlock / kThreads] = {};
  for (int32_t q = ptr[blockIdx.y]; q < ptr[blockIdx.y + 1]; ++q) {
    const int32_t b = order ? order[q] : q;
    const int64_t c0 = transpose ? blocks.row0[b] : blocks.col0[b];
    const int64_t base = blocks.base[b], rowlen = blocks.rowlen[b];
    __syncthreads();  // the previous block's values are no longer read
    for (int e = threadIdx.x; e < th * tw; e += kThreads) {
      const int i = e / tw, j = e % tw;
      const bool ok = r0 + i < R && c0 + j < C;
      // Entry (i, j) of T's block; for T = Sᵀ it is entry (j, i) of S's block.
      const int64_t at = transpose ? base + j * rowlen + i : base + i * rowlen + j;
      s[e] = ok ? to_float(vals[at]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMaxBlock / kThreads; ++k) {
      const int o = threadIdx.x + k * kThreads;
      if (o >= outputs) break;
      const int i = o / tokens;
      const int64_t m = m0 + o % tokens;
      if (m >= M) continue;
      float a = acc[k];
      for (int j = 0; j < tw && c0 + j < C; ++j) a = fmaf(to_float(x[m * xs0 + (c0 + j) * xs1]), s[i * tw + j], a);
      acc[k] = a;
    }
  }
#pragma unroll
  for (int k = 0; k < kMaxBlock / kThreads; ++k) {
    const int o = threadIdx.x + k * kThreads;
    if (o >= outputs) break;
    const int64_t m = m0 + o % tokens, r = r0 + o / tokens;
    if (m < M && r < R) {
      TX* out = y + m * ys0 + r * ys1;
      *out = from_float<TX>(to_float(*out) + acc[k]);
    }
  }
}

template <typename TX, typename TV>
__global__ void __launch_bounds__(kThreads) sddmm_block_kernel(
    const TX* __restrict__ dy, int64_t ds0, int64_t ds1, const TX* __restrict__ x, int64_t xs0, int64_t xs1,
    Blocks blocks, TV* __restrict__ out, int64_t M, int64_t N, int64_t K, int chunk) {
  extern __shared__ float smem[];  // chunk tokens of dy's bh columns, then of x's bw columns
  const int bh = blocks.bh, bw = blocks.bw;
  float* sd = smem;
  float* sx = smem + chunk * bh;
  const int32_t b = blockIdx.x;
  const int64_t row0 = blocks.row0[b], col0 = blocks.col0[b];
  float acc[kMaxBlock / kThreads] = {};
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    __syncthreads();
    // Consecutive threads on consecutive tokens: coalesced for token-major operands.
    for (int e = threadIdx.x; e < chunk * bh; e += kThreads) {
      const int mm = e % chunk, i = e / chunk;
      const int64_t m = m0 + mm;
      sd[mm * bh + i] = (m < M && row0 + i < N) ? to_float(dy[m * ds0 + (row0 + i) * ds1]) : 0.f;
    }
    for (int e = threadIdx.x; e < chunk * bw; e += kThreads) {
      const int mm = e % chunk, j = e / chunk;
      const int64_t m = m0 + mm;
      sx[mm * bw + j] = (m < M && col0 + j < K) ? to_float(x[m * xs0 + (col0 + j) * xs1]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMaxBlock / kThreads; ++k) {
      const int o = threadIdx.x + k * kThreads;
      if (o >= bh * bw) break;
      const int i = o / bw, j = o % bw;
      float a = acc[k];
      for (int mm = 0; mm < chunk; ++mm) a = fmaf(sd[mm * bh + i], sx[mm * bw + j], a);
      acc[k] = a;
    }
  }
  const int64_t base = blocks.base[b], rowlen = blocks.rowlen[b];
#pragma unroll
  for (int k = 0; k < kMaxBlock / kThreads; ++k) {
    const int o = threadIdx.x + k * kThreads;
    if (o >= bh * bw) break;
    const int i = o / bw, j = o % bw;
    if (row0 + i < N && col0 + j < K) out[base + i * rowlen + j] = from_float<TV>(acc[k]);
  }
}

bool grid_fits(int64_t x_blocks, int64_t y_blocks) {
  return x_blocks < (int64_t{1} << 31) && y_blocks <= 65535;
}

}  // namespace

cudaError_t spmm_csr(DType dense, DType values, View x, const void* vals, const int64_t* index,
                     const int32_t* row_ptr, const int32_t* pos, MutView y, int64_t M, int64_t R,
                     int64_t n_cols, bool transpose, cudaStream_t stream) {
  if (M == 0 || R == 0) return cudaSuccess;
  const int64_t gx = (M + kCsrTokens - 1) / kCsrTokens, gy = (R + kCsrRows - 1) / kCsrRows;
  if (!grid_fits(gx, gy)) return cudaErrorInvalidValue;
  return tiles::dispatch_base_adapter(dense, values, [&](auto tx, auto tv) {
    using TX = typename decltype(tx)::type;
    using TV = typename decltype(tv)::type;
    spmm_csr_kernel<TX, TV><<<dim3(gx, gy), kThreads, 0, stream>>>(
        static_cast<const TX*>(x.data), x.stride0, x.stride1, static_cast<const TV*>(vals), index, row_ptr, pos,
        static_cast<TX*>(y.data), y.stride0, y.stride1, M, R, n_cols, transpose);
    return cudaGetLastError();
  });
}

cudaError_t sddmm_csr(DType dense, DType values, View dy, View x, const int64_t* index, void* out,
                      int64_t M, int64_t K, int64_t nnz, cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  const int64_t blocks = (nnz + kWarps - 1) / kWarps;
  if (!grid_fits(blocks, 1)) return cudaErrorInvalidValue;
  return tiles::dispatch_base_adapter(dense, values, [&](auto tx, auto tv) {
    using TX = typename decltype(tx)::type;
    using TV = typename decltype(tv)::type;
    sddmm_csr_kernel<TX, TV><<<blocks, kThreads, 0, stream>>>(
        static_cast<const TX*>(dy.data), dy.stride0, dy.stride1, static_cast<const TX*>(x.data), x.stride0,
        x.stride1, index, static_cast<TV*>(out), M, K, nnz);
    return cudaGetLastError();
  });
}

cudaError_t spmm_block(DType dense, DType values, View x, const void* vals, Blocks blocks,
                       const int32_t* ptr, const int32_t* order, int64_t n_tiles, MutView y,
                       int64_t M, int64_t R, int64_t C, bool transpose, cudaStream_t stream) {
  if (blocks.bh < 1 || blocks.bw < 1 || int64_t{blocks.bh} * blocks.bw > kMaxBlock) return cudaErrorInvalidValue;
  if (M == 0 || n_tiles == 0) return cudaSuccess;
  const int th = transpose ? blocks.bw : blocks.bh;
  // Tokens per thread block: as many as keep every thread busy with at most 4 outputs.
  const int tokens = kMaxBlock / th;
  const int64_t gx = (M + tokens - 1) / tokens;
  if (!grid_fits(gx, n_tiles)) return cudaErrorInvalidValue;
  return tiles::dispatch_base_adapter(dense, values, [&](auto tx, auto tv) {
    using TX = typename decltype(tx)::type;
    using TV = typename decltype(tv)::type;
    spmm_block_kernel<TX, TV><<<dim3(gx, n_tiles), kThreads, 0, stream>>>(
        static_cast<const TX*>(x.data), x.stride0, x.stride1, static_cast<const TV*>(vals), blocks, ptr, order,
        static_cast<TX*>(y.data), y.stride0, y.stride1, M, R, C, transpose, tokens);
    return cudaGetLastError();
  });
}

cudaError_t sddmm_block(DType dense, DType values, View dy, View x, Blocks blocks, int64_t n_blocks,
                        void* out, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (blocks.bh < 1 || blocks.bw < 1 || int64_t{blocks.bh} * blocks.bw > kMaxBlock) return cudaErrorInvalidValue;
  if (n_blocks == 0) return cudaSuccess;
  if (!grid_fits(n_blocks, 1)) return cudaErrorInvalidValue;
  // Tokens staged per step: 32 for small blocks, fewer for long thin ones (shared memory <= 32 KiB).
  const int chunk = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(32, 8192 / (blocks.bh + blocks.bw))));
  const size_t smem = sizeof(float) * chunk * (blocks.bh + blocks.bw);
  return tiles::dispatch_base_adapter(dense, values, [&](auto tx, auto tv) {
    using TX = typename decltype(tx)::type;
    using TV = typename decltype(tv)::type;
    sddmm_block_kernel<TX, TV><<<n_blocks, kThreads, smem, stream>>>(
        static_cast<const TX*>(dy.data), dy.stride0, dy.stride1, static_cast<const TX*>(x.data), x.stride0,
        x.stride1, blocks, static_cast<TV*>(out), M, N, K, chunk);
    return cudaGetLastError();
  });
}

}  // namespace sparse_lowrank
}  // namespace lowrank_kernels
