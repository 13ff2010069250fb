// Argument checks of the bindings (csrc/*_binding.cpp): one call per tensor, naming it in the
// error, which is a ValueError (device, rank, shape, layout) or a TypeError (dtype), as the
// Python launchers raise. A tensor's properties are checked in the order rank, device, dtype,
// shape, layout.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <sstream>
#include <string>

namespace lowrank_kernels::checks {

// A size of an expected shape that may be anything.
constexpr int64_t kAny = -1;

// The dtypes of activations and weights.
inline constexpr at::ScalarType kFloatTypes[] = {at::kFloat, at::kHalf, at::kBFloat16};

enum class Layout { kStrided, kContiguous };

namespace detail {

inline std::string shape_string(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "(";
  for (size_t d = 0; d < shape.size(); ++d) {
    if (d > 0) out << ", ";
    if (shape[d] == kAny) out << "*";
    else out << shape[d];
  }
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

inline std::string dtypes_string(at::ArrayRef<at::ScalarType> dtypes) {
  std::ostringstream out;
  for (size_t k = 0; k < dtypes.size(); ++k) {
    bool seen = false;
    for (size_t e = 0; e < k; ++e) seen = seen || dtypes[e] == dtypes[k];
    if (seen) continue;
    if (k > 0) out << " or ";
    out << dtypes[k];
  }
  return out.str();
}

inline void device(const at::Tensor& t, const char* name, const at::Tensor* ref) {
  if (ref == nullptr) {
    TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  } else {
    TORCH_CHECK_VALUE(t.is_cuda() && t.device() == ref->device(), name, " must be a CUDA tensor on ",
                      ref->device(), ", got one on ", t.device());
  }
}

inline void dtype(const at::Tensor& t, const char* name, at::ArrayRef<at::ScalarType> dtypes) {
  bool ok = dtypes.empty();
  for (const at::ScalarType d : dtypes) ok = ok || t.scalar_type() == d;
  TORCH_CHECK_TYPE(ok, name, " must be ", dtypes_string(dtypes), ", got ", t.scalar_type());
}

inline void tensor(const at::Tensor& t, const char* name, const at::Tensor* ref, at::ArrayRef<at::ScalarType> dtypes,
                   at::IntArrayRef shape, Layout layout) {
  TORCH_CHECK_VALUE(t.dim() == static_cast<int64_t>(shape.size()), name, " must be ", shape.size(),
                    "-D, got shape ", t.sizes());
  device(t, name, ref);
  dtype(t, name, dtypes);
  bool match = true;
  for (size_t d = 0; d < shape.size(); ++d) match = match && (shape[d] == kAny || t.size(d) == shape[d]);
  TORCH_CHECK_VALUE(match, name, " must have shape ", shape_string(shape), ", got ", t.sizes());
  TORCH_CHECK_VALUE(layout == Layout::kStrided || t.is_contiguous(), name, " must be contiguous, got strides ",
                    t.strides());
}

}  // namespace detail

// `t`, named `name` in errors: a CUDA tensor (on any device) of one of `dtypes` (empty: any) and
// of `shape` (kAny: any size there), contiguous when `layout` says so.
inline void cuda_tensor(const at::Tensor& t, const char* name, at::ArrayRef<at::ScalarType> dtypes,
                        at::IntArrayRef shape, Layout layout = Layout::kStrided) {
  detail::tensor(t, name, nullptr, dtypes, shape, layout);
}

// The same, on the device of `ref` (the op's anchor operand, checked before).
inline void tensor_on(const at::Tensor& t, const char* name, const at::Tensor& ref,
                      at::ArrayRef<at::ScalarType> dtypes, at::IntArrayRef shape, Layout layout = Layout::kStrided) {
  detail::tensor(t, name, &ref, dtypes, shape, layout);
}

// `t`: a CUDA tensor on the device of `ref`, of one of `dtypes`, of any shape and layout.
inline void any_shape_on(const at::Tensor& t, const char* name, const at::Tensor& ref,
                         at::ArrayRef<at::ScalarType> dtypes) {
  detail::device(t, name, &ref);
  detail::dtype(t, name, dtypes);
}

// `t`: a contiguous buffer of `dtype` on the device of `ref`, of any shape, holding exactly
// `numel` elements (or at least that many when `at_least`).
inline void buffer_on(const at::Tensor& t, const char* name, const at::Tensor& ref, at::ScalarType dtype,
                      int64_t numel, bool at_least = false) {
  detail::device(t, name, &ref);
  detail::dtype(t, name, {dtype});
  TORCH_CHECK_VALUE(t.is_contiguous() && (at_least ? t.numel() >= numel : t.numel() == numel), name,
                    " must be contiguous with ", at_least ? "at least " : "", numel, " elements, got shape ",
                    t.sizes(), " and strides ", t.strides());
}

}  // namespace lowrank_kernels::checks
