// Bindings of the random-basis op (csrc/random_basis.cu): VeRA and RandLoRA, their bases stored
// or drawn from seeds, products by cuBLAS where a basis is a plain matrix in the base dtype.
#include <optional>
#include <string>
#include <tuple>

#include "binding.h"
#include "random_basis.h"

namespace lowrank_kernels::binding {
namespace {

namespace rbk = lowrank_kernels::random_basis;
using checks::kAny;

// A basis as lowrank_kernels/ops/random_basis_kernels.py (cuda_basis) passes it: (rows, cols, tensor,
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
  checks::any_shape_on(t, name.c_str(), x, {adapter});
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
    const std::string what = name + " col scale";
    checks::tensor_on(*col_scale, what.c_str(), x, {adapter}, {groups, cols});
    check_rb_tensor(*col_scale, what, x, adapter, 0);
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
  checks::cuda_tensor(x, "x", checks::kFloatTypes, {kAny, kAny});
  checks::tensor_on(weight, "weight", x, {x.scalar_type()}, {kAny, x.size(1)});
  const int64_t K = x.size(1), N = weight.size(0), R = std::get<0>(down);
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
  const Dropout drop = checked_dropout(scaling, dropout_threshold, k0, k1, keep_scale);
  const int64_t M = x.size(0), N = weight.size(0), R = ops.down.rows;
  checks::tensor_on(y, "y", x, {x.scalar_type()}, {M, N});
  checks::tensor_on(h, "h", x, {at::kFloat}, {M, R});
  const at::Tensor b = checked_bias(bias, x, N);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const bool same_dtype = ops.adapter == x.scalar_type();
  const bool dropout = has_dropout(dropout_threshold, keep_scale);
  const DType base_dt = kernel_dtype(x.scalar_type()), adapter_dt = kernel_dtype(ops.adapter);

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
                         mut_view(y), M, static_cast<float>(scaling), Dropout{0, 0, 0}, ctx.launch));
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
  const Dropout drop = checked_dropout(scaling, dropout_threshold, k0, k1, keep_scale);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), R = ops.down.rows;
  checks::tensor_on(dy, "dy", x, {x.scalar_type()}, {M, N});
  checks::tensor_on(h, "h", x, {at::kFloat}, {M, R});
  if (dx.has_value()) checks::tensor_on(*dx, "dx", x, {x.scalar_type()}, {M, K});
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const bool same_dtype = ops.adapter == x.scalar_type();
  const bool dropout = has_dropout(dropout_threshold, keep_scale);
  const DType base_dt = kernel_dtype(x.scalar_type()), adapter_dt = kernel_dtype(ops.adapter);
  const double s_keep = scaling * keep_scale;

  // dh in fp32 for the kernels; through the adapter dtype when cuBLAS forms it, as the reference.
  at::Tensor dh, dh_adapter;
  if (same_dtype && ops.up_mat) {
    dh_adapter = at::mm(dy, ops.up_mat->t());
    dh = dh_adapter.to(at::kFloat);
  } else {
    dh = at::empty({M, R}, x.options().dtype(at::kFloat));
    LaunchContext ctx(x, rbk::down_workspace(M, ops.up, device_sms()));
    CHECK_LAUNCH(rbk::down(base_dt, adapter_dt, view(dy), ops.up, mut_view(dh), M, 1.0f, Dropout{0, 0, 0},
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
                                scaled_is_down ? drop : Dropout{0, 0, 0}, plan, d_row.data_ptr<float>(),
                                d_col.data_ptr<float>(), current_stream()));
  return {d_row.sum({0, 1}), d_col.sum({0, 1})};
}

void define(pybind11::module& m) {
  namespace py = pybind11;
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
}

const Registrar registrar(&define);

}  // namespace
}  // namespace lowrank_kernels::binding
