// Fused LoRA linear, CUDA kernels: y = x Wᵀ + bias + s · (drop(x) Aᵀ) Bᵀ and its backward
// (math in lowrank_kernels/ops/lora.py). Torch-free; csrc/lora_binding.cpp composes these kernels
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
using tiles::Operand;
using tiles::Problem;

// C = alpha · [keep ⊙] (P Q) for the problem planned for Cfg, P and Q strided operands of TP
// and TQ, C (I, J) of TC, the mask on `mask_on`.
template <class Cfg, typename TP, typename TQ, typename TC>
cudaError_t run(int64_t I, int64_t J, int64_t L, View p, View q, MutView out, float alpha, MaskOn mask_on,
                Dropout drop, const void* bias, const Launch& launch) {
  Problem pb = tiles::planned<Cfg>(I, J, L, launch.num_sms);
  if (tiles::workspace_floats(pb) > 0 && launch.workspace == nullptr) return cudaErrorInvalidValue;
  pb.p = tiles::strided_operand<TP>(p.data, p.stride0, p.stride1);
  pb.q = tiles::strided_operand<TQ>(q.data, q.stride0, q.stride1);
  tiles::set_output<TC>(pb, out.data, out.stride0, out.stride1);
  pb.bias = bias;
  pb.alpha = alpha;
  tiles::set_mask(pb, mask_on, drop.k0, drop.k1, drop.threshold);
  pb.partials = launch.workspace;
  return tiles::launch<Cfg, TP, TQ, TC>(pb, launch.num_sms, launch.stream);
}

// The workspace of an I × J × L product over rank R in the rank tiles Tile.
template <template <int> class Tile>
int64_t ranked_workspace(int64_t I, int64_t J, int64_t L, int64_t R, int num_sms) {
  return tiles::rank_tile<Tile>(R, [&](auto cfg) {
    return tiles::workspace_floats(tiles::planned<decltype(cfg)>(I, J, L, num_sms));
  });
}

View transposed(View v) { return {v.data, v.stride1, v.stride0}; }

}  // namespace

// down_proj: I = M tokens, J = R, L = K; P = x (m, k), Q = aᵀ (k, r); mask on P at (m, k).
int64_t down_proj_workspace(int64_t M, int64_t K, int64_t R, int num_sms) {
  return ranked_workspace<tiles::TallTile>(M, R, K, R, num_sms);
}

cudaError_t down_proj(DType base, DType adapter, View x, View a, MutView out, int64_t M, int64_t K,
                      int64_t R, float alpha, Dropout drop, const Launch& launch) {
  return tiles::dispatch_ranked<tiles::TallTile>(base, adapter, R, [&](auto tb, auto ta, auto cfg) {
    using TB = typename decltype(tb)::type;
    using TA = typename decltype(ta)::type;
    return run<decltype(cfg), TB, TA, float>(M, R, K, x, a, out, alpha, MaskOn::kP, drop, nullptr, launch);
  });
}

// outer_reduce: I = R, J = K, L = M tokens; P = gᵀ (r, m), Q = x (m, k); mask on Q at (m, k).
int64_t outer_reduce_workspace(int64_t M, int64_t K, int64_t R, int num_sms) {
  return ranked_workspace<tiles::WideTile>(R, K, M, R, num_sms);
}

cudaError_t outer_reduce(DType base, DType adapter, View g, View x, MutView out, int64_t M, int64_t K,
                         int64_t R, float alpha, Dropout drop, const Launch& launch) {
  return tiles::dispatch_ranked<tiles::WideTile>(base, adapter, R, [&](auto tb, auto ta, auto cfg) {
    using TB = typename decltype(tb)::type;
    using TA = typename decltype(ta)::type;
    return run<decltype(cfg), TA, TB, TA>(R, K, M, transposed(g), transposed(x), out, alpha, MaskOn::kQ, drop,
                                          nullptr, launch);
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
    return run<tiles::SquareTile, TA, TA, TB>(M, N, R, h, b, out, alpha, MaskOn::kC, drop, bias, launch);
  });
}

// ---------------------------------------------------------------------------------------------
// The 4-bit base (QLoRA): out += x · Wq with W dequantised into the shared-memory tiles
// ---------------------------------------------------------------------------------------------
// Why dequantise into tiles rather than dequantise W and call cuBLAS (what unsloth does): the
// dequantised bf16 W of a 4096 × 4096 layer is 32 MB written and read again per GEMM (≈ 21 µs at
// 3 TB/s on an H100), against 8 MB of 4-bit codes read here, and it would be an N × K temporary
// in every forward and backward. The price is a tile loop below cuBLAS's speed: wmma 16 × 16 × 16
// fragments from a register-prefetched, single-buffered shared tile (tiles.cuh), where cuBLAS
// pipelines wgmma through several stages. Measured on no GPU yet; the Triton backend (the
// default on CUDA tensors) dequantises in its own pipelined main loop. No split of L: each block
// owns its output tile and adds its sum to it, so results are deterministic.
using Quant4Tile = tiles::TileConfig<128, 128, 32, 8, 8, true>;

// W's BX × BL slice (x = output column j, l = reduction index), dequantised to fp32 registers;
// stored to shared memory like any operand slice (rounded there to the 16-bit mma type, once).
template <int BX, int BL>
struct Quant4Loader : tiles::SliceLoader<float, BX, BL, 256> {
  using Slice = tiles::SliceLoader<float, BX, BL, 256>;
  const Quant4 q;
  const int64_t stride_x, stride_l, x0, X;
  const bool along_l;

  __device__ __forceinline__ Quant4Loader(const Quant4& q_, int64_t stride_x_, int64_t stride_l_, int64_t x0_,
                                          int64_t X_)
      : q(q_), stride_x(stride_x_), stride_l(stride_l_), x0(x0_), X(X_), along_l(stride_l_ == 1) {}

  __device__ __forceinline__ float value(int64_t e) const {
    const unsigned byte = __ldg(q.packed + (e >> 1));
    const unsigned nib = (e & 1) ? (byte & 15u) : (byte >> 4);
    const int64_t blk = e >> q.log2_blocksize;
    float scale;
    if (q.nested) {
      const unsigned a8 = __ldg(static_cast<const uint8_t*>(q.absmax) + blk);
      // no contraction: the reference rounds the product, then the sum
      scale = __fadd_rn(__fmul_rn(__ldg(q.code2 + a8), __ldg(q.absmax2 + (blk >> q.log2_blocksize2))), __ldg(q.offset));
    } else {
      scale = __ldg(static_cast<const float*>(q.absmax) + blk);
    }
    return __fmul_rn(__ldg(q.code + nib), scale);
  }

  __device__ __forceinline__ void load(int64_t l0, int64_t l_end) {
    this->fill(along_l, x0, X, l0, l_end, [&](int64_t ex, int64_t el) { return value(ex * stride_x + el * stride_l); });
  }
  template <typename TS, int LD>
  __device__ __forceinline__ void store(TS (*S)[LD]) const {
    Slice::store(S, along_l);
  }
};

// C += the tile's product, fragment by fragment (tiles::for_each_fragment_row).
template <class Cfg, typename TC>
__device__ __forceinline__ void accumulate_mma(const tiles::Problem& pb, int64_t i0, int64_t j0,
                                               const tiles::MmaAcc<Cfg>& m) {
  tiles::for_each_fragment_row<Cfg>(m, i0, j0, pb.I, [&](int64_t i, int64_t jt, const float* buf) {
    TC* out = static_cast<TC*>(pb.c) + i * pb.c_stride_i;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (jt + e < pb.J) {
        TC& o = out[(jt + e) * pb.c_stride_j];
        o = tiles::from_float<TC>(tiles::to_float(o) + buf[e]);
      }
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(256, tiles::kBlocksPerSm)
    quant4_gemm_kernel(const tiles::Problem pb, const Quant4 q, int64_t stride_j, int64_t stride_l) {
  using Cfg = Quant4Tile;
  const tiles::TileCoords t = tiles::tile_coords<Cfg>(pb);
  tiles::StridedLoader<T, Cfg::BI, Cfg::BL> lp(pb.p, pb, t.i0, pb.I, false, true);
  Quant4Loader<Cfg::BJ, Cfg::BL> lq(q, stride_j, stride_l, t.j0, pb.J);
  tiles::MmaAcc<Cfg> m;
  tiles::mma_mainloop<Cfg, T>(lp, lq, t.l_begin, t.l_end, m);
  accumulate_mma<Cfg, T>(pb, t.i0, t.j0, m);
}

cudaError_t quant4_gemm_accumulate(DType base, View x, const Quant4& w, int64_t stride_j, int64_t stride_l,
                                   MutView out, int64_t M, int64_t J, int64_t L, const Launch& launch) {
  auto run16 = [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Q is the loader of W (w, stride_j, stride_l); no mask.
    const Problem pb = tiles::unsplit<T>(M, J, L, tiles::strided_operand<T>(x.data, x.stride0, x.stride1), Operand{},
                                         out, 1.0f, MaskOn::kNone, Dropout{0, 0, 0});
    return tiles::launch_tiles<Quant4Tile, T>(quant4_gemm_kernel<T>, pb, launch.num_sms, launch.stream, w, stride_j,
                                              stride_l);
  };
  switch (base) {
    case DType::kFloat16: return run16(tiles::Tag<__half>{});
    case DType::kBFloat16: return run16(tiles::Tag<__nv_bfloat16>{});
    default: return cudaErrorNotSupported;
  }
}

}  // namespace lora
}  // namespace lowrank_kernels
