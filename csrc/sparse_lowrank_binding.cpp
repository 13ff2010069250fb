// Bindings of the sparse-plus-low-rank op (csrc/sparse_lowrank.cu): the sparse passes of a
// uniform (CSR) or block support; the callers do the GEMMs with cuBLAS.
#include <optional>

#include "binding.h"
#include "sparse_lowrank.h"

namespace lowrank_kernels::binding {
namespace {

namespace slr = lowrank_kernels::sparse_lowrank;
using checks::kAny;

// A dense operand (M, C) on a CUDA device, fp32/fp16/bf16, and the values (nnz) sharing its
// dtype or float32, contiguous, on its device.
void check_slr_dense(const at::Tensor& x, const at::Tensor& sp_values) {
  checks::cuda_tensor(x, "x", checks::kFloatTypes, {kAny, kAny});
  checks::tensor_on(sp_values, "sp_values", x, {x.scalar_type(), at::kFloat}, {kAny}, checks::Layout::kContiguous);
}

// A support array: 1-D, contiguous, of the given dtype and length (length < 0: any), on x's device.
void check_slr_part(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t length, const at::Tensor& x) {
  checks::tensor_on(t, name, x, {dtype}, {length < 0 ? kAny : length}, checks::Layout::kContiguous);
}

void check_slr_out(const at::Tensor& out, const at::Tensor& x, int64_t M) {
  checks::tensor_on(out, "out", x, {x.scalar_type()}, {M, kAny});
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
  checks::tensor_on(dy, "dy", x, {x.scalar_type()}, {x.size(0), kAny});
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
  checks::tensor_on(dy, "dy", x, {x.scalar_type()}, {x.size(0), kAny});
  const slr::Blocks blocks = slr_blocks(b_row0, b_col0, b_base, b_rowlen, bh, bw, x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(sp_values);
  CHECK_LAUNCH(slr::sddmm_block(kernel_dtype(x.scalar_type()), kernel_dtype(sp_values.scalar_type()), view(dy), view(x), blocks,
                                b_row0.numel(), out.data_ptr(), x.size(0), dy.size(1), x.size(1), current_stream()));
  return out;
}

void define(pybind11::module& m) {
  namespace py = pybind11;
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
}

const Registrar registrar(&define);

}  // namespace
}  // namespace lowrank_kernels::binding
