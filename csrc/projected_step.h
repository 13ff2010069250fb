// Host API of the fused GaLore / Fira projected AdamW step's CUDA kernels (csrc/projected_step.cu).
// Torch-free: raw pointers, sizes, strides and a stream; csrc/projected_step_binding.cpp validates and calls.
//
// The problem is always in its "right" form (the Python launcher passes transposed views for a
// left projection): W, G (rows, cols), P (rank, cols), R = G Pᵀ (rows, rank), channel i = row i.
// One launch per kernel serves a batch of such problems of one shape and layout: the batch
// index is a grid axis, batch element b's tensor of a role lies `offsets[role * batch + b]`
// elements from element 0's (a device table the launcher builds), and the per-problem step size
// and lr·wd are read from device memory, so nothing per step is baked into a launch (CUDA-graph
// capturable).
// See lowrank_kernels/ops/projected_step.py for the math. W and G are fp32, fp16 or bf16 (one
// dtype); P, the moments and every workspace are fp32; all arithmetic is fp32 with IEEE sqrt and
// division. Reductions run in a fixed order (no atomics): results are bit-reproducible.
#pragma once

#include <cstdint>

#include "types.h"

namespace lowrank_kernels {
namespace projected_step {

// A strided matrix: element (i, j) at data + i * stride0 + j * stride1 (strides in elements).
struct Mat {
  void* data;
  int64_t stride0, stride1;
};

// Rows of a projected step's offset table.
enum Role : int { kRoleW = 0, kRoleG, kRoleP, kRoleM1, kRoleM2, kRoleR, kRolePrev, kRoles };
// Rows of a plain AdamW step's offset table.
enum AdamwRole : int { kAdamwW = 0, kAdamwG, kAdamwM1, kAdamwM2, kAdamwRoles };

// The largest batch one launch takes (a grid's y and z extents).
constexpr int64_t kMaxBatch = 65535;

struct Problem {
  DType dtype;              // W and G
  int64_t batch;            // problems in the launch
  const int64_t* offsets;   // (kRoles, batch) element offsets from element 0, device
  const float* coef;        // (batch, 2) fp32, device: step size and lr·wd of each problem
  Mat W;                    // (rows, cols), updated in place
  Mat G;                    // (rows, cols); data may be null for GaLore when R is given
  Mat P;                    // (rank, cols) fp32
  Mat M1, M2;               // (rows, rank) fp32 moments, updated in place
  Mat R;                    // (rows, rank) fp32: written by the projection, or given (project = false)
  float* N;                 // (batch, rows, rank) fp32 contiguous scratch: the Adam direction
  float* gsq;               // Fira: (batch, rows) scratch, ‖G_i‖²
  float* phi;               // Fira: (batch, rows) scratch, φ_i
  float* res;               // Fira: (batch, rows) scratch, residual energies
  float* limit;             // Fira: (batch) scratch, the limiter l
  float* prev;              // Fira: (1) state, previous ‖S‖ (negative: none yet), updated in place
  int64_t rows, cols, rank;
  bool fira, project, decay;
  float beta1, beta2, eps, scale;
};

// The whole step: [projection with channel energies] -> moments -> [limiter] -> back-projection
// with the update and decay in the epilogue. Four launches on `stream`, no host synchronisation.
cudaError_t step(const Problem& pb, cudaStream_t stream);

// R (rows, rank) fp32 = G Pᵀ alone, one problem (the accumulation path).
cudaError_t project(DType dtype, Mat G, Mat P, Mat R, int64_t rows, int64_t cols, int64_t rank,
                    cudaStream_t stream);

// transformers-style AdamW on `batch` flat contiguous tensors of numel elements each: w and g in
// `dtype`, fp32 moments; element 0's pointers, the (kAdamwRoles, batch) offset table and the
// (batch, 2) step size and lr·wd on the device.
cudaError_t adamw(DType dtype, void* w, const void* g, float* m1, float* m2, const int64_t* offsets,
                  const float* coef, int64_t batch, int64_t numel, float beta1, float beta2, float eps,
                  bool decay, cudaStream_t stream);

}  // namespace projected_step
}  // namespace lowrank_kernels
