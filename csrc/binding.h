// What the Python bindings of lowrank_kernels._C share (csrc/<op>_binding.cpp, one per op; the
// module itself is csrc/module.cpp). The bindings are the only sources that include torch: the
// kernels live in torch-free .cu files so that they compile fast. Each binding validates its
// inputs (csrc/checks.h), guards the device, runs on the current stream and composes its op's
// kernels with cuBLAS through ATen.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "types.h"

#define CHECK_LAUNCH(call)                                                                   \
  do {                                                                                       \
    const cudaError_t err_ = (call);                                                         \
    TORCH_CHECK(err_ == cudaSuccess, #call " failed: ", cudaGetErrorString(err_));           \
  } while (0)

namespace lowrank_kernels::binding {

// ---- registration: each op's binding file adds its functions to the module ----
using Definitions = void (*)(pybind11::module&);

// The ops' definitions, in the order their files' static initialisers ran (module.cpp calls them).
inline std::vector<Definitions>& definitions() {
  static std::vector<Definitions> all;
  return all;
}

// `const Registrar registrar(&define);` at namespace scope in an op's binding file: define(m) then
// runs when the module is created.
struct Registrar {
  explicit Registrar(Definitions define) { definitions().push_back(define); }
};

// ---- launch helpers ----
// The current device's SM count and stream (callers hold a device guard for their inputs).
inline int device_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// One kernel launch's resources: fp32 scratch from torch's caching allocator (kept alive by this
// object, undefined when none is needed; allocation is stream-ordered, so it may be released as
// soon as the kernels using it are queued) and where to run.
struct LaunchContext {
  LaunchContext(const at::Tensor& like, int64_t workspace_floats)
      : scratch(workspace_floats > 0 ? at::empty({workspace_floats}, like.options().dtype(at::kFloat))
                                     : at::Tensor()),
        launch{device_sms(), scratch.defined() ? scratch.data_ptr<float>() : nullptr, current_stream()} {}
  at::Tensor scratch;
  Launch launch;
};

// alpha · a b without reading the (uninitialised) output: beta = 0 makes cuBLAS ignore it.
inline at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  return at::empty({a.size(0), b.size(1)}, a.options()).addmm_(a, b, /*beta=*/0.0, /*alpha=*/alpha);
}

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    default: return DType::kBFloat16;  // the callers admit float dtypes only
  }
}

inline View view(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }
inline View view_transposed(const at::Tensor& t) { return {t.data_ptr(), t.stride(1), t.stride(0)}; }
inline MutView mut_view(at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }
inline MutView mut_view_transposed(at::Tensor& t) { return {t.data_ptr(), t.stride(1), t.stride(0)}; }

// ---- arguments several ops take ----
// The dropout keys and threshold of ops/gemm.py's Dropout, checked, with the scalars beside them.
inline Dropout checked_dropout(double scaling, int64_t threshold, int64_t k0, int64_t k1, double keep_scale) {
  TORCH_CHECK_VALUE(std::isfinite(scaling), "scaling must be finite, got ", scaling);
  TORCH_CHECK_VALUE(std::isfinite(keep_scale) && keep_scale >= 1.0,
                    "keep_scale = 1 / (1 - p) must be finite and >= 1, got ", keep_scale);
  TORCH_CHECK_VALUE(threshold >= 0 && threshold <= (int64_t{1} << 24),
                    "dropout_threshold = round(p * 2**24) must be in [0, 2**24], got ", threshold);
  TORCH_CHECK_VALUE(k0 >= 0 && k0 <= UINT32_MAX, "k0 must be in [0, 2**32), got ", k0);
  TORCH_CHECK_VALUE(k1 >= 0 && k1 <= UINT32_MAX, "k1 must be in [0, 2**32), got ", k1);
  return {static_cast<uint32_t>(k0), static_cast<uint32_t>(k1), static_cast<uint32_t>(threshold)};
}

// An optional bias (N) on x's device in x's dtype, made contiguous; undefined when absent.
inline at::Tensor checked_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N) {
  if (!bias.has_value()) return at::Tensor();
  checks::tensor_on(*bias, "bias", x, {x.scalar_type()}, {N});
  return bias->contiguous();
}

// keep_scale != 1 with threshold 0 (p below 2**-25) still scales, as the reference does.
inline bool has_dropout(int64_t dropout_threshold, double keep_scale) {
  return dropout_threshold > 0 || keep_scale != 1.0;
}

}  // namespace lowrank_kernels::binding
