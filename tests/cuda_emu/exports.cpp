// C entry points into csrc/'s torch-free host API for ctypes (tests/test_cuda_emulation.py).
// Each allocates the workspace its op asks for, filled with NaN so that a partial read before it
// is written shows up in the result, and returns the cudaError_t of the launches.
#include <cstdint>
#include <limits>
#include <vector>

#include "lora.h"
#include "multi_lora.h"
#include "projected_step.h"
#include "random_basis.h"
#include "sparse_lowrank.h"

namespace lk = lowrank_kernels;

namespace {
std::vector<float> nan_workspace(int64_t floats) {
  return std::vector<float>(static_cast<size_t>(floats > 0 ? floats : 1), std::numeric_limits<float>::quiet_NaN());
}
lk::DType dt(int d) { return static_cast<lk::DType>(d); }
}  // namespace

extern "C" {

int emu_lora_down_proj(int base, int adapter, const void* x, int64_t xs0, int64_t xs1, const void* a, int64_t as0,
                       int64_t as1, void* out, int64_t os0, int64_t os1, int64_t M, int64_t K, int64_t R, float alpha,
                       uint32_t k0, uint32_t k1, uint32_t threshold, int num_sms) {
  std::vector<float> ws = nan_workspace(lk::lora::down_proj_workspace(M, K, R, num_sms));
  return lk::lora::down_proj(dt(base), dt(adapter), {x, xs0, xs1}, {a, as0, as1}, {out, os0, os1}, M, K, R, alpha,
                             {k0, k1, threshold}, {num_sms, ws.data(), nullptr});
}

int emu_lora_outer_reduce(int base, int adapter, const void* g, int64_t gs0, int64_t gs1, const void* x, int64_t xs0,
                          int64_t xs1, void* out, int64_t os0, int64_t os1, int64_t M, int64_t K, int64_t R,
                          float alpha, uint32_t k0, uint32_t k1, uint32_t threshold, int num_sms) {
  std::vector<float> ws = nan_workspace(lk::lora::outer_reduce_workspace(M, K, R, num_sms));
  return lk::lora::outer_reduce(dt(base), dt(adapter), {g, gs0, gs1}, {x, xs0, xs1}, {out, os0, os1}, M, K, R, alpha,
                                {k0, k1, threshold}, {num_sms, ws.data(), nullptr});
}

int emu_lora_rank_product(int base, int adapter, const void* h, int64_t hs0, int64_t hs1, const void* b, int64_t bs0,
                          int64_t bs1, const void* bias, void* out, int64_t os0, int64_t os1, int64_t M, int64_t N,
                          int64_t R, float alpha, uint32_t k0, uint32_t k1, uint32_t threshold, int num_sms) {
  std::vector<float> ws = nan_workspace(lk::lora::rank_product_workspace(M, N, R, num_sms));
  return lk::lora::rank_product(dt(base), dt(adapter), {h, hs0, hs1}, {b, bs0, bs1}, bias, {out, os0, os1}, M, N, R,
                                alpha, {k0, k1, threshold}, {num_sms, ws.data(), nullptr});
}

int emu_rb_down(int base, int adapter, const void* x, int64_t xs0, int64_t xs1, const lk::random_basis::Basis* s,
                void* out, int64_t os0, int64_t os1, int64_t M, float alpha, uint32_t k0, uint32_t k1,
                uint32_t threshold, int num_sms) {
  std::vector<float> ws = nan_workspace(lk::random_basis::down_workspace(M, *s, num_sms));
  return lk::random_basis::down(dt(base), dt(adapter), {x, xs0, xs1}, *s, {out, os0, os1}, M, alpha,
                                {k0, k1, threshold}, {num_sms, ws.data(), nullptr});
}

int emu_rb_up(int base, int adapter, const void* h, int64_t hs0, int64_t hs1, const lk::random_basis::Basis* s,
              const void* bias, void* out, int64_t os0, int64_t os1, int64_t M, float alpha, uint32_t k0, uint32_t k1,
              uint32_t threshold, int num_sms) {
  std::vector<float> ws = nan_workspace(lk::random_basis::up_workspace(M, *s, num_sms));
  return lk::random_basis::up(dt(base), dt(adapter), {h, hs0, hs1}, *s, bias, {out, os0, os1}, M, alpha,
                              {k0, k1, threshold}, {num_sms, ws.data(), nullptr});
}

// The scale gradients summed over the partials' two leading dimensions in order, as the binding does.
int emu_rb_scale_grads(int base, int adapter, const float* g, int64_t gs0, int64_t gs1, const void* x, int64_t xs0,
                       int64_t xs1, const lk::random_basis::Basis* s, int64_t M, float alpha, uint32_t k0,
                       uint32_t k1, uint32_t threshold, int num_sms, float* d_row, float* d_col) {
  const lk::random_basis::ReducePlan plan = lk::random_basis::scale_grads_plan(M, *s, num_sms);
  std::vector<float> pr = nan_workspace(plan.splits * plan.f_tiles * s->rows);
  std::vector<float> pc = nan_workspace(plan.splits * plan.hi_tiles * s->groups * s->cols);
  const cudaError_t err = lk::random_basis::scale_grads(dt(base), dt(adapter), {g, gs0, gs1}, {x, xs0, xs1}, *s, M,
                                                        alpha, {k0, k1, threshold}, plan, pr.data(), pc.data(),
                                                        nullptr);
  if (err != cudaSuccess) return err;
  const int64_t lead_r = plan.splits * plan.f_tiles, lead_c = plan.splits * plan.hi_tiles;
  for (int64_t j = 0; j < s->rows; ++j) {
    float acc = 0.f;
    for (int64_t p = 0; p < lead_r; ++p) acc += pr[p * s->rows + j];
    d_row[j] = acc;
  }
  const int64_t gf = s->groups * s->cols;
  for (int64_t e = 0; e < gf; ++e) {
    float acc = 0.f;
    for (int64_t p = 0; p < lead_c; ++p) acc += pc[p * gf + e];
    d_col[e] = acc;
  }
  return cudaSuccess;
}

int emu_pstep_step(const lk::projected_step::Problem* pb) { return lk::projected_step::step(*pb, nullptr); }

int emu_pstep_project(int dtype, void* G, int64_t gs0, int64_t gs1, void* P, int64_t ps0, int64_t ps1, void* R,
                      int64_t rs0, int64_t rs1, int64_t rows, int64_t cols, int64_t rank) {
  return lk::projected_step::project(dt(dtype), {G, gs0, gs1}, {P, ps0, ps1}, {R, rs0, rs1}, rows, cols, rank,
                                     nullptr);
}

int emu_pstep_adamw(int dtype, void* w, const void* g, float* m1, float* m2, const int64_t* offsets,
                    const float* coef, int64_t batch, int64_t numel, float beta1, float beta2, float eps, int decay) {
  return lk::projected_step::adamw(dt(dtype), w, g, m1, m2, offsets, coef, batch, numel, beta1, beta2, eps,
                                   decay != 0, nullptr);
}

int emu_slr_spmm_csr(int dense, int values, const void* x, int64_t xs0, int64_t xs1, const void* vals,
                     const int64_t* index, const int32_t* row_ptr, const int32_t* pos, void* y, int64_t ys0,
                     int64_t ys1, int64_t M, int64_t R, int64_t n_cols, int transpose) {
  return lk::sparse_lowrank::spmm_csr(dt(dense), dt(values), {x, xs0, xs1}, vals, index, row_ptr, pos,
                                      {y, ys0, ys1}, M, R, n_cols, transpose != 0, nullptr);
}

int emu_slr_sddmm_csr(int dense, int values, const void* dy, int64_t ds0, int64_t ds1, const void* x, int64_t xs0,
                      int64_t xs1, const int64_t* index, void* out, int64_t M, int64_t K, int64_t nnz) {
  return lk::sparse_lowrank::sddmm_csr(dt(dense), dt(values), {dy, ds0, ds1}, {x, xs0, xs1}, index, out, M, K, nnz,
                                       nullptr);
}

// multi_lora: the segments as ops/multi_lora_kernels.py's group lays them out (order, offsets), ranks int32.
int emu_mlora_seg_down(int base, int adapter, const void* x, int64_t xs0, int64_t xs1, const void* a, int64_t as0,
                       int64_t as1, int64_t stride_a, void* out, int64_t os0, int64_t os1, int64_t K, int64_t R,
                       float alpha, uint32_t k0, uint32_t k1, uint32_t threshold, const int64_t* order,
                       const int64_t* offsets, const int32_t* ranks, int64_t n, int64_t S, int64_t k) {
  const lk::multi_lora::Segments seg{order, offsets, ranks, n, S, k};
  return lk::multi_lora::seg_down(dt(base), dt(adapter), {x, xs0, xs1}, {a, as0, as1}, stride_a, {out, os0, os1}, K,
                                  R, alpha, {k0, k1, threshold}, seg, {1, nullptr, nullptr});
}

int emu_mlora_seg_expand(int base, int adapter, const void* h, int64_t hs0, int64_t hs1, const void* b, int64_t bs0,
                         int64_t bs1, int64_t stride_b, void* out, int64_t os0, int64_t os1, int64_t N, int64_t R,
                         float alpha, uint32_t k0, uint32_t k1, uint32_t threshold, const int64_t* order,
                         const int64_t* offsets, const int32_t* ranks, int64_t n, int64_t S, int64_t k, int64_t phase) {
  const lk::multi_lora::Segments seg{order, offsets, ranks, n, S, k};
  return lk::multi_lora::seg_expand(dt(base), dt(adapter), {h, hs0, hs1}, {b, bs0, bs1}, stride_b, {out, os0, os1},
                                    N, R, alpha, {k0, k1, threshold}, seg, phase, {1, nullptr, nullptr});
}

int emu_mlora_seg_reduce(int base, int adapter, const void* g, int64_t gs0, int64_t gs1, const void* x, int64_t xs0,
                         int64_t xs1, float* out, int64_t F, int64_t R, float alpha, uint32_t k0, uint32_t k1,
                         uint32_t threshold, const int64_t* order, const int64_t* offsets, const int32_t* ranks,
                         int64_t n, int64_t S, int64_t k) {
  const lk::multi_lora::Segments seg{order, offsets, ranks, n, S, k};
  return lk::multi_lora::seg_reduce(dt(base), dt(adapter), {g, gs0, gs1}, {x, xs0, xs1}, out, F, R, alpha,
                                    {k0, k1, threshold}, seg, {1, nullptr, nullptr});
}

}  // extern "C"
