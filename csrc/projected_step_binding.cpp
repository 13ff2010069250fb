// Bindings of the projected optimizer step (csrc/projected_step.cu): the fused GaLore / Fira
// projected AdamW step, its projection alone, and the plain AdamW step, on batches of problems.
#include <optional>

#include "binding.h"
#include "projected_step.h"

namespace lowrank_kernels::binding {
namespace {

namespace pstep = lowrank_kernels::projected_step;

// The Python launcher passes a batch of problems in their right-projection form (transposed views
// for a left projection): batch element 0's tensors, the offset table locating the others (it
// validated them all), the step sizes and the batched fp32 workspace; here: checks, device guard,
// raw pointers.
pstep::Mat pstep_mat(const at::Tensor& t) { return {const_cast<void*>(t.data_ptr()), t.stride(0), t.stride(1)}; }

// The (roles, batch) int64 offset table and the (batch, 2) fp32 step sizes, contiguous on W's device.
int64_t check_pstep_batch(const at::Tensor& offsets, const at::Tensor& coef, const at::Tensor& w, int64_t roles) {
  checks::tensor_on(offsets, "offsets", w, {at::kLong}, {roles, checks::kAny}, checks::Layout::kContiguous);
  const int64_t batch = offsets.size(1);
  TORCH_CHECK_VALUE(batch >= 1 && batch <= pstep::kMaxBatch, "the batch must hold 1 to ", pstep::kMaxBatch,
                    " problems, got ", batch);
  checks::tensor_on(coef, "coef", w, {at::kFloat}, {batch, 2}, checks::Layout::kContiguous);
  return batch;
}

// An fp32 contiguous vector of at least `numel` elements on W's device (Fira's scratch and state).
float* pstep_vec(const std::optional<at::Tensor>& x, const at::Tensor& w, int64_t numel, const char* name) {
  TORCH_CHECK_VALUE(x.has_value(), name, " is required when fira is true");
  checks::buffer_on(*x, name, w, at::kFloat, numel, /*at_least=*/true);
  return x->data_ptr<float>();
}

void projected_step(at::Tensor weight, std::optional<at::Tensor> grad, const at::Tensor& proj, at::Tensor exp_avg,
                    at::Tensor exp_avg_sq, std::optional<at::Tensor> proj_grad, at::Tensor r_ws, at::Tensor n_ws,
                    std::optional<at::Tensor> gsq, std::optional<at::Tensor> phi, std::optional<at::Tensor> res,
                    std::optional<at::Tensor> limit, std::optional<at::Tensor> limiter_norm,
                    const at::Tensor& offsets, const at::Tensor& coef, bool fira, bool decay, double beta1,
                    double beta2, double eps, double scale) {
  checks::cuda_tensor(weight, "weight", checks::kFloatTypes, {checks::kAny, checks::kAny});
  const int64_t rows = weight.size(0), cols = weight.size(1), rank = proj.size(0);
  const bool project = !proj_grad.has_value();
  const int64_t batch = check_pstep_batch(offsets, coef, weight, pstep::kRoles);
  pstep::Problem pb{};
  pb.dtype = kernel_dtype(weight.scalar_type());
  pb.batch = batch;
  pb.offsets = offsets.data_ptr<int64_t>();
  pb.coef = coef.data_ptr<float>();
  pb.W = pstep_mat(weight);
  if (grad.has_value()) {
    checks::tensor_on(*grad, "grad", weight, {weight.scalar_type()}, weight.sizes());
    pb.G = pstep_mat(*grad);
  } else {
    TORCH_CHECK_VALUE(!project && !fira, "grad is required unless proj_grad is given (GaLore only)");
    pb.G = {nullptr, 0, 0};
  }
  checks::tensor_on(proj, "proj", weight, {at::kFloat}, {rank, cols});
  checks::tensor_on(exp_avg, "exp_avg", weight, {at::kFloat}, {rows, rank});
  checks::tensor_on(exp_avg_sq, "exp_avg_sq", weight, {at::kFloat}, {rows, rank});
  checks::tensor_on(r_ws, "r_ws", weight, {at::kFloat}, {batch, rows, rank}, checks::Layout::kContiguous);
  checks::tensor_on(n_ws, "n_ws", weight, {at::kFloat}, {batch, rows, rank}, checks::Layout::kContiguous);
  pb.P = pstep_mat(proj);
  pb.M1 = pstep_mat(exp_avg);
  pb.M2 = pstep_mat(exp_avg_sq);
  if (project) {
    pb.R = {r_ws.data_ptr(), rank, 1};
  } else {
    checks::tensor_on(*proj_grad, "proj_grad", weight, {at::kFloat}, {rows, rank});
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
  checks::cuda_tensor(grad, "grad", checks::kFloatTypes, {checks::kAny, checks::kAny});
  const int64_t rows = grad.size(0), cols = grad.size(1), rank = proj.size(0);
  checks::tensor_on(proj, "proj", grad, {at::kFloat}, {rank, cols});
  checks::tensor_on(out, "out", grad, {at::kFloat}, {rows, rank});
  const c10::cuda::OptionalCUDAGuard guard(grad.device());
  CHECK_LAUNCH(pstep::project(kernel_dtype(grad.scalar_type()), pstep_mat(grad), pstep_mat(proj), pstep_mat(out),
                              rows, cols, rank, current_stream()));
}

void adamw_step(at::Tensor weight, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                const at::Tensor& offsets, const at::Tensor& coef, double beta1, double beta2, double eps,
                bool decay) {
  checks::any_shape_on(weight, "weight", weight, checks::kFloatTypes);
  const int64_t batch = check_pstep_batch(offsets, coef, weight, pstep::kAdamwRoles);
  const int64_t numel = weight.numel();
  checks::buffer_on(weight, "weight", weight, weight.scalar_type(), numel);
  checks::buffer_on(grad, "grad", weight, weight.scalar_type(), numel);
  checks::buffer_on(exp_avg, "exp_avg", weight, at::kFloat, numel);
  checks::buffer_on(exp_avg_sq, "exp_avg_sq", weight, at::kFloat, numel);
  const c10::cuda::OptionalCUDAGuard guard(weight.device());
  CHECK_LAUNCH(pstep::adamw(kernel_dtype(weight.scalar_type()), weight.data_ptr(), grad.data_ptr(),
                            exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), offsets.data_ptr<int64_t>(),
                            coef.data_ptr<float>(), batch, weight.numel(), static_cast<float>(beta1),
                            static_cast<float>(beta2), static_cast<float>(eps), decay, current_stream()));
}

void define(pybind11::module& m) {
  namespace py = pybind11;
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

const Registrar registrar(&define);

}  // namespace
}  // namespace lowrank_kernels::binding
