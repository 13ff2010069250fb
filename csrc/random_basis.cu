// VeRA and RandLoRA, CUDA kernels: the products with a random basis S (R, F) whose values are
// read from a stored tensor or drawn from the package RNG and scaled by the trainable diagonals
// as they are loaded, so no scaled basis (RandLoRA's d_min × d_min Â) and no gradient of one
// ever exists in memory. Math in lowrank_kernels/ops/random_basis.py, host API in
// random_basis.h. csrc/random_basis_binding.cpp composes them with cuBLAS as follows, M tokens, K in, N out,
// D (R, K) and U (R, N) the layer's two bases (one carries the scales):
//
//   forward    h  = keep_scale · drop(x) Dᵀ               (M, R) fp32   down
//              y  = s · h U + bias                         (M, N)        up
//              y += x Wᵀ                                   cuBLAS GEMM, beta = 1
//   backward   dh = dy Uᵀ                                  (M, R) fp32   down
//              dx = s · keep_scale · keep ⊙ (dh D)         (M, K)        up
//              dx += dy W                                  cuBLAS GEMM, beta = 1
//              scale gradients: dS = s · keep_scale · dhᵀ drop(x) reduced against D, or
//              dS = s · hᵀ dy against U                                  scale_grads
//   A product whose basis is a plain stored matrix in the base dtype and that needs no mask
//   (RandLoRA's stored B̄) goes to cuBLAS instead, on tensor cores.
//
// The kernels are csrc/tiles.cuh's tile loop (tensor cores for a 16-bit adapter, fp32 FMA for an
// fp32 one; shared-memory slices with register prefetch, deterministic split-L partials) with one
// operand a BasisLoader, which forms each value of S it loads: a stored base read through its strides, or a seeded one
// drawn with rng.cuh exactly as ops/_rng.py draws it, times the scales. scale_grads forms dS tile
// by tile, with a tile's rows a block of (hi, lo) pairs so that the col-scale gradient (a sum over
// hi at fixed lo) is a sum over the tile's row blocks, and reduces each tile against the basis in
// shared memory in a fixed order: no float atomics, results reproducible run to run.
//
// Cost: with a 16-bit adapter every product (down, up, and dS in scale_grads) runs on tensor cores
// (wmma, fp32 accumulation): VeRA's products at r = 256..1024 and RandLoRA's full-rank ones
// (R ≈ d_min: each about a base-sized GEMM) are compute bound. The basis is formed in fp32 and
// rounded once to the adapter dtype in shared memory, so no (R, F) tensor (RandLoRA's d_min²
// Â, or its gradient) is ever stored: the workspace is only the split-L partials. The wmma tiles
// stage operands through shared memory without TMA or wgmma, so they reach a fraction of cuBLAS's
// rate, well above the fp32 FMA rate. With fp32 adapters (PEFT's default on a 16-bit base) the
// products are IEEE fp32 on CUDA cores, as cuBLAS would run them after an fp32 copy of x. A
// seeded base costs one 32-bit hash (about 20 integer operations) per basis element loaded, and
// each element loaded feeds 128 multiply-adds (the tile's other side); a stored one costs reads
// that the small bases mostly serve from L2.
// Index math is int64; basis row indices are 32-bit (rows < 2^31, checked by the binding).
#include "random_basis.h"
#include "tiles.cuh"

namespace lowrank_kernels {
namespace random_basis {
namespace {

using tiles::MaskOn;
using tiles::Problem;
using tiles::to_float;

// A 16-bit adapter shares the base dtype (the dispatcher admits no other pair), so every operand
// of the product is 16-bit, or an fp32 intermediate (h, dh) that the reference holds in the
// adapter dtype: the product runs on tensor cores in that dtype. An fp32 adapter: fp32 FMA.
template <typename TA>
using MmaType = typename std::conditional<tiles::kIs16<TA>, TA, float>::type;

// ---------------------------------------------------------------------------------------------
// Basis values
// ---------------------------------------------------------------------------------------------
struct RowIndex {
  int64_t hi, lo;
};

__device__ __forceinline__ RowIndex split_row(const Basis& s, int64_t j) {
  if (s.groups == 1) return {j, 0};
  const uint32_t jj = static_cast<uint32_t>(j), g = static_cast<uint32_t>(s.groups);
  const uint32_t hi = jj / g;
  return {hi, jj - hi * g};
}

// base[hi, lo, f] in fp32: read, or drawn as ops/_rng.py draws it (both maps exact in fp32).
template <typename TA>
__device__ __forceinline__ float basis_base(const Basis& s, int64_t hi, int64_t lo, int64_t f) {
  if (s.gen == Gen::kStored) return to_float(static_cast<const TA*>(s.data)[hi * s.s_hi + lo * s.s_lo + f * s.s_f]);
  const uint32_t a = static_cast<uint32_t>(s.transposed ? f : hi);
  const uint32_t b = static_cast<uint32_t>(s.transposed ? hi : f);
  return s.gen == Gen::kUniform ? 2.0f * rng::uniform(s.k0, s.k1, a, b) - 1.0f : rng::sign(s.k0, s.k1, a, b);
}

template <typename TA>
__device__ __forceinline__ float row_scale(const Basis& s, int64_t hi, int64_t lo) {
  return s.row_scale ? to_float(static_cast<const TA*>(s.row_scale)[hi * s.rs_hi + lo * s.rs_lo]) : 1.0f;
}

template <typename TA>
__device__ __forceinline__ float col_scale(const Basis& s, int64_t lo, int64_t f) {
  return s.col_scale ? to_float(static_cast<const TA*>(s.col_scale)[lo * s.cs_g + f * s.cs_f]) : 1.0f;
}

// S[j, f] in fp32, scaled in the reference's order: (base · row_scale) · col_scale.
template <typename TA>
__device__ __forceinline__ float basis_at(const Basis& s, int64_t j, int64_t f) {
  const RowIndex r = split_row(s, j);
  return basis_base<TA>(s, r.hi, r.lo, f) * row_scale<TA>(s, r.hi, r.lo) * col_scale<TA>(s, r.lo, f);
}

// Whether a loader's groups of 4 run along f: yes, unless j has unit stride in memory and f has
// not (a stored B̄ is j-contiguous); drawn values have no layout, and a broadcast (stride 0) row
// index gains nothing.
__device__ __forceinline__ bool along_f(const Basis& s) {
  const int64_t j_stride = s.groups == 1 ? s.s_hi : s.s_lo;
  return s.gen != Gen::kStored || !(j_stride == 1 && s.s_f != 1);
}

// Q (l, x) = S[x, l] when rows_on_x (the basis's rows are the tile's columns: h = x Sᵀ), else
// S[l, x] (y = h S), as a tile loader of BX × BL slices (tiles.cuh, tile_mainloop).
template <typename TA, int BX, int BL>
struct BasisLoader : tiles::SliceLoader<float, BX, BL, 256> {
  using Slice = tiles::SliceLoader<float, BX, BL, 256>;
  const Basis& s;
  const int64_t x0, X;
  const bool rows_on_x, along_l;

  __device__ __forceinline__ BasisLoader(const Basis& s_, int64_t x0_, int64_t X_, bool rows_on_x_)
      : s(s_), x0(x0_), X(X_), rows_on_x(rows_on_x_), along_l(rows_on_x_ == along_f(s_)) {}

  __device__ __forceinline__ void load(int64_t l0, int64_t l_end) {
    this->fill(along_l, x0, X, l0, l_end, [&](int64_t ex, int64_t el) {
      return rows_on_x ? basis_at<TA>(s, ex, el) : basis_at<TA>(s, el, ex);
    });
  }

  template <typename TS, int LD>
  __device__ __forceinline__ void store(TS (*S)[LD]) const {
    Slice::store(S, along_l);
  }
};

// ---------------------------------------------------------------------------------------------
// down and up: C = epilogue(P · Q), P a strided matrix (pb.p, masked when pb.mask_on == kP),
// Q the basis
// ---------------------------------------------------------------------------------------------
template <class Cfg, typename TP, typename TA, typename TC>
__global__ void __launch_bounds__(256, tiles::kBlocksPerSm)
    basis_product_kernel(const Problem pb, const Basis s, const bool rows_on_x) {
  const tiles::TileCoords t = tiles::tile_coords<Cfg>(pb);
  tiles::StridedLoader<TP, Cfg::BI, Cfg::BL> lp(pb.p, pb, t.i0, pb.I, pb.mask_on == MaskOn::kP, true);
  BasisLoader<TA, Cfg::BJ, Cfg::BL> lq(s, t.j0, pb.J, rows_on_x);
  // A 16-bit adapter shares the base type; an fp32 P (h in `up`) is rounded to it, as the reference holds h.
  tiles::product_tile<Cfg, TC, MmaType<TA>>(pb, t.i0, t.j0, t.l_begin, t.l_end, lp, lq);
}

template <class Cfg, typename TP, typename TA, typename TC>
cudaError_t run_product(Problem& pb, const Basis& s, bool rows_on_x, const Launch& launch) {
  if (tiles::workspace_floats(pb) > 0 && launch.workspace == nullptr) return cudaErrorInvalidValue;
  pb.partials = launch.workspace;
  return tiles::launch_tiles<Cfg, TC>(&basis_product_kernel<Cfg, TP, TA, TC>, pb, launch.num_sms, launch.stream, s,
                                      rows_on_x);
}

// down's tile: one 32-wide rank tile while R fits (small VeRA ranks), square tiles beyond.
template <typename F>
decltype(auto) by_rank(int64_t R, F&& f) {
  if (R <= 32) return f(tiles::TallTile<32>{});
  return f(tiles::SquareTile{});
}

// ---------------------------------------------------------------------------------------------
// scale_grads: dS = alpha · gᵀ drop(x) by tiles, reduced against the basis
// ---------------------------------------------------------------------------------------------
// 64 rows (block_hi × block_lo pairs (hi, lo)) × 64 columns f per tile, tokens in steps of 32.
using ReduceTile = tiles::TileConfig<64, 64, 32, 4, 4, true>;

struct ReduceArgs {
  Basis s;
  const float* g;                 // (M, R)
  int64_t g_stride_m, g_stride_j;
  int64_t rows_hi;                // R / groups
  int64_t t_tiles, f_tiles, hi_tiles, lo_tiles;
  int block_hi, block_lo;
  float* d_row;                   // (splits, f_tiles, R)
  float* d_col;                   // (splits, hi_tiles, groups, F)
};

struct TileRow {
  int64_t hi, lo;
  bool ok;
};

// Row t of the tile whose (hi, lo) block starts at (hi0, lo0); ok when it names a basis row.
__device__ __forceinline__ TileRow tile_row(const ReduceArgs& ra, int64_t hi0, int64_t lo0, int t) {
  const int64_t hi = hi0 + t / ra.block_lo, lo = lo0 + t % ra.block_lo;
  return {hi, lo, hi < ra.rows_hi && lo < ra.s.groups};
}

// P (t, m) = g[m, j(t)]: the columns of g that the tile's rows name, as a loader whose groups run
// along t (consecutive j within a block of lo, contiguous in a row-major g).
struct RankRowsLoader : tiles::SliceLoader<float, ReduceTile::BI, ReduceTile::BL, 256> {
  using Slice = tiles::SliceLoader<float, ReduceTile::BI, ReduceTile::BL, 256>;
  const ReduceArgs& ra;
  const int64_t hi0, lo0;

  __device__ __forceinline__ RankRowsLoader(const ReduceArgs& ra_, int64_t hi0_, int64_t lo0_)
      : ra(ra_), hi0(hi0_), lo0(lo0_) {}

  __device__ __forceinline__ void load(int64_t l0, int64_t l_end) {
    Slice::for_each_group(/*along_l=*/false, [&](int it, int x, int l) {
      const int64_t m = l0 + l;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const TileRow r = tile_row(ra, hi0, lo0, x + e);
        this->v[it][e] = r.ok && m < l_end
                             ? ra.g[m * ra.g_stride_m + (r.hi * ra.s.groups + r.lo) * ra.g_stride_j]
                             : 0.0f;
      }
    });
  }

  template <typename TS, int LD>
  __device__ __forceinline__ void store(TS (*S)[LD]) const {
    Slice::store(S, /*along_l=*/false);
  }
};

// One block per (row tile, f tile, split); pb carries x as the Q operand (x = f, l = m), its
// dropout mask (kQ, at (m, f)), alpha and the split of M.
template <typename TX, typename TA>
__global__ void __launch_bounds__(256, tiles::kBlocksPerSm) scale_grads_kernel(const Problem pb, const ReduceArgs ra) {
  using Cfg = ReduceTile;
  constexpr int BI = Cfg::BI, BJ = Cfg::BJ, TI = Cfg::TI, TJ = Cfg::TJ, kThreadsJ = Cfg::kThreadsJ;
  // Row tiles vary fastest: consecutive blocks read the same columns of x, the larger operand.
  const int64_t t_tile = blockIdx.x % ra.t_tiles, f_tile = blockIdx.x / ra.t_tiles;
  const int64_t hi_tile = t_tile / ra.lo_tiles;
  const int64_t hi0 = hi_tile * ra.block_hi, lo0 = (t_tile % ra.lo_tiles) * ra.block_lo, f0 = f_tile * BJ;
  const int64_t split = blockIdx.y;
  const int64_t l_begin = split * pb.l_per_split, l_end = tiles::min64(pb.L, l_begin + pb.l_per_split);

  RankRowsLoader lp(ra, hi0, lo0);
  tiles::StridedLoader<TX, BJ, Cfg::BL> lq(pb.q, pb, f0, pb.J, pb.mask_on == MaskOn::kQ, /*mask_x_is_row=*/false);
  float acc[TI][TJ];
  tiles::tile_mainloop<Cfg, MmaType<TA>>(lp, lq, l_begin, l_end, acc);

  // Each thread weighs its dS values; row sums go over the thread's columns, then over the
  // row's kThreadsJ threads in order; col-scale sums over the tile's hi rows in order.
  __shared__ float row_part[BI][kThreadsJ + 1];
  __shared__ float col_part[BI][BJ + 1];
  const Basis& s = ra.s;
  const int tj = static_cast<int>(threadIdx.x) % kThreadsJ, ti = static_cast<int>(threadIdx.x) / kThreadsJ;
#pragma unroll
  for (int a = 0; a < TI; ++a) {
    const int t = ti * TI + a;
    const TileRow r = tile_row(ra, hi0, lo0, t);
    const float rs = r.ok ? row_scale<TA>(s, r.hi, r.lo) : 0.0f;
    float row_sum = 0.0f;
#pragma unroll
    for (int b = 0; b < TJ; ++b) {
      const int64_t f = f0 + tj * TJ + b;
      const bool ok = r.ok && f < s.cols;
      const float p = ok ? pb.alpha * acc[a][b] * basis_base<TA>(s, r.hi, r.lo, f) : 0.0f;
      row_sum += ok ? p * col_scale<TA>(s, r.lo, f) : 0.0f;
      col_part[t][tj * TJ + b] = p * rs;
    }
    row_part[t][tj] = row_sum;
  }
  __syncthreads();

  if (threadIdx.x < BI) {
    const int t = static_cast<int>(threadIdx.x);
    const TileRow r = tile_row(ra, hi0, lo0, t);
    if (r.ok) {
      float sum = 0.0f;
      for (int q = 0; q < kThreadsJ; ++q) sum += row_part[t][q];
      ra.d_row[(split * ra.f_tiles + f_tile) * s.rows + r.hi * s.groups + r.lo] = sum;
    }
  }
  for (int e = static_cast<int>(threadIdx.x); e < ra.block_lo * BJ; e += Cfg::kThreads) {
    const int lo_l = e / BJ, fl = e % BJ;
    const int64_t lo = lo0 + lo_l, f = f0 + fl;
    if (lo >= s.groups || f >= s.cols) continue;
    float sum = 0.0f;
    for (int h = 0; h < ra.block_hi; ++h) sum += col_part[h * ra.block_lo + lo_l][fl];
    ra.d_col[((split * ra.hi_tiles + hi_tile) * s.groups + lo) * s.cols + f] = sum;
  }
}

}  // namespace

// down: I = M tokens, J = R, L = F; P = x (m, f), masked at (m, f); Q (f, j) = S[j, f].
int64_t down_workspace(int64_t M, const Basis& s, int num_sms) {
  return by_rank(s.rows, [&](auto cfg) {
    using Cfg = decltype(cfg);
    return tiles::workspace_floats(tiles::planned<Cfg>(M, s.rows, s.cols, num_sms));
  });
}

cudaError_t down(DType base, DType adapter, View x, const Basis& s, MutView out, int64_t M, float alpha,
                 Dropout drop, const Launch& launch) {
  return tiles::dispatch_base_adapter(base, adapter, [&](auto tb, auto ta) {
    using TB = typename decltype(tb)::type;
    using TA = typename decltype(ta)::type;
    return by_rank(s.rows, [&](auto cfg) {
      using Cfg = decltype(cfg);
      Problem pb = tiles::planned<Cfg>(M, s.rows, s.cols, launch.num_sms);
      pb.p = tiles::strided_operand<TB>(x.data, x.stride0, x.stride1);
      tiles::set_output<float>(pb, out.data, out.stride0, out.stride1);
      pb.alpha = alpha;
      tiles::set_mask(pb, MaskOn::kP, drop.k0, drop.k1, drop.threshold);
      return run_product<Cfg, TB, TA, float>(pb, s, /*rows_on_x=*/true, launch);
    });
  });
}

// up: I = M tokens, J = F, L = R; P = h (m, j) fp32; Q (j, f) = S[j, f]; mask on C at (m, f).
int64_t up_workspace(int64_t M, const Basis& s, int num_sms) {
  using Cfg = tiles::SquareTile;
  return tiles::workspace_floats(tiles::planned<Cfg>(M, s.cols, s.rows, num_sms));
}

cudaError_t up(DType base, DType adapter, View h, const Basis& s, const void* bias, MutView out, int64_t M,
               float alpha, Dropout drop, const Launch& launch) {
  return tiles::dispatch_base_adapter(base, adapter, [&](auto tb, auto ta) {
    using TB = typename decltype(tb)::type;
    using TA = typename decltype(ta)::type;
    using Cfg = tiles::SquareTile;
    Problem pb = tiles::planned<Cfg>(M, s.cols, s.rows, launch.num_sms);
    pb.p = tiles::strided_operand<float>(h.data, h.stride0, h.stride1);
    tiles::set_output<TB>(pb, out.data, out.stride0, out.stride1);
    pb.bias = bias;
    pb.alpha = alpha;
    tiles::set_mask(pb, MaskOn::kC, drop.k0, drop.k1, drop.threshold);
    return run_product<Cfg, float, TA, TB>(pb, s, /*rows_on_x=*/false, launch);
  });
}

// scale_grads: I = the (hi, lo) row tiles, J = F, L = M tokens, split over M like the products.
ReducePlan scale_grads_plan(int64_t M, const Basis& s, int num_sms) {
  constexpr int BI = ReduceTile::BI;
  const int64_t rows_hi = s.rows / s.groups;
  ReducePlan plan{};
  plan.block_hi = 1;
  while (plan.block_hi < rows_hi && plan.block_hi < BI) plan.block_hi *= 2;
  plan.block_lo = BI / plan.block_hi;
  plan.hi_tiles = (rows_hi + plan.block_hi - 1) / plan.block_hi;
  plan.lo_tiles = (s.groups + plan.block_lo - 1) / plan.block_lo;
  plan.f_tiles = (s.cols + ReduceTile::BJ - 1) / ReduceTile::BJ;
  const Problem pb = tiles::planned<ReduceTile>(plan.hi_tiles * plan.lo_tiles * BI, s.cols, M, num_sms);
  plan.splits = pb.splits;
  plan.rows_per_split = pb.l_per_split;
  return plan;
}

cudaError_t scale_grads(DType base, DType adapter, View g, View x, const Basis& s, int64_t M, float alpha,
                        Dropout drop, const ReducePlan& plan, float* d_row, float* d_col, cudaStream_t stream) {
  return tiles::dispatch_base_adapter(base, adapter, [&](auto tb, auto ta) {
    using TB = typename decltype(tb)::type;
    using TA = typename decltype(ta)::type;
    Problem pb{};
    pb.J = s.cols;
    pb.L = M;
    pb.splits = static_cast<int>(plan.splits);
    pb.l_per_split = plan.rows_per_split;
    pb.q = tiles::strided_operand<TB>(x.data, x.stride1, x.stride0);
    pb.alpha = alpha;
    tiles::set_mask(pb, MaskOn::kQ, drop.k0, drop.k1, drop.threshold);
    const int64_t t_tiles = plan.hi_tiles * plan.lo_tiles;
    const ReduceArgs ra{s, static_cast<const float*>(g.data), g.stride0, g.stride1, s.rows / s.groups, t_tiles,
                        plan.f_tiles, plan.hi_tiles, plan.lo_tiles, plan.block_hi, plan.block_lo, d_row, d_col};
    const int64_t blocks = t_tiles * plan.f_tiles;
    if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
    scale_grads_kernel<TB, TA><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(plan.splits)),
                                 ReduceTile::kThreads, 0, stream>>>(pb, ra);
    return cudaGetLastError();
  });
}

}  // namespace random_basis
}  // namespace lowrank_kernels
