// Bindings of the multi-adapter LoRA op (csrc/multi_lora.cu): cuBLAS for the base GEMMs, the
// segmented kernels for the rank-space products of each token's adapters.
#include <optional>
#include <tuple>

#include "binding.h"
#include "multi_lora.h"

namespace lowrank_kernels::binding {
namespace {

namespace mlora = lowrank_kernels::multi_lora;
using checks::kAny;

// x (M, K), weight (N, K), lora_A (n, R, K), lora_B (n, N, R), key / coef (M, k), ranks (n) int32,
// grouping (S + M + n + 2) int64 as ops/multi_lora_kernels.py's group lays it out; one CUDA device.
mlora::Segments check_multi_lora_operands(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                          const at::Tensor& lora_B, const at::Tensor& key, const at::Tensor& coef,
                                          const at::Tensor& ranks, const at::Tensor& grouping) {
  checks::cuda_tensor(x, "x", checks::kFloatTypes, {kAny, kAny});
  const int64_t M = x.size(0), K = x.size(1);
  checks::tensor_on(weight, "weight", x, {x.scalar_type()}, {kAny, K});
  checks::tensor_on(lora_A, "lora_A", x, {x.scalar_type(), at::kFloat}, {kAny, kAny, K});
  const int64_t N = weight.size(0), n = lora_A.size(0), R = lora_A.size(1);
  TORCH_CHECK_VALUE(n >= 1 && R >= 1, "lora_A must be (n, R, K) with n, R >= 1, got shape ", lora_A.sizes());
  checks::tensor_on(lora_B, "lora_B", x, {lora_A.scalar_type()}, {n, N, R});
  checks::tensor_on(key, "key", x, {at::kLong}, {M, kAny});
  const int64_t k = key.size(1), S = M * k;
  checks::tensor_on(coef, "coef", x, {at::kFloat}, {M, k});
  checks::tensor_on(ranks, "ranks", x, {at::kInt}, {n}, checks::Layout::kContiguous);
  checks::tensor_on(grouping, "grouping", x, {at::kLong}, {S + M + n + 2}, checks::Layout::kContiguous);
  const int64_t* g = grouping.data_ptr<int64_t>();
  return {g, g + S + M, ranks.data_ptr<int32_t>(), n, S, k};
}

// A (n, R, K) adapter stack as seg_down's operand (r, k) and its per-adapter stride; `transposed`
// reads B (n, N, R) as Bᵀ.
View stack_view(const at::Tensor& t, bool transposed) {
  return transposed ? View{t.data_ptr(), t.stride(2), t.stride(1)} : View{t.data_ptr(), t.stride(1), t.stride(2)};
}

// (S, R) fp32 rows in sorted order, scaled by the sorted slots' coefficients, in the adapter dtype.
at::Tensor scaled_rows(const at::Tensor& rows, const at::Tensor& coef_sorted, at::ScalarType adapter) {
  return (rows * coef_sorted.unsqueeze(1)).to(adapter);
}

// y = x Wᵀ + bias (cuBLAS), then y[tok] += (c · h) B_aᵀ per slot index; h = keep_scale · drop(x) Aᵀ
// (S, R) fp32 in slot order, returned for backward.
std::tuple<at::Tensor, at::Tensor> multi_lora_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& key,
                                                  const at::Tensor& coef, const at::Tensor& ranks,
                                                  const at::Tensor& grouping, int64_t dropout_threshold, int64_t k0,
                                                  int64_t k1, double keep_scale) {
  const mlora::Segments seg = check_multi_lora_operands(x, weight, lora_A, lora_B, key, coef, ranks, grouping);
  const Dropout drop = checked_dropout(1.0, dropout_threshold, k0, k1, keep_scale);
  const int64_t K = x.size(1), N = weight.size(0), R = lora_A.size(1);
  const at::Tensor b = checked_bias(bias, x, N);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const DType base_dt = kernel_dtype(x.scalar_type()), adapter_dt = kernel_dtype(lora_A.scalar_type());
  const Launch launch{device_sms(), nullptr, current_stream()};
  at::Tensor y = b.defined() ? at::addmm(b, x, weight.t()) : at::mm(x, weight.t());
  at::Tensor h_sorted = at::zeros({seg.S, R}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(mlora::seg_down(base_dt, adapter_dt, view(x), stack_view(lora_A, false), lora_A.stride(0),
                               mut_view(h_sorted), K, R, static_cast<float>(keep_scale), drop, seg, launch));
  const at::Tensor order = grouping.slice(0, 0, seg.S);
  const at::Tensor coef_sorted = coef.reshape({-1}).index_select(0, order);
  const at::Tensor hc = scaled_rows(h_sorted, coef_sorted, lora_A.scalar_type());
  for (int64_t phase = 0; phase < seg.slots_per_token; ++phase)
    CHECK_LAUNCH(mlora::seg_expand(base_dt, adapter_dt, view(hc), stack_view(lora_B, false), lora_B.stride(0),
                                   mut_view(y), N, R, 1.0f, Dropout{0, 0, 0}, seg, phase, launch));
  return {y, at::empty_like(h_sorted).index_copy_(0, order, h_sorted)};
}

// (dx or an empty tensor, d lora_A, d lora_B, d coef (M, k) fp32), by the formulas of
// ops/multi_lora.py; dx = dy W by cuBLAS first, the low-rank term added per slot index.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multi_lora_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& h, const at::Tensor& key, const at::Tensor& coef,
    const at::Tensor& ranks, const at::Tensor& grouping, int64_t dropout_threshold, int64_t k0, int64_t k1,
    double keep_scale, bool need_dx) {
  const mlora::Segments seg = check_multi_lora_operands(x, weight, lora_A, lora_B, key, coef, ranks, grouping);
  const Dropout drop = checked_dropout(1.0, dropout_threshold, k0, k1, keep_scale);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), n = lora_A.size(0), R = lora_A.size(1);
  checks::tensor_on(dy, "dy", x, {x.scalar_type()}, {M, N});
  checks::tensor_on(h, "h", x, {at::kFloat}, {seg.S, R});
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const at::ScalarType adapter = lora_A.scalar_type();
  const DType base_dt = kernel_dtype(x.scalar_type()), adapter_dt = kernel_dtype(adapter);
  const Launch launch{device_sms(), nullptr, current_stream()};
  const at::Tensor order = grouping.slice(0, 0, seg.S);
  const at::Tensor h_sorted = h.index_select(0, order);
  at::Tensor g_sorted = at::zeros({seg.S, R}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(mlora::seg_down(base_dt, adapter_dt, view(dy), stack_view(lora_B, true), lora_B.stride(0),
                               mut_view(g_sorted), N, R, 1.0f, Dropout{0, 0, 0}, seg, launch));
  const at::Tensor coef_sorted = coef.reshape({-1}).index_select(0, order);
  const at::Tensor gc = scaled_rows(g_sorted, coef_sorted, adapter);
  const at::Tensor hc = scaled_rows(h_sorted, coef_sorted, adapter);
  at::Tensor dA = at::empty({n, R, K}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(mlora::seg_reduce(base_dt, adapter_dt, view(gc), view(x), dA.data_ptr<float>(), K, R,
                                 static_cast<float>(keep_scale), drop, seg, launch));
  at::Tensor dBt = at::empty({n, R, N}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(mlora::seg_reduce(base_dt, adapter_dt, view(hc), view(dy), dBt.data_ptr<float>(), N, R, 1.0f,
                                 Dropout{0, 0, 0}, seg, launch));
  const at::Tensor dcoef = at::empty({seg.S}, x.options().dtype(at::kFloat))
                               .index_copy_(0, order, (g_sorted * h_sorted).sum(1))
                               .reshape(key.sizes());
  at::Tensor dx = at::empty({0}, x.options());
  if (need_dx) {
    dx = at::mm(dy, weight);
    for (int64_t phase = 0; phase < seg.slots_per_token; ++phase)
      CHECK_LAUNCH(mlora::seg_expand(base_dt, adapter_dt, view(gc), stack_view(lora_A, true), lora_A.stride(0),
                                     mut_view(dx), K, R, static_cast<float>(keep_scale), drop, seg, phase, launch));
  }
  return {dx, dA.to(adapter), dBt.transpose(1, 2).to(adapter).contiguous(), dcoef};
}

void define(pybind11::module& m) {
  namespace py = pybind11;
  m.def("multi_lora_fwd", &multi_lora_fwd,
        "Multi-adapter LoRA forward on grouped slots: (y in x's dtype, h = keep_scale · drop(x) A_aᵀ float32 by slot)",
        py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("bias"), py::arg("key"),
        py::arg("coef"), py::arg("ranks"), py::arg("grouping"), py::arg("dropout_threshold"), py::arg("k0"),
        py::arg("k1"), py::arg("keep_scale"));
  m.def("multi_lora_bwd", &multi_lora_bwd,
        "Multi-adapter LoRA backward: (dx or an empty tensor when not need_dx, d lora_A, d lora_B, d coef float32)",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("h"),
        py::arg("key"), py::arg("coef"), py::arg("ranks"), py::arg("grouping"), py::arg("dropout_threshold"),
        py::arg("k0"), py::arg("k1"), py::arg("keep_scale"), py::arg("need_dx"));
}

const Registrar registrar(&define);

}  // namespace
}  // namespace lowrank_kernels::binding
