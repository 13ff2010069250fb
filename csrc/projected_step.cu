// CUDA kernels of the fused GaLore / Fira projected AdamW step (host API: projected_step.h).
//
// Four kernels, fp32 arithmetic with fp32 accumulation. The two GEMM-shaped ones multiply in the
// gradient's dtype, as the Triton kernels do: for bf16/fp16 W and G on tensor cores (nvcuda::wmma,
// P and the Adam direction rounded to that dtype as they are stored to shared memory), for fp32
// in IEEE fp32 FMA on CUDA cores (what cuBLAS does for fp32 without tf32).
//   project_kernel   R = G Pᵀ, 64 x 64 output tiles over (rows, rank), walking cols in steps of
//                    16 through shared memory; the blocks of the first rank tile also sum ‖G_i‖²
//                    from the G slices already in shared memory (Fira's channel energies).
//   moments_kernel   one warp per row: Adam on the projected moments, the direction N, and for
//                    Fira ‖N_i‖², ‖R_i‖² (warp-shuffle reductions, fixed order), φ_i and the
//                    residual energy φ_i² (‖G_i‖² − (2α − α²)‖R_i‖²) (exact for orthonormal P).
//   limiter_kernel   one block sums the residual energies in a fixed order and updates the
//                    limiter state on the device.
//   back_kernel      W tile (64 x 64) += −step_size · (α (N − c R) P + c G), c = φ / l, and the
//                    decoupled decay, in the epilogue: no temporary of W's size.
// Every kernel takes a batch of problems of one shape: the batch index is a grid axis and each
// problem's tensors are found through the offset table (see projected_step.h).
// Index math is int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "projected_step.h"
#include "tiles.cuh"

namespace lowrank_kernels {
namespace projected_step {
namespace {

constexpr int kTile = 64;   // output tile edge
constexpr int kStep = 16;   // reduction step
constexpr int kThreads = 256;

// One reduction step of a 64×64 tile: acc[i][j] += Σ_k a[k][ty + 16 i] · b[k][tx + 16 j], each
// thread of the 16×16 block owning a 4×4 share of the output.
__device__ __forceinline__ void tile_step(float (&acc)[4][4], const float (&a)[kStep][kTile + 1],
                                          const float (&b)[kStep][kTile + 1], int ty, int tx) {
#pragma unroll
  for (int k = 0; k < kStep; ++k) {
    float av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = a[k][ty + 16 * i];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = b[k][tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// Shared-memory slices of a tile: fp32 for the FMA path (rows padded by 1 against bank
// conflicts), the 16-bit type for tensor cores (rows padded by 8 elements: wmma needs 32-byte
// aligned fragments and ldm a multiple of 8).
template <typename T>
using SliceType = typename std::conditional<tiles::kIs16<T>, T, float>::type;
template <typename T>
constexpr int kSliceLd = tiles::kIs16<T> ? kTile + 8 : kTile + 1;

// The tensor-core version of tile_step's loop for one 64 × 64 tile: warp w holds the fragments
// of rows 16 (w / 2) .. + 15 and columns 32 (w % 2) .. + 31. finish() hands each thread its
// tile_step layout, acc[i][j] = C(ty + 16 i, tx + 16 j), through shared memory.
template <typename T>
struct MmaTile {
  static constexpr int kLd = kSliceLd<T>;
  static constexpr int kLdC = kTile + 4;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2];
  int row0, col0;

  __device__ __forceinline__ MmaTile() {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    row0 = (warp / 2) * 16;
    col0 = (warp % 2) * 32;
    nvcuda::wmma::fill_fragment(c[0], 0.f);
    nvcuda::wmma::fill_fragment(c[1], 0.f);
  }

  // acc += A B over one step: A (row, k) at a[k][row] (column-major), B (k, col) at b[k][col].
  __device__ __forceinline__ void step(const T (&a)[kStep][kLd], const T (&b)[kStep][kLd]) {
    namespace wmma = nvcuda::wmma;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
    wmma::load_matrix_sync(fa, &a[0][row0], kLd);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, &b[0][col0 + 16 * j], kLd);
      wmma::mma_sync(c[j], fa, fb, c[j]);
    }
  }

  __device__ __forceinline__ void finish(float (&C)[kTile][kLdC], float (&acc)[4][4], int ty, int tx) const {
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(&C[row0][col0 + 16 * j], c[j], kLdC, nvcuda::wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = C[ty + 16 * i][tx + 16 * j];
  }
};

using tiles::from_float;
using tiles::to_float;

template <typename T>
__device__ __forceinline__ float at(const Mat& m, int64_t i, int64_t j) {
  return to_float(static_cast<const T*>(m.data)[i * m.stride0 + j * m.stride1]);
}

// Batch element b's tensor of a role: element 0's moved by its offset (none without a table).
template <typename T>
__device__ __forceinline__ Mat shifted(Mat m, const int64_t* offsets, int role, int64_t batch, int64_t b) {
  if (offsets != nullptr) m.data = static_cast<T*>(m.data) + offsets[role * batch + b];
  return m;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ---------------------------------------------------------------------------------------------
// R = G Pᵀ (+ ‖G_i‖²)
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) project_kernel(Mat G, Mat P, Mat R, float* gsq, const int64_t* offsets,
                                                           int64_t batch, int64_t rows, int64_t cols, int64_t rank) {
  using TS = SliceType<T>;
  constexpr bool kMma = tiles::kIs16<T>;
  __shared__ __align__(32) TS gs[kStep][kSliceLd<T>];
  __shared__ __align__(32) TS ps[kStep][kSliceLd<T>];
  __shared__ __align__(32) float cs[kMma ? kTile : 1][kTile + 4];
  const int64_t b = blockIdx.z;
  G = shifted<T>(G, offsets, kRoleG, batch, b);
  P = shifted<float>(P, offsets, kRoleP, batch, b);
  R = shifted<float>(R, offsets, kRoleR, batch, b);
  if (gsq != nullptr) gsq += b * rows;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t rk0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const bool norms = gsq != nullptr && blockIdx.y == 0;
  float acc[4][4] = {};
  MmaTile<T> mma;
  float energy = 0.f;
  for (int64_t k0 = 0; k0 < cols; k0 += kStep) {
    for (int e = tid; e < kTile * kStep; e += kThreads) {
      const int r = e / kStep, k = e % kStep;
      const int64_t gi = row0 + r, gk = k0 + k, pi = rk0 + r;
      gs[k][r] = tiles::from_float<TS>((gi < rows && gk < cols) ? at<T>(G, gi, gk) : 0.f);
      ps[k][r] = tiles::from_float<TS>((pi < rank && gk < cols) ? at<float>(P, pi, gk) : 0.f);
    }
    __syncthreads();
    if (norms && tid < kTile) {
      for (int k = 0; k < kStep; ++k) {
        const float g = tiles::to_float(gs[k][tid]);  // exact: G's own values
        energy += g * g;
      }
    }
    if constexpr (kMma) mma.step(gs, ps);
    else tile_step(acc, gs, ps, ty, tx);
    __syncthreads();
  }
  if constexpr (kMma) mma.finish(cs, acc, ty, tx);
  float* out = static_cast<float*>(R.data);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = row0 + ty + 16 * i, c = rk0 + tx + 16 * j;
      if (r < rows && c < rank) out[r * R.stride0 + c * R.stride1] = acc[i][j];
    }
  if (norms && tid < kTile && row0 + tid < rows) gsq[row0 + tid] = energy;
}

// ---------------------------------------------------------------------------------------------
// Adam on the projected moments; N; Fira's φ and residual energies
// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads) moments_kernel(Problem pb) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int64_t b = blockIdx.y;
  const int lane = threadIdx.x % 32;
  if (row >= pb.rows) return;
  pb.R = shifted<float>(pb.R, pb.offsets, kRoleR, pb.batch, b);
  pb.M1 = shifted<float>(pb.M1, pb.offsets, kRoleM1, pb.batch, b);
  pb.M2 = shifted<float>(pb.M2, pb.offsets, kRoleM2, pb.batch, b);
  pb.N += b * pb.rows * pb.rank;
  const float* R = static_cast<const float*>(pb.R.data);
  float* m1p = static_cast<float*>(pb.M1.data);
  float* m2p = static_cast<float*>(pb.M2.data);
  float nsq = 0.f, rsq = 0.f;
  for (int64_t c = lane; c < pb.rank; c += 32) {
    const float r = R[row * pb.R.stride0 + c * pb.R.stride1];
    float& m1 = m1p[row * pb.M1.stride0 + c * pb.M1.stride1];
    float& m2 = m2p[row * pb.M2.stride0 + c * pb.M2.stride1];
    m1 = m1 * pb.beta1 + (1.f - pb.beta1) * r;
    m2 = m2 * pb.beta2 + (1.f - pb.beta2) * (r * r);
    const float n = __fdiv_rn(m1, __fsqrt_rn(m2) + pb.eps);
    pb.N[row * pb.rank + c] = n;
    nsq += n * n;
    rsq += r * r;
  }
  if (!pb.fira) return;
  nsq = warp_sum(nsq);
  rsq = warp_sum(rsq);
  if (lane == 0) {
    const int64_t i = b * pb.rows + row;
    const float phi = __fdiv_rn(__fsqrt_rn(nsq), __fsqrt_rn(rsq) + 1e-8f);
    const float resid = fmaxf(pb.gsq[i] - (2.f * pb.scale - pb.scale * pb.scale) * rsq, 0.f);
    pb.phi[i] = phi;
    pb.res[i] = phi * phi * resid;
  }
}

// ---------------------------------------------------------------------------------------------
// Norm-growth limiter (one block per problem)
// ---------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(1024) limiter_kernel(const float* res, int64_t rows, float* prev, float* limit,
                                                       const int64_t* offsets, int64_t batch) {
  __shared__ float part[1024];
  const int64_t b = blockIdx.x;
  res += b * rows;
  prev += offsets[kRolePrev * batch + b];
  limit += b;
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < rows; i += 1024) s += res[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int half = 512; half > 0; half >>= 1) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float norm = __fsqrt_rn(part[0]);
    const float p = *prev;
    const float l = p >= 0.f ? __fdiv_rn(fmaxf(__fdiv_rn(norm, p + 1e-8f), 1.01f), 1.01f) : 1.f;
    *prev = __fdiv_rn(norm, l);
    *limit = l;
  }
}

// ---------------------------------------------------------------------------------------------
// Back-projection, update and decay, in place on W
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) back_kernel(Problem pb) {
  using TS = SliceType<T>;
  constexpr bool kMma = tiles::kIs16<T>;
  __shared__ __align__(32) TS zs[kStep][kSliceLd<T>];
  __shared__ __align__(32) TS ps[kStep][kSliceLd<T>];
  __shared__ __align__(32) float stage[kMma ? kTile : 1][kTile + 4];
  __shared__ float cs[kTile];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t b = blockIdx.z;
  pb.W = shifted<T>(pb.W, pb.offsets, kRoleW, pb.batch, b);
  pb.P = shifted<float>(pb.P, pb.offsets, kRoleP, pb.batch, b);
  pb.N += b * pb.rows * pb.rank;
  if (pb.fira) {
    pb.G = shifted<T>(pb.G, pb.offsets, kRoleG, pb.batch, b);
    pb.R = shifted<float>(pb.R, pb.offsets, kRoleR, pb.batch, b);
  }
  const float step_size = pb.coef[2 * b], lr_wd = pb.coef[2 * b + 1];
  const float* Rm = static_cast<const float*>(pb.R.data);
  if (tid < kTile) {
    const int64_t r = row0 + tid;
    cs[tid] = (pb.fira && r < pb.rows) ? __fdiv_rn(pb.phi[b * pb.rows + r], pb.limit[b]) : 0.f;
  }
  __syncthreads();
  float acc[4][4] = {};
  MmaTile<T> mma;
  for (int64_t k0 = 0; k0 < pb.rank; k0 += kStep) {
    for (int e = tid; e < kTile * kStep; e += kThreads) {
      const int r = e / kStep, k = e % kStep;
      const int64_t gi = row0 + r, gk = k0 + k;
      float z = 0.f;
      if (gi < pb.rows && gk < pb.rank) {
        z = pb.N[gi * pb.rank + gk];
        if (pb.fira) z -= cs[r] * Rm[gi * pb.R.stride0 + gk * pb.R.stride1];
        z *= pb.scale;
      }
      zs[k][r] = tiles::from_float<TS>(z);
      const int kk = e / kTile, c = e % kTile;
      const int64_t pk = k0 + kk, pc = col0 + c;
      ps[kk][c] = tiles::from_float<TS>((pk < pb.rank && pc < pb.cols) ? at<float>(pb.P, pk, pc) : 0.f);
    }
    __syncthreads();
    if constexpr (kMma) mma.step(zs, ps);
    else tile_step(acc, zs, ps, ty, tx);
    __syncthreads();
  }
  if constexpr (kMma) mma.finish(stage, acc, ty, tx);
  T* W = static_cast<T*>(pb.W.data);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = row0 + ty + 16 * i, c = col0 + tx + 16 * j;
      if (r >= pb.rows || c >= pb.cols) continue;
      float u = acc[i][j];
      if (pb.fira) u += cs[ty + 16 * i] * at<T>(pb.G, r, c);
      T& w_ref = W[r * pb.W.stride0 + c * pb.W.stride1];
      float w = to_float(w_ref) - step_size * u;
      if (pb.decay) w -= lr_wd * w;
      w_ref = from_float<T>(w);
    }
}

// ---------------------------------------------------------------------------------------------
// Plain AdamW (flat)
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void adamw_kernel(T* w, const T* g, float* m1, float* m2, const int64_t* offsets, const float* coef,
                             int64_t batch, int64_t numel, float beta1, float beta2, float eps, bool decay) {
  const int64_t b = blockIdx.y;
  w += offsets[kAdamwW * batch + b];
  g += offsets[kAdamwG * batch + b];
  m1 += offsets[kAdamwM1 * batch + b];
  m2 += offsets[kAdamwM2 * batch + b];
  const float step_size = coef[2 * b], lr_wd = coef[2 * b + 1];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = to_float(g[i]);
    const float a = m1[i] * beta1 + (1.f - beta1) * gi;
    const float v = m2[i] * beta2 + (1.f - beta2) * (gi * gi);
    m1[i] = a;
    m2[i] = v;
    float x = to_float(w[i]) - step_size * __fdiv_rn(a, __fsqrt_rn(v) + eps);
    if (decay) x -= lr_wd * x;
    w[i] = from_float<T>(x);
  }
}

dim3 tiles(int64_t a, int64_t b, int64_t batch) {
  return dim3(static_cast<unsigned>((a + kTile - 1) / kTile), static_cast<unsigned>((b + kTile - 1) / kTile),
              static_cast<unsigned>(batch));
}

template <typename T>
cudaError_t step_typed(const Problem& pb, cudaStream_t stream) {
  if (pb.project) {
    project_kernel<T><<<tiles(pb.rows, pb.rank, pb.batch), kThreads, 0, stream>>>(
        pb.G, pb.P, pb.R, pb.fira ? pb.gsq : nullptr, pb.offsets, pb.batch, pb.rows, pb.cols, pb.rank);
  }
  const int64_t warps = kThreads / 32;
  const dim3 moments_grid(static_cast<unsigned>((pb.rows + warps - 1) / warps), static_cast<unsigned>(pb.batch));
  moments_kernel<<<moments_grid, kThreads, 0, stream>>>(pb);
  if (pb.fira) {
    limiter_kernel<<<static_cast<unsigned>(pb.batch), 1024, 0, stream>>>(pb.res, pb.rows, pb.prev, pb.limit,
                                                                        pb.offsets, pb.batch);
  }
  back_kernel<T><<<tiles(pb.rows, pb.cols, pb.batch), kThreads, 0, stream>>>(pb);
  return cudaGetLastError();
}

template <typename T>
cudaError_t project_typed(Mat G, Mat P, Mat R, int64_t rows, int64_t cols, int64_t rank, cudaStream_t stream) {
  project_kernel<T><<<tiles(rows, rank, 1), kThreads, 0, stream>>>(G, P, R, nullptr, nullptr, 1, rows, cols, rank);
  return cudaGetLastError();
}

template <typename T>
cudaError_t adamw_typed(void* w, const void* g, float* m1, float* m2, const int64_t* offsets, const float* coef,
                        int64_t batch, int64_t numel, float beta1, float beta2, float eps, bool decay,
                        cudaStream_t stream) {
  if (numel == 0 || batch == 0) return cudaSuccess;
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8), static_cast<unsigned>(batch));
  adamw_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<T*>(w), static_cast<const T*>(g), m1, m2, offsets, coef,
                                                 batch, numel, beta1, beta2, eps, decay);
  return cudaGetLastError();
}

}  // namespace

cudaError_t step(const Problem& pb, cudaStream_t stream) {
  if (pb.rows == 0 || pb.cols == 0 || pb.batch == 0) return cudaSuccess;
  switch (pb.dtype) {
    case DType::kFloat32: return step_typed<float>(pb, stream);
    case DType::kFloat16: return step_typed<__half>(pb, stream);
    case DType::kBFloat16: return step_typed<__nv_bfloat16>(pb, stream);
  }
  return cudaErrorNotSupported;
}

cudaError_t project(DType dtype, Mat G, Mat P, Mat R, int64_t rows, int64_t cols, int64_t rank, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return project_typed<float>(G, P, R, rows, cols, rank, stream);
    case DType::kFloat16: return project_typed<__half>(G, P, R, rows, cols, rank, stream);
    case DType::kBFloat16: return project_typed<__nv_bfloat16>(G, P, R, rows, cols, rank, stream);
  }
  return cudaErrorNotSupported;
}

cudaError_t adamw(DType dtype, void* w, const void* g, float* m1, float* m2, const int64_t* offsets, const float* coef,
                  int64_t batch, int64_t numel, float beta1, float beta2, float eps, bool decay, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return adamw_typed<float>(w, g, m1, m2, offsets, coef, batch, numel, beta1, beta2, eps, decay, stream);
    case DType::kFloat16:
      return adamw_typed<__half>(w, g, m1, m2, offsets, coef, batch, numel, beta1, beta2, eps, decay, stream);
    case DType::kBFloat16:
      return adamw_typed<__nv_bfloat16>(w, g, m1, m2, offsets, coef, batch, numel, beta1, beta2, eps, decay, stream);
  }
  return cudaErrorNotSupported;
}

}  // namespace projected_step
}  // namespace lowrank_kernels
