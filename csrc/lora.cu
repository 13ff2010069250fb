// Fused LoRA linear, CUDA kernels: y = x Wᵀ + bias + s · (drop(x) Aᵀ) Bᵀ and its backward
// (math in lowrank_kernels/ops/lora.py). Torch-free; csrc/bindings.cpp composes these kernels
// with cuBLAS (through ATen) as follows, M tokens, K in, N out, rank r:
//
//   forward    h  = keep_scale · drop(x) Aᵀ              (M, r) fp32   down_proj       [1]
//              y  = s · h Bᵀ + bias                       (M, N)        rank_product    [2]
//              y += x Wᵀ                                  cuBLAS GEMM, beta = 1
//   backward   g  = dy B                                  (M, r)        down_proj       [2]
//              dB = s · dyᵀ h                             (N, r)        outer_reduce    [2]
//              dA = s · keep_scale · gᵀ drop(x)           (r, K)        outer_reduce    [1]
//              dx = s · keep_scale · keep ⊙ (g A)         (M, K)        rank_product    [1]
//              dx += dy W                                 cuBLAS GEMM, beta = 1
//   [1] with dropout or fp32 adapters on a 16-bit base; otherwise cuBLAS (tensor cores).
//   [2] with fp32 adapters on a 16-bit base; otherwise cuBLAS.
//
// Why this split. The two big GEMMs (x Wᵀ, dy W: 2·M·N·K flops each) are where the time goes,
// and cuBLAS runs them near peak on A100 and H100. The low-rank term is written into the
// output first and the GEMM accumulates onto it with beta = 1 (reading C in a compute-bound
// GEMM's epilogue costs ~1-2%, where adding afterwards would cost a read and a write), so no
// (M, N) or (M, K) temporary exists. The skinny products are memory
// bound at small r. cuBLAS does them well when all operands share a 16-bit dtype and no mask is
// involved, so those cases go to cuBLAS. It cannot do them when (a) a dropout mask must be
// regenerated from the seed inside the product (storing the mask would cost an M×K tensor),
// or (b) fp32 adapters meet bf16/fp16 activations (PEFT's default): cuBLAS would need an fp32
// copy of x or dy, M×K×4 bytes, which is what PEFT pays. These kernels (csrc/tiles.cuh) read
// x or dy once in their storage type, apply the mask on the fly and accumulate in fp32: on tensor
// cores (wmma) when the adapters are 16-bit (case (a)), and with fp32 FMA on operands widened
// exactly when they are fp32 (case (b)), so fp32 adapters get IEEE fp32 products as in the
// reference, which cuBLAS would also compute on CUDA cores.
//
// Expected cost, H100 SXM, bf16, M = 8192, K = N = 4096, r = 16 (base forward ≈ 0.37 ms,
// fwd+bwd with W frozen ≈ 0.75 ms). Every skinny product that reads x or dy moves 64 MB
// (≈ 21 µs at 3 TB/s) and, in these kernels, does 2·M·K·r = 1.1 GFLOP of fp32 FMA (≈ 16 µs at
// the 67 TFLOP/s peak); writing the low-rank term of y or dx moves another 64 MB (≈ 21 µs), and
// the GEMM re-reading it with beta = 1 a few µs. Forward: one pass over x plus that write,
// ≈ +0.05 ms (≈ 1.13× base). Backward: g and dB each read dy, dA reads x, plus the dx write,
// ≈ +0.09 ms; fwd+bwd ≈ 1.19× base. So this design stays above the ≈ 1.03× / 1.08× targets: it
// pays separate passes over x, dy and the output. The Triton backend folds the low-rank term
// into the GEMM's main loop instead. With dropout on a 16-bit base the products run on tensor
// cores and stay memory bound up to large r; with fp32 adapters the FMA kernels are compute
// bound from r ≈ 32 (r = 64..256 costs 2-8× the memory floor). A100 (sm_80, compile-checked, tuned by reasoning only): the same structure;
// its 1.5-2 TB/s and 19.5 TFLOP/s fp32 put the compute/memory crossover at a similar r.
#include "lora.h"
#include "tiles.cuh"

namespace lowrank_kernels {
namespace lora {
namespace {

using tiles::MaskOn;
using tiles::Problem;

// The rank tile: the smallest of 16, 32, 64 that holds r (larger ranks take several tiles).
template <template <int> class Tile, typename F>
decltype(auto) by_rank(int64_t R, F&& f) {
  if (R <= 16) return f(Tile<16>{});
  if (R <= 32) return f(Tile<32>{});
  return f(Tile<64>{});
}

template <class Cfg, typename TP, typename TQ, typename TC>
cudaError_t run(Problem& pb, const Launch& launch) {
  if (tiles::workspace_floats(pb) > 0 && launch.workspace == nullptr) return cudaErrorInvalidValue;
  pb.partials = launch.workspace;
  return tiles::launch<Cfg, TP, TQ, TC>(pb, launch.num_sms, launch.stream);
}

}  // namespace

// down_proj: I = M tokens, J = R, L = K; P = x (m, k), Q = aᵀ (k, r); mask on P at (m, k).
int64_t down_proj_workspace(int64_t M, int64_t K, int64_t R, int num_sms) {
  return by_rank<tiles::TallTile>(R, [&](auto cfg) {
    return tiles::workspace_floats(tiles::planned<decltype(cfg)>(M, R, K, num_sms));
  });
}

cudaError_t down_proj(DType base, DType adapter, View x, View a, MutView out, int64_t M, int64_t K,
                      int64_t R, float alpha, Dropout drop, const Launch& launch) {
  return tiles::dispatch_base_adapter(base, adapter, [&](auto tb, auto ta) {
    using TB = typename decltype(tb)::type;
    using TA = typename decltype(ta)::type;
    return by_rank<tiles::TallTile>(R, [&](auto cfg) {
      using Cfg = decltype(cfg);
      Problem pb = tiles::planned<Cfg>(M, R, K, launch.num_sms);
      pb.p = tiles::strided_operand<TB>(x.data, x.stride0, x.stride1);
      pb.q = tiles::strided_operand<TA>(a.data, a.stride0, a.stride1);
      tiles::set_output<float>(pb, out.data, out.stride0, out.stride1);
      pb.alpha = alpha;
      tiles::set_mask(pb, MaskOn::kP, drop.k0, drop.k1, drop.threshold);
      return run<Cfg, TB, TA, float>(pb, launch);
    });
  });
}

// outer_reduce: I = R, J = K, L = M tokens; P = gᵀ (r, m), Q = x (m, k); mask on Q at (m, k).
int64_t outer_reduce_workspace(int64_t M, int64_t K, int64_t R, int num_sms) {
  return by_rank<tiles::WideTile>(R, [&](auto cfg) {
    return tiles::workspace_floats(tiles::planned<decltype(cfg)>(R, K, M, num_sms));
  });
}

cudaError_t outer_reduce(DType base, DType adapter, View g, View x, MutView out, int64_t M, int64_t K,
                         int64_t R, float alpha, Dropout drop, const Launch& launch) {
  return tiles::dispatch_base_adapter(base, adapter, [&](auto tb, auto ta) {
    using TB = typename decltype(tb)::type;
    using TA = typename decltype(ta)::type;
    return by_rank<tiles::WideTile>(R, [&](auto cfg) {
      using Cfg = decltype(cfg);
      Problem pb = tiles::planned<Cfg>(R, K, M, launch.num_sms);
      pb.p = tiles::strided_operand<TA>(g.data, g.stride1, g.stride0);
      pb.q = tiles::strided_operand<TB>(x.data, x.stride1, x.stride0);
      tiles::set_output<TA>(pb, out.data, out.stride0, out.stride1);
      pb.alpha = alpha;
      tiles::set_mask(pb, MaskOn::kQ, drop.k0, drop.k1, drop.threshold);
      return run<Cfg, TA, TB, TA>(pb, launch);
    });
  });
}

// rank_product: I = M tokens, J = N, L = R; P = h (m, r), Q = bᵀ (r, n); mask on C at (m, n).
int64_t rank_product_workspace(int64_t M, int64_t N, int64_t R, int num_sms) {
  return tiles::workspace_floats(tiles::planned<tiles::SquareTile>(M, N, R, num_sms));
}

cudaError_t rank_product(DType base, DType adapter, View h, View b, const void* bias, MutView out,
                         int64_t M, int64_t N, int64_t R, float alpha, Dropout drop, const Launch& launch) {
  return tiles::dispatch_base_adapter(base, adapter, [&](auto tb, auto ta) {
    using TB = typename decltype(tb)::type;
    using TA = typename decltype(ta)::type;
    using Cfg = tiles::SquareTile;
    Problem pb = tiles::planned<Cfg>(M, N, R, launch.num_sms);
    pb.p = tiles::strided_operand<TA>(h.data, h.stride0, h.stride1);
    pb.q = tiles::strided_operand<TA>(b.data, b.stride0, b.stride1);
    tiles::set_output<TB>(pb, out.data, out.stride0, out.stride1);
    pb.bias = bias;
    pb.alpha = alpha;
    tiles::set_mask(pb, MaskOn::kC, drop.k0, drop.k1, drop.threshold);
    return run<Cfg, TA, TA, TB>(pb, launch);
  });
}

}  // namespace lora
}  // namespace lowrank_kernels
