// Python bindings of lowrank_kernels._C, the package's CUDA backend. The only source that
// includes torch: the kernels live in torch-free .cu files (one per op) so they compile fast.
// Each binding validates its inputs (ValueError / TypeError naming the argument, as the Python
// launchers do), guards the device, runs on the current stream and composes its op's kernels
// with cuBLAS through ATen. One section per op, in the order of lowrank_kernels/ops/; each op's
// m.def lines go in its block of PYBIND11_MODULE at the end.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "lora.h"

// ---- shared checks and helpers ----
#define CHECK_CUDA_ON(x, ref)                                                                 \
  TORCH_CHECK_VALUE((x).is_cuda() && (x).device() == (ref).device(), #x " must be a CUDA tensor on ", \
                    (ref).device(), " (the device of " #ref "), got ", (x).device())
#define CHECK_DIM(x, n) TORCH_CHECK_VALUE((x).dim() == (n), #x " must be " #n "-D, got shape ", (x).sizes())
#define CHECK_SHAPE(x, ...)                                                                    \
  TORCH_CHECK_VALUE((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
                    ") = ", at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
#define CHECK_DTYPE(x, dtype) \
  TORCH_CHECK_TYPE((x).scalar_type() == (dtype), #x " must be ", (dtype), ", got ", (x).scalar_type())
#define CHECK_LAUNCH(call)                                                                   \
  do {                                                                                       \
    const cudaError_t err_ = (call);                                                         \
    TORCH_CHECK(err_ == cudaSuccess, #call " failed: ", cudaGetErrorString(err_));           \
  } while (0)

namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The current device's SM count and stream (callers hold a device guard for their inputs).
int device_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// fp32 scratch from torch's caching allocator, undefined when none is needed. Allocation is
// stream-ordered, so it may be released as soon as the kernels using it are queued.
at::Tensor workspace(const at::Tensor& like, int64_t floats) {
  return floats > 0 ? at::empty({floats}, like.options().dtype(at::kFloat)) : at::Tensor();
}
float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// alpha · a b without reading the (uninitialised) output: beta = 0 makes cuBLAS ignore it.
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  return at::empty({a.size(0), b.size(1)}, a.options()).addmm_(a, b, /*beta=*/0.0, /*alpha=*/alpha);
}

namespace lk = lowrank_kernels;

lk::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return lk::DType::kFloat32;
    case at::kHalf: return lk::DType::kFloat16;
    default: return lk::DType::kBFloat16;  // the callers admit float dtypes only
  }
}

lk::View view(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }
lk::View view_transposed(const at::Tensor& t) { return {t.data_ptr(), t.stride(1), t.stride(0)}; }
lk::MutView mut_view(at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }
lk::MutView mut_view_transposed(at::Tensor& t) { return {t.data_ptr(), t.stride(1), t.stride(0)}; }

// The dropout keys and threshold of ops/_tiles.py's Dropout, checked, with the scalars beside them.
lk::Dropout checked_dropout(double scaling, int64_t threshold, int64_t k0, int64_t k1, double keep_scale) {
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
at::Tensor checked_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must have shape (", N, "), got ", bias->sizes());
  CHECK_CUDA_ON(*bias, x);
  CHECK_DTYPE(*bias, x.scalar_type());
  return bias->contiguous();
}

// One kernel launch's resources: workspace (kept alive by this object) and where to run.
struct LaunchContext {
  LaunchContext(const at::Tensor& like, int64_t workspace_floats)
      : scratch(workspace(like, workspace_floats)), launch{device_sms(), data_or_null(scratch), current_stream()} {}
  at::Tensor scratch;
  lk::Launch launch;
};

}  // namespace

// ---- lora ----
namespace {

namespace lora = lowrank_kernels::lora;

// x (M, K), lora_A (r, K), lora_B (N, r) on one CUDA device; x is a float dtype; the adapters
// share it or are float32.
void check_lora_adapters(const at::Tensor& x, int64_t N, const at::Tensor& lora_A, const at::Tensor& lora_B) {
  CHECK_DIM(x, 2);
  CHECK_DIM(lora_A, 2);
  CHECK_DIM(lora_B, 2);
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  CHECK_CUDA_ON(lora_A, x);
  CHECK_CUDA_ON(lora_B, x);
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(lora_A.scalar_type() == x.scalar_type() || lora_A.scalar_type() == at::kFloat,
                   "lora_A must share x's dtype (", x.scalar_type(), ") or be float32, got ", lora_A.scalar_type());
  CHECK_DTYPE(lora_B, lora_A.scalar_type());
  const int64_t K = x.size(1), r = lora_A.size(0);
  TORCH_CHECK_VALUE(r >= 1, "lora_A must have rank r = lora_A.size(0) >= 1, got shape ", lora_A.sizes());
  CHECK_SHAPE(lora_A, r, K);
  CHECK_SHAPE(lora_B, N, r);
}

// The above, with weight (N, K) on x's device in x's dtype.
void check_lora_operands(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                         const at::Tensor& lora_B) {
  CHECK_DIM(x, 2);
  CHECK_DIM(weight, 2);
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  CHECK_CUDA_ON(weight, x);
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  CHECK_DTYPE(weight, x.scalar_type());
  const int64_t N = weight.size(0), K = x.size(1);
  CHECK_SHAPE(weight, N, K);
  check_lora_adapters(x, N, lora_A, lora_B);
}

// y = x Wᵀ + bias + s · h Bᵀ with h = keep_scale · drop(x) Aᵀ (fp32, returned for backward).
// The low-rank term (plus bias) is written first and the base GEMM accumulates onto it with
// beta = 1. Adapters in x's dtype: h and h Bᵀ by cuBLAS in that dtype (h rounded to it, as the
// reference does), unless dropout needs the fused kernel for h. fp32 adapters on a 16-bit
// base: both products by the fp32 kernels, no fp32 copy of x. This returns (s · h Bᵀ + bias, h);
// the callers add the base term, dense (cuBLAS) or 4-bit (lora::quant4_gemm_accumulate).
std::tuple<at::Tensor, at::Tensor> lora_fwd_lowrank(const at::Tensor& x, int64_t N, const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
                                                    double scaling, int64_t dropout_threshold, int64_t k0, int64_t k1,
                                                    double keep_scale) {
  const lk::Dropout drop = checked_dropout(scaling, dropout_threshold, k0, k1, keep_scale);
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  const at::Tensor b = checked_bias(bias, x, N);
  const bool same_dtype = lora_A.scalar_type() == x.scalar_type();
  // keep_scale != 1 with threshold 0 (p below 2**-25) still scales, as the reference does.
  const bool dropout = dropout_threshold > 0 || keep_scale != 1.0;

  at::Tensor h, h_adapter;
  if (same_dtype && !dropout) {
    h_adapter = at::mm(x, lora_A.t());
    h = h_adapter.to(at::kFloat);
  } else {
    h = at::empty({M, r}, x.options().dtype(at::kFloat));
    LaunchContext ctx(x, lora::down_proj_workspace(M, K, r, device_sms()));
    CHECK_LAUNCH(lora::down_proj(kernel_dtype(x.scalar_type()), kernel_dtype(lora_A.scalar_type()), view(x), view(lora_A), mut_view(h), M, K, r,
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
    CHECK_LAUNCH(lora::rank_product(kernel_dtype(x.scalar_type()), kernel_dtype(lora_A.scalar_type()), view(h), view(lora_B),
                                    b.defined() ? b.data_ptr() : nullptr, mut_view(y), M, N, r,
                                    static_cast<float>(scaling), lk::Dropout{0, 0, 0}, ctx.launch));
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
  const lk::Dropout drop = checked_dropout(scaling, dropout_threshold, k0, k1, keep_scale);
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  CHECK_DIM(dy, 2);
  CHECK_CUDA_ON(dy, x);
  CHECK_DTYPE(dy, x.scalar_type());
  CHECK_SHAPE(dy, M, N);
  CHECK_DIM(h, 2);
  CHECK_CUDA_ON(h, x);
  CHECK_DTYPE(h, at::kFloat);
  CHECK_SHAPE(h, M, r);
  const at::ScalarType adapter = lora_A.scalar_type();
  const bool same_dtype = adapter == x.scalar_type();
  const bool dropout = dropout_threshold > 0 || keep_scale != 1.0;
  const lk::DType base_dt = kernel_dtype(x.scalar_type()), adapter_dt = kernel_dtype(lora_A.scalar_type());
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
                                   1.0f, lk::Dropout{0, 0, 0}, ctx.launch));
    }
    dB = at::empty({N, r}, lora_B.options());
    LaunchContext ctx(x, lora::outer_reduce_workspace(M, N, r, device_sms()));
    CHECK_LAUNCH(lora::outer_reduce(base_dt, adapter_dt, view(h), view(dy), mut_view_transposed(dB), M, N, r,
                                    static_cast<float>(scaling), lk::Dropout{0, 0, 0}, ctx.launch));
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

// ---- lora on a 4-bit base (QLoRA): the same low-rank parts, the base GEMMs on the packed W ----
bool is_pow2_in(int64_t v, int64_t lo, int64_t hi) { return v >= lo && v <= hi && (v & (v - 1)) == 0; }
int log2_of(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// A contiguous 1-D tensor of `numel` elements of `dtype` on x's device.
void check_quant_part(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == x.device(), name, " must be a CUDA tensor on ", x.device(),
                    ", got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == numel && t.is_contiguous(), name, " must be contiguous with ", numel,
                    " elements, got shape ", t.sizes());
}

// W (N, K) as ops/_quant.py's Quant4 passes it: packed uint8 codes, absmax (fp32, or uint8 with
// absmax2 / code2 / offset when nested), the 16-value code table, power-of-two blocksizes.
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
  check_quant_part(packed, "packed", x, at::kByte, (N * K + 1) / 2);
  check_quant_part(code, "code", x, at::kFloat, 16);
  check_quant_part(absmax, "absmax", x, nested ? at::kByte : at::kFloat, blocks);
  lora::Quant4 q{packed.data_ptr<uint8_t>(), absmax.data_ptr(), code.data_ptr<float>(), nullptr, nullptr, nullptr,
                 log2_of(blocksize), 0, nested};
  if (nested) {
    TORCH_CHECK_VALUE(is_pow2_in(blocksize2, 1, int64_t{1} << 20), "blocksize2 must be a power of two, got ", blocksize2);
    check_quant_part(*absmax2, "absmax2", x, at::kFloat, (blocks + blocksize2 - 1) / blocksize2);
    check_quant_part(*code2, "code2", x, at::kFloat, 256);
    check_quant_part(*offset, "offset", x, at::kFloat, 1);
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

}  // namespace

// ---- multi_lora ----
#include "multi_lora.h"

namespace {

namespace mlora = lowrank_kernels::multi_lora;

// x (M, K), weight (N, K), lora_A (n, R, K), lora_B (n, N, R), key / coef (M, k), ranks (n) int32,
// grouping (S + M + n + 2) int64 as ops/multi_lora.py's _group lays it out; one CUDA device.
mlora::Segments check_multi_lora_operands(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                                          const at::Tensor& lora_B, const at::Tensor& key, const at::Tensor& coef,
                                          const at::Tensor& ranks, const at::Tensor& grouping) {
  CHECK_DIM(x, 2);
  CHECK_DIM(weight, 2);
  CHECK_DIM(lora_A, 3);
  CHECK_DIM(lora_B, 3);
  CHECK_DIM(key, 2);
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  CHECK_CUDA_ON(weight, x);
  CHECK_CUDA_ON(lora_A, x);
  CHECK_CUDA_ON(lora_B, x);
  CHECK_CUDA_ON(key, x);
  CHECK_CUDA_ON(coef, x);
  CHECK_CUDA_ON(ranks, x);
  CHECK_CUDA_ON(grouping, x);
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  CHECK_DTYPE(weight, x.scalar_type());
  TORCH_CHECK_TYPE(lora_A.scalar_type() == x.scalar_type() || lora_A.scalar_type() == at::kFloat,
                   "lora_A must share x's dtype (", x.scalar_type(), ") or be float32, got ", lora_A.scalar_type());
  CHECK_DTYPE(lora_B, lora_A.scalar_type());
  CHECK_DTYPE(key, at::kLong);
  CHECK_DTYPE(coef, at::kFloat);
  CHECK_DTYPE(ranks, at::kInt);
  CHECK_DTYPE(grouping, at::kLong);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), n = lora_A.size(0), R = lora_A.size(1);
  const int64_t k = key.size(1), S = M * k;
  TORCH_CHECK_VALUE(n >= 1 && R >= 1, "lora_A must be (n, R, K) with n, R >= 1, got shape ", lora_A.sizes());
  CHECK_SHAPE(weight, N, K);
  CHECK_SHAPE(lora_A, n, R, K);
  CHECK_SHAPE(lora_B, n, N, R);
  CHECK_SHAPE(key, M, k);
  CHECK_SHAPE(coef, M, k);
  CHECK_SHAPE(ranks, n);
  CHECK_SHAPE(grouping, S + M + n + 2);
  TORCH_CHECK_VALUE(grouping.is_contiguous() && ranks.is_contiguous(), "grouping and ranks must be contiguous");
  const int64_t* g = grouping.data_ptr<int64_t>();
  return {g, g + S + M, ranks.data_ptr<int32_t>(), n, S, k};
}

// A (n, R, K) adapter stack as seg_down's operand (r, k) and its per-adapter stride; `transposed`
// reads B (n, N, R) as Bᵀ.
lk::View stack_view(const at::Tensor& t, bool transposed) {
  return transposed ? lk::View{t.data_ptr(), t.stride(2), t.stride(1)} : lk::View{t.data_ptr(), t.stride(1), t.stride(2)};
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
  const lk::Dropout drop = checked_dropout(1.0, dropout_threshold, k0, k1, keep_scale);
  const int64_t K = x.size(1), N = weight.size(0), R = lora_A.size(1);
  const at::Tensor b = checked_bias(bias, x, N);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const lk::DType base_dt = kernel_dtype(x.scalar_type()), adapter_dt = kernel_dtype(lora_A.scalar_type());
  const lk::Launch launch{device_sms(), nullptr, current_stream()};
  at::Tensor y = b.defined() ? at::addmm(b, x, weight.t()) : at::mm(x, weight.t());
  at::Tensor h_sorted = at::zeros({seg.S, R}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(mlora::seg_down(base_dt, adapter_dt, view(x), stack_view(lora_A, false), lora_A.stride(0),
                               mut_view(h_sorted), K, R, static_cast<float>(keep_scale), drop, seg, launch));
  const at::Tensor order = grouping.slice(0, 0, seg.S);
  const at::Tensor coef_sorted = coef.reshape({-1}).index_select(0, order);
  const at::Tensor hc = scaled_rows(h_sorted, coef_sorted, lora_A.scalar_type());
  for (int64_t phase = 0; phase < seg.slots_per_token; ++phase)
    CHECK_LAUNCH(mlora::seg_expand(base_dt, adapter_dt, view(hc), lk::View{lora_B.data_ptr(), lora_B.stride(1), lora_B.stride(2)}, lora_B.stride(0), mut_view(y), N,
                                   R, 1.0f, lk::Dropout{0, 0, 0}, seg, phase, launch));
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
  const lk::Dropout drop = checked_dropout(1.0, dropout_threshold, k0, k1, keep_scale);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), n = lora_A.size(0), R = lora_A.size(1);
  CHECK_DIM(dy, 2);
  CHECK_CUDA_ON(dy, x);
  CHECK_DTYPE(dy, x.scalar_type());
  CHECK_SHAPE(dy, M, N);
  CHECK_CUDA_ON(h, x);
  CHECK_DTYPE(h, at::kFloat);
  CHECK_SHAPE(h, seg.S, R);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const at::ScalarType adapter = lora_A.scalar_type();
  const lk::DType base_dt = kernel_dtype(x.scalar_type()), adapter_dt = kernel_dtype(adapter);
  const lk::Launch launch{device_sms(), nullptr, current_stream()};
  const at::Tensor order = grouping.slice(0, 0, seg.S);
  const at::Tensor h_sorted = h.index_select(0, order);
  at::Tensor g_sorted = at::zeros({seg.S, R}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(mlora::seg_down(base_dt, adapter_dt, view(dy), stack_view(lora_B, true), lora_B.stride(0),
                               mut_view(g_sorted), N, R, 1.0f, lk::Dropout{0, 0, 0}, seg, launch));
  const at::Tensor coef_sorted = coef.reshape({-1}).index_select(0, order);
  const at::Tensor gc = scaled_rows(g_sorted, coef_sorted, adapter);
  const at::Tensor hc = scaled_rows(h_sorted, coef_sorted, adapter);
  at::Tensor dA = at::empty({n, R, K}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(mlora::seg_reduce(base_dt, adapter_dt, view(gc), view(x), dA.data_ptr<float>(), K, R,
                                 static_cast<float>(keep_scale), drop, seg, launch));
  at::Tensor dBt = at::empty({n, R, N}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(mlora::seg_reduce(base_dt, adapter_dt, view(hc), view(dy), dBt.data_ptr<float>(), N, R, 1.0f,
                                 lk::Dropout{0, 0, 0}, seg, launch));
  const at::Tensor dcoef = at::empty({seg.S}, x.options().dtype(at::kFloat))
                               .index_copy_(0, order, (g_sorted * h_sorted).sum(1))
                               .reshape(key.sizes());
  at::Tensor dx = at::empty({0}, x.options());
  if (need_dx) {
    dx = at::mm(dy, weight);
    for (int64_t phase = 0; phase < seg.slots_per_token; ++phase)
      CHECK_LAUNCH(mlora::seg_expand(base_dt, adapter_dt, view(gc), lk::View{lora_A.data_ptr(), lora_A.stride(2), lora_A.stride(1)},
                                     lora_A.stride(0), mut_view(dx), K, R, static_cast<float>(keep_scale), drop, seg,
                                     phase, launch));
  }
  return {dx, dA.to(adapter), dBt.transpose(1, 2).to(adapter).contiguous(), dcoef};
}

}  // namespace

// ---- random_basis ----
#include "random_basis.h"

namespace {

namespace rbk = lowrank_kernels::random_basis;

// A basis as lowrank_kernels/ops/random_basis.py (_cuda_basis) passes it: (rows, cols, tensor,
// stride_hi, stride_lo, stride_f, groups, row_scale, row_scale_stride_hi, row_scale_stride_lo,
// col_scale, k0, k1, gen, transposed); the fields of random_basis.h's Basis.
using BasisArg = std::tuple<int64_t, int64_t, std::optional<at::Tensor>, int64_t, int64_t, int64_t, int64_t,
                            std::optional<at::Tensor>, int64_t, int64_t, std::optional<at::Tensor>, int64_t, int64_t,
                            int64_t, bool>;

// The largest element offset a view reaches from its data pointer (torch strides are >= 0).
int64_t rb_max_offset(const at::Tensor& t) {
  int64_t offset = 0;
  for (int64_t d = 0; d < t.dim(); ++d) offset += (t.size(d) - 1) * t.stride(d);
  return offset;
}

// A tensor of a basis: on x's device, in the adapter dtype, non-empty, reaching element offset `reach`.
void check_rb_tensor(const at::Tensor& t, const std::string& name, const at::Tensor& x, at::ScalarType adapter,
                     int64_t reach) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == x.device(), name, " must be a CUDA tensor on ", x.device(),
                    ", got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == adapter, name, " must be ", adapter, " (the adapter dtype), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() > 0 && reach <= rb_max_offset(t), name, " of shape ", t.sizes(), " and strides ",
                    t.strides(), " does not hold the elements its strides and sizes address (up to offset ",
                    reach, ")");
}

// The adapter dtype: that of the first tensor the bases hold (rb_basis checks the others).
at::ScalarType rb_adapter_dtype(const BasisArg& down, const BasisArg& up, const at::Tensor& x) {
  const std::optional<at::Tensor>* first = nullptr;
  for (const BasisArg* b : {&down, &up}) {
    for (const std::optional<at::Tensor>* t : {&std::get<2>(*b), &std::get<7>(*b), &std::get<10>(*b)}) {
      if (first == nullptr && t->has_value()) first = t;
    }
  }
  TORCH_CHECK_VALUE(first != nullptr, "the bases hold no tensor (no stored basis, no scales): the adapter dtype is unknown");
  const at::ScalarType dtype = (*first)->scalar_type();
  TORCH_CHECK_TYPE(dtype == x.scalar_type() || dtype == at::kFloat, "the bases and scales must share x's dtype (",
                   x.scalar_type(), ") or be float32, got ", dtype);
  return dtype;
}

// A validated Basis of shape (rows, cols) from its tuple; `name` labels errors.
rbk::Basis rb_basis(const BasisArg& arg, const std::string& name, int64_t rows, int64_t cols, const at::Tensor& x,
                    at::ScalarType adapter) {
  const auto& [b_rows, b_cols, tensor, s_hi, s_lo, s_f, groups, row_scale, rs_hi, rs_lo, col_scale, k0, k1, gen,
               transposed] = arg;
  TORCH_CHECK_VALUE(b_rows == rows && b_cols == cols, name, " basis must be (", rows, ", ", cols, "), got (", b_rows,
                    ", ", b_cols, ")");
  TORCH_CHECK_VALUE(groups >= 1 && rows % groups == 0 && rows <= INT32_MAX, name,
                    " basis: groups must divide rows (", rows, ", at most 2**31 - 1), got groups = ", groups);
  TORCH_CHECK_VALUE(s_hi >= 0 && s_lo >= 0 && s_f >= 0 && rs_hi >= 0 && rs_lo >= 0, name,
                    " basis: strides must be >= 0");
  TORCH_CHECK_VALUE(gen >= 0 && gen <= 2, name, " basis: gen must be 0 (stored), 1 (uniform) or 2 (sign), got ", gen);
  const int64_t rows_hi = rows / groups;
  rbk::Basis b{};
  b.rows = rows;
  b.cols = cols;
  b.groups = groups;
  b.gen = static_cast<rbk::Gen>(gen);
  if (b.gen == rbk::Gen::kStored) {
    TORCH_CHECK_VALUE(tensor.has_value(), name, " basis: a stored basis needs its tensor");
    check_rb_tensor(*tensor, name + " basis", x, adapter, (rows_hi - 1) * s_hi + (groups - 1) * s_lo + (cols - 1) * s_f);
    b.data = tensor->data_ptr();
    b.s_hi = s_hi;
    b.s_lo = s_lo;
    b.s_f = s_f;
  } else {
    TORCH_CHECK_VALUE(!tensor.has_value(), name, " basis: a seeded basis takes no tensor");
    TORCH_CHECK_VALUE(k0 >= 0 && k0 <= INT32_MAX && k1 >= 0 && k1 <= INT32_MAX, name,
                      " basis: the seed keys must be in [0, 2**31), got ", k0, " and ", k1);
    b.k0 = static_cast<uint32_t>(k0);
    b.k1 = static_cast<uint32_t>(k1);
    b.transposed = transposed;
  }
  if (row_scale.has_value()) {
    check_rb_tensor(*row_scale, name + " row scale", x, adapter, (rows_hi - 1) * rs_hi + (groups - 1) * rs_lo);
    b.row_scale = row_scale->data_ptr();
    b.rs_hi = rs_hi;
    b.rs_lo = rs_lo;
  }
  if (col_scale.has_value()) {
    TORCH_CHECK_VALUE(col_scale->dim() == 2 && col_scale->size(0) == groups && col_scale->size(1) == cols, name,
                      " col scale must be (groups, cols) = (", groups, ", ", cols, "), got shape ", col_scale->sizes());
    check_rb_tensor(*col_scale, name + " col scale", x, adapter, 0);
    b.col_scale = col_scale->data_ptr();
    b.cs_g = col_scale->stride(0);
    b.cs_f = col_scale->stride(1);
  }
  return b;
}

// A basis that is a plain stored matrix (no groups, no scales) as an (R, F) view, for cuBLAS.
std::optional<at::Tensor> rb_plain(const BasisArg& arg, const rbk::Basis& b) {
  if (b.gen != rbk::Gen::kStored || b.groups != 1 || b.row_scale != nullptr || b.col_scale != nullptr) return {};
  const at::Tensor& t = *std::get<2>(arg);
  return t.as_strided({b.rows, b.cols}, {b.s_hi, b.s_f}, t.storage_offset());
}

// x (M, K) and weight (N, K) on one CUDA device in one float dtype; the bases D (R, K) and U (R, N).
struct RbOperands {
  at::ScalarType adapter;
  rbk::Basis down, up;
  std::optional<at::Tensor> down_mat, up_mat;  // the plain ones, as matrices
};

RbOperands check_rb_operands(const at::Tensor& x, const at::Tensor& weight, const BasisArg& down,
                             const BasisArg& up) {
  CHECK_DIM(x, 2);
  CHECK_DIM(weight, 2);
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  CHECK_CUDA_ON(weight, x);
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  CHECK_DTYPE(weight, x.scalar_type());
  const int64_t K = x.size(1), N = weight.size(0), R = std::get<0>(down);
  CHECK_SHAPE(weight, N, K);
  TORCH_CHECK_VALUE(R >= 1, "the bases' rank R (rows) must be >= 1, got ", R);
  RbOperands ops;
  ops.adapter = rb_adapter_dtype(down, up, x);
  ops.down = rb_basis(down, "down", R, K, x, ops.adapter);
  ops.up = rb_basis(up, "up", R, N, x, ops.adapter);
  ops.down_mat = rb_plain(down, ops.down);
  ops.up_mat = rb_plain(up, ops.up);
  return ops;
}

// Writes y = x Wᵀ + bias + s · h U and h = keep_scale · drop(x) Dᵀ (fp32) into the caller's y and h.
// The low-rank term (plus bias) is written first and the base GEMM accumulates onto it (beta = 1).
// A plain basis in the base dtype goes to cuBLAS, h through the adapter dtype as the reference
// rounds it; every other product to the basis kernels.
void random_basis_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const BasisArg& down, const BasisArg& up, at::Tensor y, at::Tensor h, double scaling,
                      int64_t dropout_threshold, int64_t k0, int64_t k1, double keep_scale) {
  const RbOperands ops = check_rb_operands(x, weight, down, up);
  const lk::Dropout drop = checked_dropout(scaling, dropout_threshold, k0, k1, keep_scale);
  const int64_t M = x.size(0), N = weight.size(0), R = ops.down.rows;
  CHECK_DIM(y, 2);
  CHECK_CUDA_ON(y, x);
  CHECK_DTYPE(y, x.scalar_type());
  CHECK_SHAPE(y, M, N);
  CHECK_DIM(h, 2);
  CHECK_CUDA_ON(h, x);
  CHECK_DTYPE(h, at::kFloat);
  CHECK_SHAPE(h, M, R);
  const at::Tensor b = checked_bias(bias, x, N);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const bool same_dtype = ops.adapter == x.scalar_type();
  // keep_scale != 1 with threshold 0 (p below 2**-25) still scales, as the reference does.
  const bool dropout = dropout_threshold > 0 || keep_scale != 1.0;
  const lk::DType base_dt = kernel_dtype(x.scalar_type()), adapter_dt = kernel_dtype(ops.adapter);

  at::Tensor h_adapter;
  if (same_dtype && !dropout && ops.down_mat) {
    h_adapter = at::mm(x, ops.down_mat->t());
    h.copy_(h_adapter);
  } else {
    LaunchContext ctx(x, rbk::down_workspace(M, ops.down, device_sms()));
    CHECK_LAUNCH(rbk::down(base_dt, adapter_dt, view(x), ops.down, mut_view(h), M,
                           static_cast<float>(keep_scale), drop, ctx.launch));
  }
  if (same_dtype && ops.up_mat) {
    if (!h_adapter.defined()) h_adapter = h.to(ops.adapter);
    if (b.defined()) {
      at::addmm_out(y, b, h_adapter, *ops.up_mat, /*beta=*/1.0, /*alpha=*/scaling);
    } else {
      y.addmm_(h_adapter, *ops.up_mat, /*beta=*/0.0, /*alpha=*/scaling);
    }
  } else {
    LaunchContext ctx(x, rbk::up_workspace(M, ops.up, device_sms()));
    CHECK_LAUNCH(rbk::up(base_dt, adapter_dt, view(h), ops.up, b.defined() ? b.data_ptr() : nullptr,
                         mut_view(y), M, static_cast<float>(scaling), lk::Dropout{0, 0, 0}, ctx.launch));
  }
  y.addmm_(x, weight.t());
}

// With dh = dy Uᵀ: writes dx = dy W + s · keep_scale · keep ⊙ (dh D) into the caller's dx (when
// given) and returns the gradients of the scaled basis's scales, (R,) and (groups, F) fp32, from
// dS = s · keep_scale · dhᵀ drop(x) (scaled_is_down, S = D) or dS = s · hᵀ dy (S = U).
std::tuple<at::Tensor, at::Tensor> random_basis_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                    const BasisArg& down, const BasisArg& up, const at::Tensor& h,
                                                    std::optional<at::Tensor> dx, double scaling,
                                                    int64_t dropout_threshold, int64_t k0, int64_t k1,
                                                    double keep_scale, bool scaled_is_down) {
  const RbOperands ops = check_rb_operands(x, weight, down, up);
  const lk::Dropout drop = checked_dropout(scaling, dropout_threshold, k0, k1, keep_scale);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = ops.down.rows;
  CHECK_DIM(dy, 2);
  CHECK_CUDA_ON(dy, x);
  CHECK_DTYPE(dy, x.scalar_type());
  CHECK_SHAPE(dy, M, N);
  CHECK_DIM(h, 2);
  CHECK_CUDA_ON(h, x);
  CHECK_DTYPE(h, at::kFloat);
  CHECK_SHAPE(h, M, R);
  if (dx.has_value()) {
    CHECK_DIM(*dx, 2);
    CHECK_CUDA_ON(*dx, x);
    CHECK_DTYPE(*dx, x.scalar_type());
    CHECK_SHAPE(*dx, M, K);
  }
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const bool same_dtype = ops.adapter == x.scalar_type();
  const bool dropout = dropout_threshold > 0 || keep_scale != 1.0;
  const lk::DType base_dt = kernel_dtype(x.scalar_type()), adapter_dt = kernel_dtype(ops.adapter);
  const double s_keep = scaling * keep_scale;

  // dh in fp32 for the kernels; through the adapter dtype when cuBLAS forms it, as the reference.
  at::Tensor dh, dh_adapter;
  if (same_dtype && ops.up_mat) {
    dh_adapter = at::mm(dy, ops.up_mat->t());
    dh = dh_adapter.to(at::kFloat);
  } else {
    dh = at::empty({M, R}, x.options().dtype(at::kFloat));
    LaunchContext ctx(x, rbk::down_workspace(M, ops.up, device_sms()));
    CHECK_LAUNCH(rbk::down(base_dt, adapter_dt, view(dy), ops.up, mut_view(dh), M, 1.0f, lk::Dropout{0, 0, 0},
                           ctx.launch));
  }

  if (dx.has_value()) {
    if (same_dtype && !dropout && ops.down_mat) {
      if (!dh_adapter.defined()) dh_adapter = dh.to(ops.adapter);
      dx->addmm_(dh_adapter, *ops.down_mat, /*beta=*/0.0, /*alpha=*/scaling);
    } else {
      LaunchContext ctx(x, rbk::up_workspace(M, ops.down, device_sms()));
      CHECK_LAUNCH(rbk::up(base_dt, adapter_dt, view(dh), ops.down, nullptr, mut_view(*dx), M,
                           static_cast<float>(s_keep), drop, ctx.launch));
    }
    dx->addmm_(dy, weight);
  }

  const rbk::Basis& S = scaled_is_down ? ops.down : ops.up;
  const rbk::ReducePlan plan = rbk::scale_grads_plan(M, S, device_sms());
  at::Tensor d_row = at::empty({plan.splits, plan.f_tiles, S.rows}, x.options().dtype(at::kFloat));
  at::Tensor d_col = at::empty({plan.splits, plan.hi_tiles, S.groups, S.cols}, x.options().dtype(at::kFloat));
  CHECK_LAUNCH(rbk::scale_grads(base_dt, adapter_dt, view(scaled_is_down ? dh : h), view(scaled_is_down ? x : dy),
                                S, M, static_cast<float>(scaled_is_down ? s_keep : scaling),
                                scaled_is_down ? drop : lk::Dropout{0, 0, 0}, plan, d_row.data_ptr<float>(),
                                d_col.data_ptr<float>(), current_stream()));
  return {d_row.sum({0, 1}), d_col.sum({0, 1})};
}

}  // namespace

// ---- sparse_lowrank ----
#include "sparse_lowrank.h"

namespace {

namespace slr = lowrank_kernels::sparse_lowrank;

// A dense operand (M, C) on a CUDA device, fp32/fp16/bf16, and the values (nnz) sharing its
// dtype or float32, contiguous, on its device.
void check_slr_dense(const at::Tensor& x, const at::Tensor& sp_values) {
  CHECK_DIM(x, 2);
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  CHECK_DIM(sp_values, 1);
  CHECK_CUDA_ON(sp_values, x);
  TORCH_CHECK_TYPE(sp_values.scalar_type() == x.scalar_type() || sp_values.scalar_type() == at::kFloat,
                   "sp_values must share x's dtype (", x.scalar_type(), ") or be float32, got ",
                   sp_values.scalar_type());
  TORCH_CHECK_VALUE(sp_values.is_contiguous(), "sp_values must be contiguous");
}

// A support array: 1-D, contiguous, of the given dtype and length (length < 0: any), on x's device.
void check_slr_part(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t length, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == x.device(), name, " must be a CUDA tensor on ", x.device(),
                    ", got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor, got shape ", t.sizes());
  TORCH_CHECK_VALUE(length < 0 || t.size(0) == length, name, " must have ", length, " entries, got ", t.size(0));
}

void check_slr_out(const at::Tensor& out, const at::Tensor& x, int64_t M) {
  CHECK_DIM(out, 2);
  CHECK_CUDA_ON(out, x);
  CHECK_DTYPE(out, x.scalar_type());
  TORCH_CHECK_VALUE(out.size(0) == M, "out must have ", M, " rows (x's), got shape ", out.sizes());
}

slr::Blocks slr_blocks(const at::Tensor& row0, const at::Tensor& col0, const at::Tensor& base,
                       const at::Tensor& rowlen, int64_t bh, int64_t bw, const at::Tensor& x) {
  const int64_t n = row0.numel();
  check_slr_part(row0, "b_row0", at::kInt, n, x);
  check_slr_part(col0, "b_col0", at::kInt, n, x);
  check_slr_part(base, "b_base", at::kInt, n, x);
  check_slr_part(rowlen, "b_rowlen", at::kInt, n, x);
  TORCH_CHECK_VALUE(bh >= 1 && bw >= 1 && bh * bw <= 1024, "block (bh, bw) must have 1 to 1024 entries, got (",
                    bh, ", ", bw, ")");
  return {row0.data_ptr<int32_t>(), col0.data_ptr<int32_t>(), base.data_ptr<int32_t>(), rowlen.data_ptr<int32_t>(),
          static_cast<int32_t>(bh), static_cast<int32_t>(bw)};
}

// out (M, R) += x Tᵀ, T = S (R = N, x (M, K)) or Sᵀ (R = K = n_cols, x (M, N)), uniform support.
void sparse_lowrank_spmm_csr(const at::Tensor& x, const at::Tensor& sp_values, const at::Tensor& index,
                             const at::Tensor& row_ptr, const std::optional<at::Tensor>& pos, at::Tensor& out,
                             int64_t n_cols, bool transpose) {
  check_slr_dense(x, sp_values);
  const int64_t M = x.size(0), nnz = sp_values.numel();
  check_slr_out(out, x, M);
  const int64_t R = out.size(1);
  check_slr_part(index, "index", at::kLong, nnz, x);
  check_slr_part(row_ptr, "row_ptr", at::kInt, R + 1, x);
  TORCH_CHECK_VALUE(n_cols >= 1 && (transpose ? R : x.size(1)) == n_cols, "n_cols must be the support's K (",
                    transpose ? R : x.size(1), "), got ", n_cols);
  TORCH_CHECK_VALUE(pos.has_value() == transpose, "pos must be given exactly when transpose is true");
  if (pos.has_value()) check_slr_part(*pos, "pos", at::kInt, nnz, x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  CHECK_LAUNCH(slr::spmm_csr(kernel_dtype(x.scalar_type()), kernel_dtype(sp_values.scalar_type()), view(x), sp_values.data_ptr(),
                             index.data_ptr<int64_t>(), row_ptr.data_ptr<int32_t>(),
                             pos.has_value() ? pos->data_ptr<int32_t>() : nullptr, mut_view(out), M, R, n_cols,
                             transpose, current_stream()));
}

// (dyᵀ x) at the support, in sp_values' dtype: dy (M, N), x (M, K), uniform support.
at::Tensor sparse_lowrank_sddmm_csr(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& index,
                                    const at::Tensor& sp_values) {
  check_slr_dense(x, sp_values);
  CHECK_DIM(dy, 2);
  CHECK_CUDA_ON(dy, x);
  CHECK_DTYPE(dy, x.scalar_type());
  TORCH_CHECK_VALUE(dy.size(0) == x.size(0), "dy must have ", x.size(0), " rows (x's), got shape ", dy.sizes());
  const int64_t nnz = sp_values.numel();
  check_slr_part(index, "index", at::kLong, nnz, x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(sp_values);
  CHECK_LAUNCH(slr::sddmm_csr(kernel_dtype(x.scalar_type()), kernel_dtype(sp_values.scalar_type()), view(dy), view(x), index.data_ptr<int64_t>(),
                              out.data_ptr(), x.size(0), x.size(1), nnz, current_stream()));
  return out;
}

// out (M, R) += x Tᵀ for a block support; ptr groups the blocks by T's block-rows, order lists
// them for T = Sᵀ.
void sparse_lowrank_spmm_block(const at::Tensor& x, const at::Tensor& sp_values, const at::Tensor& ptr,
                               const std::optional<at::Tensor>& order, const at::Tensor& b_row0,
                               const at::Tensor& b_col0, const at::Tensor& b_base, const at::Tensor& b_rowlen,
                               at::Tensor& out, int64_t bh, int64_t bw, bool transpose) {
  check_slr_dense(x, sp_values);
  const int64_t M = x.size(0);
  check_slr_out(out, x, M);
  const slr::Blocks blocks = slr_blocks(b_row0, b_col0, b_base, b_rowlen, bh, bw, x);
  check_slr_part(ptr, "ptr", at::kInt, -1, x);
  TORCH_CHECK_VALUE(ptr.numel() >= 1, "ptr must have at least one entry");
  TORCH_CHECK_VALUE(order.has_value() == transpose, "order must be given exactly when transpose is true");
  if (order.has_value()) check_slr_part(*order, "order", at::kInt, b_row0.numel(), x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  CHECK_LAUNCH(slr::spmm_block(kernel_dtype(x.scalar_type()), kernel_dtype(sp_values.scalar_type()), view(x), sp_values.data_ptr(), blocks,
                               ptr.data_ptr<int32_t>(), order.has_value() ? order->data_ptr<int32_t>() : nullptr,
                               ptr.numel() - 1, mut_view(out), M, out.size(1), x.size(1), transpose,
                               current_stream()));
}

// (dyᵀ x) at a block support, in sp_values' dtype: dy (M, N), x (M, K).
at::Tensor sparse_lowrank_sddmm_block(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& b_row0,
                                      const at::Tensor& b_col0, const at::Tensor& b_base, const at::Tensor& b_rowlen,
                                      const at::Tensor& sp_values, int64_t bh, int64_t bw) {
  check_slr_dense(x, sp_values);
  CHECK_DIM(dy, 2);
  CHECK_CUDA_ON(dy, x);
  CHECK_DTYPE(dy, x.scalar_type());
  TORCH_CHECK_VALUE(dy.size(0) == x.size(0), "dy must have ", x.size(0), " rows (x's), got shape ", dy.sizes());
  const slr::Blocks blocks = slr_blocks(b_row0, b_col0, b_base, b_rowlen, bh, bw, x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(sp_values);
  CHECK_LAUNCH(slr::sddmm_block(kernel_dtype(x.scalar_type()), kernel_dtype(sp_values.scalar_type()), view(dy), view(x), blocks,
                                b_row0.numel(), out.data_ptr(), x.size(0), dy.size(1), x.size(1), current_stream()));
  return out;
}

}  // namespace

// ---- projected_step ----
#include "projected_step.h"

namespace {

namespace pstep = lowrank_kernels::projected_step;

// The Python launcher passes a batch of problems in their right-projection form (transposed views
// for a left projection): batch element 0's tensors, the offset table locating the others (it
// validated them all), the step sizes and the batched fp32 workspace; here: checks, device guard,
// raw pointers.
lk::DType pstep_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), name, " must be float32, float16 or bfloat16, got ",
                   t.scalar_type());
  return kernel_dtype(t.scalar_type());
}

pstep::Mat pstep_mat(const at::Tensor& t) { return {const_cast<void*>(t.data_ptr()), t.stride(0), t.stride(1)}; }

// An fp32 matrix of the given shape on W's device (moments, projector, workspace).
void check_pstep_fp32(const at::Tensor& x, const at::Tensor& w, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK_VALUE(x.is_cuda() && x.device() == w.device(), name, " must be a CUDA tensor on ", w.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == rows && x.size(1) == cols, name, " must have shape (", rows, ", ",
                    cols, "), got ", x.sizes());
}

// The (roles, batch) int64 offset table and the (batch, 2) fp32 step sizes, contiguous on W's device.
int64_t check_pstep_batch(const at::Tensor& offsets, const at::Tensor& coef, const at::Tensor& w, int64_t roles) {
  TORCH_CHECK_VALUE(offsets.is_cuda() && offsets.device() == w.device(), "offsets must be a CUDA tensor on ",
                    w.device());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 2 && offsets.size(0) == roles && offsets.is_contiguous(),
                    "offsets must be a contiguous (", roles, ", batch) table, got ", offsets.sizes());
  const int64_t batch = offsets.size(1);
  TORCH_CHECK_VALUE(batch >= 1 && batch <= pstep::kMaxBatch, "the batch must hold 1 to ", pstep::kMaxBatch,
                    " problems, got ", batch);
  TORCH_CHECK_VALUE(coef.is_cuda() && coef.device() == w.device(), "coef must be a CUDA tensor on ", w.device());
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat, "coef must be float32, got ", coef.scalar_type());
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == batch && coef.size(1) == 2 && coef.is_contiguous(),
                    "coef must be a contiguous (", batch, ", 2) tensor, got ", coef.sizes());
  return batch;
}

// An fp32 contiguous vector of at least `numel` elements on W's device (Fira's scratch and state).
float* pstep_vec(const std::optional<at::Tensor>& x, const at::Tensor& w, int64_t numel, const char* name) {
  TORCH_CHECK_VALUE(x.has_value(), name, " is required when fira is true");
  TORCH_CHECK_VALUE(x->is_cuda() && x->device() == w.device(), name, " must be a CUDA tensor on ", w.device());
  TORCH_CHECK_TYPE(x->scalar_type() == at::kFloat, name, " must be float32, got ", x->scalar_type());
  TORCH_CHECK_VALUE(x->is_contiguous() && x->numel() >= numel, name, " must be contiguous with at least ", numel,
                    " elements");
  return x->data_ptr<float>();
}

void projected_step(at::Tensor weight, std::optional<at::Tensor> grad, const at::Tensor& proj, at::Tensor exp_avg,
                    at::Tensor exp_avg_sq, std::optional<at::Tensor> proj_grad, at::Tensor r_ws, at::Tensor n_ws,
                    std::optional<at::Tensor> gsq, std::optional<at::Tensor> phi, std::optional<at::Tensor> res,
                    std::optional<at::Tensor> limit, std::optional<at::Tensor> limiter_norm,
                    const at::Tensor& offsets, const at::Tensor& coef, bool fira, bool decay, double beta1,
                    double beta2, double eps, double scale) {
  CHECK_DIM(weight, 2);
  TORCH_CHECK_VALUE(weight.is_cuda(), "weight must be a CUDA tensor, got one on ", weight.device());
  const int64_t rows = weight.size(0), cols = weight.size(1), rank = proj.size(0);
  const bool project = !proj_grad.has_value();
  const int64_t batch = check_pstep_batch(offsets, coef, weight, pstep::kRoles);
  pstep::Problem pb{};
  pb.dtype = pstep_dtype(weight, "weight");
  pb.batch = batch;
  pb.offsets = offsets.data_ptr<int64_t>();
  pb.coef = coef.data_ptr<float>();
  pb.W = pstep_mat(weight);
  if (grad.has_value()) {
    CHECK_CUDA_ON(*grad, weight);
    CHECK_DTYPE(*grad, weight.scalar_type());
    TORCH_CHECK_VALUE(grad->sizes() == weight.sizes(), "grad must have weight's shape ", weight.sizes(), ", got ",
                      grad->sizes());
    pb.G = pstep_mat(*grad);
  } else {
    TORCH_CHECK_VALUE(!project && !fira, "grad is required unless proj_grad is given (GaLore only)");
    pb.G = {nullptr, 0, 0};
  }
  check_pstep_fp32(proj, weight, rank, cols, "proj");
  check_pstep_fp32(exp_avg, weight, rows, rank, "exp_avg");
  check_pstep_fp32(exp_avg_sq, weight, rows, rank, "exp_avg_sq");
  for (const at::Tensor* ws : {&r_ws, &n_ws}) {
    TORCH_CHECK_VALUE(ws->is_cuda() && ws->device() == weight.device() && ws->scalar_type() == at::kFloat &&
                          ws->dim() == 3 && ws->size(0) == batch && ws->size(1) == rows && ws->size(2) == rank &&
                          ws->is_contiguous(),
                      "the R and N workspaces must be contiguous float32 (", batch, ", ", rows, ", ", rank,
                      ") tensors on ", weight.device(), ", got ", ws->sizes());
  }
  pb.P = pstep_mat(proj);
  pb.M1 = pstep_mat(exp_avg);
  pb.M2 = pstep_mat(exp_avg_sq);
  if (project) {
    pb.R = {r_ws.data_ptr(), rank, 1};
  } else {
    check_pstep_fp32(*proj_grad, weight, rows, rank, "proj_grad");
    pb.R = pstep_mat(*proj_grad);
  }
  pb.N = n_ws.data_ptr<float>();
  if (fira) {
    pb.gsq = pstep_vec(gsq, weight, batch * rows, "gsq workspace");
    pb.phi = pstep_vec(phi, weight, batch * rows, "phi workspace");
    pb.res = pstep_vec(res, weight, batch * rows, "res workspace");
    pb.limit = pstep_vec(limit, weight, batch, "limit workspace");
    pb.prev = pstep_vec(limiter_norm, weight, 1, "limiter_norm");
  }
  pb.rows = rows;
  pb.cols = cols;
  pb.rank = rank;
  pb.fira = fira;
  pb.project = project;
  pb.decay = decay;
  pb.beta1 = static_cast<float>(beta1);
  pb.beta2 = static_cast<float>(beta2);
  pb.eps = static_cast<float>(eps);
  pb.scale = static_cast<float>(scale);
  const c10::cuda::OptionalCUDAGuard guard(weight.device());
  CHECK_LAUNCH(pstep::step(pb, current_stream()));
}

void projected_step_project(const at::Tensor& grad, const at::Tensor& proj, at::Tensor out) {
  CHECK_DIM(grad, 2);
  TORCH_CHECK_VALUE(grad.is_cuda(), "grad must be a CUDA tensor, got one on ", grad.device());
  const int64_t rows = grad.size(0), cols = grad.size(1), rank = proj.size(0);
  check_pstep_fp32(proj, grad, rank, cols, "proj");
  check_pstep_fp32(out, grad, rows, rank, "out");
  const c10::cuda::OptionalCUDAGuard guard(grad.device());
  CHECK_LAUNCH(pstep::project(pstep_dtype(grad, "grad"), pstep_mat(grad), pstep_mat(proj), pstep_mat(out), rows, cols,
                              rank, current_stream()));
}

void adamw_step(at::Tensor weight, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                const at::Tensor& offsets, const at::Tensor& coef, double beta1, double beta2, double eps,
                bool decay) {
  TORCH_CHECK_VALUE(weight.is_cuda(), "weight must be a CUDA tensor, got one on ", weight.device());
  const int64_t batch = check_pstep_batch(offsets, coef, weight, pstep::kAdamwRoles);
  CHECK_CUDA_ON(grad, weight);
  CHECK_CUDA_ON(exp_avg, weight);
  CHECK_CUDA_ON(exp_avg_sq, weight);
  CHECK_DTYPE(grad, weight.scalar_type());
  CHECK_DTYPE(exp_avg, at::kFloat);
  CHECK_DTYPE(exp_avg_sq, at::kFloat);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&weight, &grad, &exp_avg, &exp_avg_sq}) {
    TORCH_CHECK_VALUE(t->is_contiguous() && t->numel() == weight.numel(),
                      "adamw_step: weight, grad and the moments must be contiguous with ", weight.numel(), " elements");
  }
  const c10::cuda::OptionalCUDAGuard guard(weight.device());
  CHECK_LAUNCH(pstep::adamw(pstep_dtype(weight, "weight"), weight.data_ptr(), grad.data_ptr(),
                            exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), offsets.data_ptr<int64_t>(),
                            coef.data_ptr<float>(), batch, weight.numel(), static_cast<float>(beta1),
                            static_cast<float>(beta2), static_cast<float>(eps), decay, current_stream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowrank_kernels CUDA backend (called by lowrank_kernels.ops; not a public API)";

  // ---- lora ----
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

  // ---- multi_lora ----
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

  // ---- random_basis ----
  m.def("random_basis_fwd", &random_basis_fwd,
        "VeRA/RandLoRA forward into y and h: y = x Wᵀ + bias + s · h U in x's dtype, h = keep_scale · drop(x) Dᵀ "
        "float32", py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("down"), py::arg("up"), py::arg("y"),
        py::arg("h"), py::arg("scaling"), py::arg("dropout_threshold"), py::arg("k0"), py::arg("k1"),
        py::arg("keep_scale"));
  m.def("random_basis_bwd", &random_basis_bwd,
        "VeRA/RandLoRA backward: dx into dx (when given); returns the scaled basis's (d row scale, d col scale) "
        "float32", py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("down"), py::arg("up"), py::arg("h"),
        py::arg("dx"), py::arg("scaling"), py::arg("dropout_threshold"), py::arg("k0"), py::arg("k1"),
        py::arg("keep_scale"), py::arg("scaled_is_down"));

  // ---- sparse_lowrank ----
  m.def("sparse_lowrank_spmm_csr", &sparse_lowrank_spmm_csr,
        "out += x Tᵀ in place, T = S or Sᵀ (transpose) of a uniform support", py::arg("x"), py::arg("sp_values"),
        py::arg("index"), py::arg("row_ptr"), py::arg("pos"), py::arg("out"), py::arg("n_cols"), py::arg("transpose"));
  m.def("sparse_lowrank_sddmm_csr", &sparse_lowrank_sddmm_csr, "(dyᵀ x) at a uniform support", py::arg("dy"),
        py::arg("x"), py::arg("index"), py::arg("sp_values"));
  m.def("sparse_lowrank_spmm_block", &sparse_lowrank_spmm_block,
        "out += x Tᵀ in place, T = S or Sᵀ (transpose) of a block support", py::arg("x"), py::arg("sp_values"),
        py::arg("ptr"), py::arg("order"), py::arg("b_row0"), py::arg("b_col0"), py::arg("b_base"),
        py::arg("b_rowlen"), py::arg("out"), py::arg("bh"), py::arg("bw"), py::arg("transpose"));
  m.def("sparse_lowrank_sddmm_block", &sparse_lowrank_sddmm_block, "(dyᵀ x) at a block support", py::arg("dy"),
        py::arg("x"), py::arg("b_row0"), py::arg("b_col0"), py::arg("b_base"), py::arg("b_rowlen"),
        py::arg("sp_values"), py::arg("bh"), py::arg("bw"));

  // ---- projected_step ----
  m.def("projected_step", &projected_step,
        "Fused GaLore/Fira projected AdamW step of a batch of problems in their right-projection form, in place on "
        "the weights, moments and limiter norms", py::arg("weight"), py::arg("grad"), py::arg("proj"),
        py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("proj_grad"), py::arg("r_ws"), py::arg("n_ws"),
        py::arg("gsq"), py::arg("phi"), py::arg("res"), py::arg("limit"), py::arg("limiter_norm"), py::arg("offsets"),
        py::arg("coef"), py::arg("fira"), py::arg("decay"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("scale"));
  m.def("projected_step_project", &projected_step_project, "out (rows, rank) fp32 = grad projᵀ", py::arg("grad"),
        py::arg("proj"), py::arg("out"));
  m.def("adamw_step", &adamw_step, "transformers-style AdamW on a batch of flat contiguous tensors, in place",
        py::arg("weight"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("offsets"),
        py::arg("coef"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("decay"));
}
