// Types of the torch-free host API that every op's header shares (csrc/<op>.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lowrank_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A strided matrix: element (i, j) at data + i * stride0 + j * stride1 (strides in elements).
struct View {
  const void* data;
  int64_t stride0, stride1;
};
struct MutView {
  void* data;
  int64_t stride0, stride1;
};

// Dropout on the (token, feature) grid: an element is kept iff
// (hash32(k0, k1, token, feature) >> 8) >= threshold (csrc/rng.cuh); threshold 0 keeps all.
struct Dropout {
  uint32_t k0, k1, threshold;
};

// Where and how to launch. `workspace` holds at least the *_workspace() count of floats for the
// same sizes and num_sms (null when that count is 0).
struct Launch {
  int num_sms;
  float* workspace;
  cudaStream_t stream;
};

}  // namespace lowrank_kernels
