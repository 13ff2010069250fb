// Bindings of the LoRA op (csrc/lora.cu): lora_fwd / lora_bwd on a dense base, lora_fwd_4bit /
// lora_bwd_4bit on a bitsandbytes 4-bit base (QLoRA): the same low-rank parts, the base GEMMs on
// the packed W.
#include <optional>
#include <tuple>

#include "binding.h"
#include "lora.h"

namespace lowrank_kernels::binding {
namespace {

using checks::kAny;
using checks::kFloatTypes;

// x (M, K), lora_A (r, K), lora_B (N, r) on one CUDA device; x is a float dtype; the adapters
// share it or are float32.
void check_lora_adapters(const at::Tensor& x, int64_t N, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  checks::cuda_tensor(x, "x", kFloatTypes, {kAny, kAny});
  checks::tensor_on(lora_A, "lora_A", x, {x.scalar_type(), at::kFloat}, {kAny, x.size(1)});
  const int64_t r = lora_A.size(0);
  TORCH_CHECK_VALUE(r >= 1, "lora_A must have rank r = lora_A.size(0) >= 1, got shape ", lora_A.sizes());
  checks::tensor_on(lora_B, "lora_B", x, {lora_A.scalar_type()}, {N, r});
}

// The above, with weight (N, K) on x's device in x's dtype.
void check_lora_operands(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                         const at::Tensor& lora_B) {
  checks::cuda_tensor(x, "x", kFloatTypes, {kAny, kAny});
  checks::tensor_on(weight, "weight", x, {x.scalar_type()}, {kAny, x.size(1)});
  check_lora_adapters(x, weight.size(0), lora_A, lora_B);
}

// y = x Wᵀ + bias + s · h Bᵀ with h = keep_scale · drop(x) Aᵀ (fp32, returned for backward).
// The low-rank term (plus bias) is written first and the base GEMM accumulates onto it with
// beta = 1. Adapters in x's dtype: h and h Bᵀ by cuBLAS in that dtype (h rounded to it, as the
// reference does), unless dropout needs the fused kernel for h. fp32 adapters on a 16-bit base:
// both products by the fp32 kernels, no fp32 copy of x. This returns (s · h Bᵀ + bias, h); the
// callers add the base term, dense (cuBLAS) or 4-bit (lora::quant4_gemm_accumulate).
std::tuple<at::Tensor, at::Tensor> lora_fwd_lowrank(const at::Tensor& x, int64_t N, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
                                                    double scaling, int64_t dropout_threshold, int64_t k0, int64_t k1,
                                                    double keep_scale) {
  const Dropout drop = checked_dropout(scaling, dropout_threshold, k0, k1, keep_scale);
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  const at::Tensor b = checked_bias(bias, x, N);
  const bool same_dtype = lora_A.scalar_type() == x.scalar_type();
  const DType base_dt = kernel_dtype(x.scalar_type()), adapter_dt = kernel_dtype(lora_A.scalar_type());

  at::Tensor h, h_adapter;
  if (same_dtype && !has_dropout(dropout_threshold, keep_scale)) {
    h_adapter = at::mm(x, lora_A.t());
    h = h_adapter.to(at::kFloat);
  } else {
    h = at::empty({M, r}, x.options().dtype(at::kFloat));
    LaunchContext ctx(x, lora::down_proj_workspace(M, K, r, device_sms()));
    CHECK_LAUNCH(lora::down_proj(base_dt, adapter_dt, view(x), view(lora_A), mut_view(h), M, K, r,
                                 static_cast<float>(keep_scale), drop, ctx.launch));
    h_adapter = h.to(lora_A.scalar_type());
  }

  at::Tensor y;
  if (same_dtype) {
    y = b.defined() ? at::addmm(b, h_adapter, lora_B.t(), /*beta=*/1.0, /*alpha=*/scaling)
                    : scaled_mm(h_adapter, lora_B.t(), scaling);
  } else {
    y = at::empty({M, N}, x.options());
    LaunchContext ctx(x, lora::rank_product_workspace(M, N, r, device_sms()));
    CHECK_LAUNCH(lora::rank_product(base_dt, adapter_dt, view(h), view(lora_B), b.defined() ? b.data_ptr() : nullptr,
                                    mut_view(y), M, N, r, static_cast<float>(scaling), Dropout{0, 0, 0},
                                    ctx.launch));
  }
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> lora_fwd(const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            const std::optional<at::Tensor>& bias, double scaling,
                                            int64_t dropout_threshold, int64_t k0, int64_t k1, double keep_scale) {
  check_lora_operands(x, weight, lora_A, lora_B);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto [y, h] = lora_fwd_lowrank(x, weight.size(0), lora_A, lora_B, bias, scaling, dropout_threshold, k0, k1,
                                 keep_scale);
  y.addmm_(x, weight.t());
  return {y, h};
}

// With g = dy B: dx = dy W + s · keep_scale · keep ⊙ (g A), dA = s · keep_scale · gᵀ drop(x),
// dB = s · dyᵀ h. Products follow the forward's split between cuBLAS and the fused kernels; dx
// gets its low-rank term first and the base GEMM accumulates onto it (beta = 1). This returns
// (the low-rank term of dx, or an empty tensor when not need_dx, dA, dB); the callers add dy W.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_bwd_lowrank(const at::Tensor& dy, const at::Tensor& x, int64_t N,
                                                                const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                                const at::Tensor& h, double scaling,
                                                                int64_t dropout_threshold, int64_t k0, int64_t k1,
                                                                double keep_scale, bool need_dx) {
  const Dropout drop = checked_dropout(scaling, dropout_threshold, k0, k1, keep_scale);
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  checks::tensor_on(dy, "dy", x, {x.scalar_type()}, {M, N});
  checks::tensor_on(h, "h", x, {at::kFloat}, {M, r});
  const at::ScalarType adapter = lora_A.scalar_type();
  const bool same_dtype = adapter == x.scalar_type();
  const bool dropout = has_dropout(dropout_threshold, keep_scale);
  const DType base_dt = kernel_dtype(x.scalar_type()), adapter_dt = kernel_dtype(adapter);
  const double s_keep = scaling * keep_scale;

  // g in the adapter dtype: the reference rounds it there before both uses.
  at::Tensor g, dA, dB, dx;
  if (same_dtype) {
    g = at::mm(dy, lora_B);
    dB = scaled_mm(dy.t(), h.to(adapter), scaling);
  } else {
    g = at::empty({M, r}, x.options().dtype(at::kFloat));
    {
      LaunchContext ctx(x, lora::down_proj_workspace(M, N, r, device_sms()));
      CHECK_LAUNCH(lora::down_proj(base_dt, adapter_dt, view(dy), view_transposed(lora_B), mut_view(g), M, N, r,
                                   1.0f, Dropout{0, 0, 0}, ctx.launch));
    }
    dB = at::empty({N, r}, lora_B.options());
    LaunchContext ctx(x, lora::outer_reduce_workspace(M, N, r, device_sms()));
    CHECK_LAUNCH(lora::outer_reduce(base_dt, adapter_dt, view(h), view(dy), mut_view_transposed(dB), M, N, r,
                                    static_cast<float>(scaling), Dropout{0, 0, 0}, ctx.launch));
  }

  if (same_dtype && !dropout) {
    dA = scaled_mm(g.t(), x, scaling);
  } else {
    dA = at::empty({r, K}, lora_A.options());
    LaunchContext ctx(x, lora::outer_reduce_workspace(M, K, r, device_sms()));
    CHECK_LAUNCH(lora::outer_reduce(base_dt, adapter_dt, view(g), view(x), mut_view(dA), M, K, r,
                                    static_cast<float>(s_keep), drop, ctx.launch));
  }

  if (!need_dx) return {at::empty({0}, x.options()), dA, dB};
  if (same_dtype && !dropout) {
    dx = scaled_mm(g, lora_A, scaling);
  } else {
    dx = at::empty({M, K}, x.options());
    LaunchContext ctx(x, lora::rank_product_workspace(M, K, r, device_sms()));
    CHECK_LAUNCH(lora::rank_product(base_dt, adapter_dt, view(g), view_transposed(lora_A), nullptr, mut_view(dx), M,
                                    K, r, static_cast<float>(s_keep), drop, ctx.launch));
  }
  return {dx, dA, dB};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                        const at::Tensor& weight, const at::Tensor& lora_A,
                                                        const at::Tensor& lora_B, const at::Tensor& h,
                                                        double scaling, int64_t dropout_threshold, int64_t k0,
                                                        int64_t k1, double keep_scale, bool need_dx) {
  check_lora_operands(x, weight, lora_A, lora_B);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto [dx, dA, dB] = lora_bwd_lowrank(dy, x, weight.size(0), lora_A, lora_B, h, scaling, dropout_threshold, k0, k1,
                                       keep_scale, need_dx);
  if (need_dx) dx.addmm_(dy, weight);
  return {dx, dA, dB};
}

// ---- the 4-bit base ----
bool is_pow2_in(int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi && (v & (v - 1)) == 0; }
int log2_of(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// W (N, K) as ops/_quant.py's Quant4 passes it: packed uint8 codes, absmax (fp32, or uint8 with
// absmax2 / code2 / offset when nested), the 16-value code table, power-of-two blocksizes; each
// part contiguous on x's device.
lora::Quant4 checked_quant4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            const at::Tensor& code, const std::optional<at::Tensor>& absmax2,
                            const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                            int64_t blocksize, int64_t blocksize2, int64_t N, int64_t K) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   "x must be float16 or bfloat16 on a 4-bit base (tensor-core tiles), got ", x.scalar_type());
  TORCH_CHECK_VALUE(N >= 1, "out_features must be >= 1, got ", N);
  TORCH_CHECK_VALUE(is_pow2_in(blocksize, 32, 4096), "blocksize must be a power of two in [32, 4096], got ", blocksize);
  const int64_t blocks = (N * K + blocksize - 1) / blocksize;
  const bool nested = absmax2.has_value();
  TORCH_CHECK_VALUE(code2.has_value() == nested && offset.has_value() == nested,
                    "absmax2, code2 and offset are given together (nested absmax) or not at all");
  checks::buffer_on(packed, "packed", x, at::kByte, (N * K + 1) / 2);
  checks::buffer_on(code, "code", x, at::kFloat, 16);
  checks::buffer_on(absmax, "absmax", x, nested ? at::kByte : at::kFloat, blocks);
  lora::Quant4 q{packed.data_ptr<uint8_t>(), absmax.data_ptr(), code.data_ptr<float>(), nullptr, nullptr, nullptr,
                 log2_of(blocksize), 0, nested};
  if (nested) {
    TORCH_CHECK_VALUE(is_pow2_in(blocksize2, 1, int64_t{1} << 20), "blocksize2 must be a power of two, got ", blocksize2);
    checks::buffer_on(*absmax2, "absmax2", x, at::kFloat, (blocks + blocksize2 - 1) / blocksize2);
    checks::buffer_on(*code2, "code2", x, at::kFloat, 256);
    checks::buffer_on(*offset, "offset", x, at::kFloat, 1);
    q.absmax2 = absmax2->data_ptr<float>();
    q.code2 = code2->data_ptr<float>();
    q.offset = offset->data_ptr<float>();
    q.log2_blocksize2 = log2_of(blocksize2);
  }
  return q;
}

std::tuple<at::Tensor, at::Tensor> lora_fwd_4bit(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
    const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
    const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t blocksize2, int64_t N,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& bias, double scaling,
    int64_t dropout_threshold, int64_t k0, int64_t k1, double keep_scale) {
  check_lora_adapters(x, N, lora_A, lora_B);
  const int64_t M = x.size(0), K = x.size(1);
  const lora::Quant4 q = checked_quant4(x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, N, K);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto [y, h] = lora_fwd_lowrank(x, N, lora_A, lora_B, bias, scaling, dropout_threshold, k0, k1, keep_scale);
  LaunchContext ctx(x, 0);
  CHECK_LAUNCH(lora::quant4_gemm_accumulate(kernel_dtype(x.scalar_type()), view(x), q, K, 1, mut_view(y), M, N, K,
                                            ctx.launch));
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_bwd_4bit(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const at::Tensor& code, const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
    const std::optional<at::Tensor>& offset, int64_t blocksize, int64_t blocksize2, int64_t N,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& h, double scaling,
    int64_t dropout_threshold, int64_t k0, int64_t k1, double keep_scale, bool need_dx) {
  check_lora_adapters(x, N, lora_A, lora_B);
  const int64_t M = x.size(0), K = x.size(1);
  const lora::Quant4 q = checked_quant4(x, packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, N, K);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto [dx, dA, dB] = lora_bwd_lowrank(dy, x, N, lora_A, lora_B, h, scaling, dropout_threshold, k0, k1, keep_scale,
                                       need_dx);
  if (need_dx) {
    LaunchContext ctx(x, 0);
    CHECK_LAUNCH(lora::quant4_gemm_accumulate(kernel_dtype(x.scalar_type()), view(dy), q, 1, K, mut_view(dx), M, K,
                                              N, ctx.launch));
  }
  return {dx, dA, dB};
}

void define(pybind11::module& m) {
  namespace py = pybind11;
  m.def("lora_fwd", &lora_fwd,
        "Fused LoRA forward: (y = x Wᵀ + bias + s · h Bᵀ in x's dtype, h = keep_scale · drop(x) Aᵀ float32)",
        py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("bias"), py::arg("scaling"),
        py::arg("dropout_threshold"), py::arg("k0"), py::arg("k1"), py::arg("keep_scale"));
  m.def("lora_bwd", &lora_bwd,
        "Fused LoRA backward: (dx or an empty tensor when not need_dx, d lora_A, d lora_B)",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("h"),
        py::arg("scaling"), py::arg("dropout_threshold"), py::arg("k0"), py::arg("k1"), py::arg("keep_scale"),
        py::arg("need_dx"));
  m.def("lora_fwd_4bit", &lora_fwd_4bit,
        "lora_fwd on a bitsandbytes 4-bit W (N, K), dequantised tile by tile: (y, h)", py::arg("x"), py::arg("packed"),
        py::arg("absmax"), py::arg("code"), py::arg("absmax2"), py::arg("code2"), py::arg("offset"),
        py::arg("blocksize"), py::arg("blocksize2"), py::arg("out_features"), py::arg("lora_A"), py::arg("lora_B"),
        py::arg("bias"), py::arg("scaling"), py::arg("dropout_threshold"), py::arg("k0"), py::arg("k1"),
        py::arg("keep_scale"));
  m.def("lora_bwd_4bit", &lora_bwd_4bit,
        "lora_bwd on a bitsandbytes 4-bit W (N, K): (dx or an empty tensor when not need_dx, d lora_A, d lora_B)",
        py::arg("dy"), py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("code"), py::arg("absmax2"),
        py::arg("code2"), py::arg("offset"), py::arg("blocksize"), py::arg("blocksize2"), py::arg("out_features"),
        py::arg("lora_A"), py::arg("lora_B"), py::arg("h"), py::arg("scaling"), py::arg("dropout_threshold"),
        py::arg("k0"), py::arg("k1"), py::arg("keep_scale"), py::arg("need_dx"));
}

const Registrar registrar(&define);

}  // namespace
}  // namespace lowrank_kernels::binding
