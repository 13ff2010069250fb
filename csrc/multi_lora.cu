// Multi-adapter LoRA linear, CUDA kernels (math in lowrank_kernels/ops/multi_lora.py). Torch-free;
// csrc/multi_lora_binding.cpp composes them with cuBLAS, S slots grouped by adapter (csrc/multi_lora.h):
//
//   forward    y   = x Wᵀ + bias                              cuBLAS
//              h   = keep_scale · drop(x[tok]) A_aᵀ           (S, R) fp32, sorted     seg_down
//              y[tok] += (c · h) B_aᵀ                         one pass per slot index  seg_expand
//   backward   g   = dy[tok] B_a                              (S, R) fp32, sorted     seg_down
//              dA_a = keep_scale · Σ (c · g)ᵀ drop(x[tok])                           seg_reduce
//              dB_aᵀ = Σ (c · h)ᵀ dy[tok]                                            seg_reduce
//              dx  = dy W (cuBLAS), then dx[tok] += keep_scale · keep ⊙ ((c · g) A_a)  seg_expand
//
// Each tile holds one adapter's sorted positions (a tile never straddles two segments), so it
// reads one adapter's A or B, and the padding of a stack of mixed ranks costs nothing past the
// rank tile: the rank loops stop at rank_a. The token rows are gathered through `order` as the
// tiles load them (tiles::SliceLoader's layout, one index load per 4-element group) and
// scattered the same way on store. Products run on tensor cores (wmma, csrc/tiles.cuh) when
// both operands are 16-bit, else in IEEE fp32 FMA; accumulation is fp32.
//
// Tiles are found without host synchronisation: block b walks the per-adapter tile counts
// ceil(len_a / BI) (n loads, cached) to its segment; the grid is sized for the worst case,
// ceil(S / BI) + n blocks, and blocks past the last tile exit at once. The reductions give each
// adapter its own blocks and run its whole segment in one block per output tile (no split, no
// atomics): deterministic, but an adapter holding most tokens gets only (R / BI) · (F / 128)
// blocks. The expansion adds to y (or dx) after cuBLAS wrote it: one more read and write of
// those rows than the Triton backend's fused GEMM, and k passes for k slots per token, so that
// no two blocks of a pass update the same row.
#include "multi_lora.h"
#include "tiles.cuh"

namespace lowrank_kernels {
namespace multi_lora {
namespace {

using tiles::MaskOn;
using tiles::Operand;
using tiles::Problem;

struct SegTile {
  int64_t adapter, i0, i_end;
  bool valid;
};

// Block `block`'s tile of BI sorted positions: the adapter whose segment holds it and its rows.
template <int BI>
__device__ __forceinline__ SegTile seg_tile(const Segments& seg, int64_t block) {
  int64_t first = 0;
  for (int64_t a = 0; a < seg.n; ++a) {
    const int64_t begin = seg.offsets[a], end = seg.offsets[a + 1];
    const int64_t tiles = (end - begin + BI - 1) / BI;
    if (block < first + tiles) return {a, begin + (block - first) * BI, end, true};
    first += tiles;
  }
  return {0, 0, 0, false};
}

// An operand with token rows gathered through the sorted slots: element (x, l) at
// data + token(x) · stride_x + l · stride_l (kGatherL false), or data + x · stride_x +
// token(l) · stride_l (kGatherL true), token(p) = order[p] / k. Groups of 4 run along the
// non-gathered dimension, so each group needs one index load. A dropout mask, when on, is drawn
// at (token, the other index): (token, feature) as the reference draws it.
template <typename T, int BX, int BL, bool kGatherL>
struct GatherLoader : tiles::SliceLoader<T, BX, BL, 256> {
  using Slice = tiles::SliceLoader<T, BX, BL, 256>;
  static constexpr bool kAlongL = !kGatherL;
  const Operand op;
  const Problem& pb;
  const Segments& seg;
  const int64_t x0, X;
  const bool masked;

  __device__ __forceinline__ GatherLoader(const Operand& op_, const Problem& pb_, const Segments& seg_,
                                          int64_t x0_, int64_t X_, bool masked_)
      : op(op_), pb(pb_), seg(seg_), x0(x0_), X(X_), masked(masked_) {}

  __device__ __forceinline__ void load(int64_t l0, int64_t l_end) {
    const T* base = static_cast<const T*>(op.data);
    Slice::for_each_group(kAlongL, [&](int it, int x, int l) {
      const int64_t gx = x0 + x, gl = l0 + l;
      const int64_t p = kGatherL ? gl : gx;  // the sorted position this group reads
      const bool row_ok = kGatherL ? p < l_end : p < X;
      const int64_t token = row_ok ? seg.order[p] / seg.slots_per_token : 0;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t ex = gx + (kAlongL ? 0 : e), el = gl + (kAlongL ? e : 0);
        const bool in = ex < X && el < l_end;
        const int64_t other = kGatherL ? ex : el;
        const int64_t off = kGatherL ? ex * op.stride_x + token * op.stride_l : token * op.stride_x + el * op.stride_l;
        float v = in ? tiles::to_float(base[off]) : 0.0f;
        if (masked && in && !tiles::keep(pb, token, other)) v = 0.0f;
        this->v[it][e] = v;
      }
    });
  }
  template <typename TS, int LD>
  __device__ __forceinline__ void store(TS (*S)[LD]) const {
    Slice::store(S, kAlongL);
  }
};

// ---- seg_down: I = sorted positions of one segment, J = R, L = K ----
// The 64-wide rank tile takes one resident block per SM: at tiles::kBlocksPerSm's 128-register cap
// the gathered loader's indices spill (4 bytes, bf16, ptxas sm_90a).
template <class Cfg, typename TP, typename TQ>
__global__ void __launch_bounds__(256, Cfg::BJ > 32 ? 1 : tiles::kBlocksPerSm) seg_down_kernel(const Problem pb, const Segments seg,
                                                                            int64_t stride_a) {
  const SegTile t = seg_tile<Cfg::BI>(seg, blockIdx.x);
  if (!t.valid) return;
  const int64_t rank = seg.ranks[t.adapter];
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * Cfg::BJ;
  Problem p = pb;
  p.I = t.i_end;
  Operand qa = pb.q;
  qa.data = static_cast<const TQ*>(pb.q.data) + t.adapter * stride_a;
  GatherLoader<TP, Cfg::BI, Cfg::BL, false> lp(pb.p, pb, seg, t.i0, t.i_end, pb.mask_on == MaskOn::kP);
  tiles::StridedLoader<TQ, Cfg::BJ, Cfg::BL> lq(qa, pb, j0, rank < pb.J ? rank : pb.J, false, false);
  tiles::product_tile<Cfg, float, tiles::MmaType<TP, TQ>>(p, t.i0, j0, 0, j0 < rank ? pb.L : 0, lp, lq);
}

// ---- seg_expand: I = sorted positions of one segment, J = N, L = rank_a; stores gathered ----
using ExpandTile = tiles::TileConfig<64, 64, 16, 4, 4, true>;

template <typename TA, typename TC>
__global__ void __launch_bounds__(256, tiles::kBlocksPerSm) seg_expand_kernel(const Problem pb, const Segments seg,
                                                                              int64_t stride_b, int64_t phase) {
  using Cfg = ExpandTile;
  const SegTile t = seg_tile<Cfg::BI>(seg, blockIdx.x);
  if (!t.valid) return;
  const int64_t rank = seg.ranks[t.adapter];
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * Cfg::BJ;
  Operand qb = pb.q;
  qb.data = static_cast<const TA*>(pb.q.data) + t.adapter * stride_b;
  tiles::StridedLoader<TA, Cfg::BI, Cfg::BL> lp(pb.p, pb, t.i0, t.i_end, false, true);
  tiles::StridedLoader<TA, Cfg::BJ, Cfg::BL> lq(qb, pb, j0, pb.J, false, false);
  float acc[Cfg::TI][Cfg::TJ];
  tiles::tile_mainloop<Cfg, tiles::MmaType<TA, TA>>(lp, lq, 0, rank, acc);
  const int tj = static_cast<int>(threadIdx.x) % Cfg::kThreadsJ;
  const int ti = static_cast<int>(threadIdx.x) / Cfg::kThreadsJ;
#pragma unroll
  for (int x = 0; x < Cfg::TI; ++x) {
    const int64_t pos = t.i0 + ti * Cfg::TI + x;
    if (pos >= t.i_end) break;
    const int64_t slot = seg.order[pos];
    if (slot % seg.slots_per_token != phase) continue;
    const int64_t token = slot / seg.slots_per_token;
    TC* row = static_cast<TC*>(pb.c) + token * pb.c_stride_i;
#pragma unroll
    for (int y = 0; y < Cfg::TJ; ++y) {
      const int64_t j = j0 + tj * Cfg::TJ + y;
      if (j >= pb.J) break;
      float v = pb.alpha * acc[x][y];
      if (pb.mask_on == MaskOn::kC && !tiles::keep(pb, token, j)) v = 0.0f;
      TC* out = row + j * pb.c_stride_j;
      *out = tiles::from_float<TC>(tiles::to_float(*out) + v);
    }
  }
}

// ---- seg_reduce: per adapter, I = R, J = F, L = that adapter's sorted positions ----
// One resident block per SM: the gathered operand's token offsets beside WideTile's fp32 slices
// spill at tiles::kBlocksPerSm's 128-register cap (ptxas, sm_90a).
template <class Cfg, typename TP, typename TQ>
__global__ void __launch_bounds__(256, 1) seg_reduce_kernel(const Problem pb, const Segments seg,
                                                                              int64_t stride_out) {
  const int64_t adapter = blockIdx.y;
  const int64_t tiles_j = (pb.J + Cfg::BJ - 1) / Cfg::BJ;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) / tiles_j * Cfg::BI;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) % tiles_j * Cfg::BJ;
  const int64_t rank = seg.ranks[adapter];
  const int64_t l_begin = seg.offsets[adapter];
  const int64_t l_end = i0 < rank ? seg.offsets[adapter + 1] : l_begin;
  Problem p = pb;
  p.c = static_cast<float*>(pb.c) + adapter * stride_out;
  tiles::StridedLoader<TP, Cfg::BI, Cfg::BL> lp(pb.p, pb, i0, rank < pb.I ? rank : pb.I, false, true);
  GatherLoader<TQ, Cfg::BJ, Cfg::BL, true> lq(pb.q, pb, seg, j0, pb.J, pb.mask_on == MaskOn::kQ);
  tiles::product_tile<Cfg, float, tiles::MmaType<TP, TQ>>(p, i0, j0, l_begin, l_end, lp, lq);
}

// A per-adapter operand's mode, which the kernels offset by adapter · stride: vector loads only
// if every adapter's slice keeps the base pointer's alignment.
template <typename T>
Operand adapter_operand(const void* data, int64_t stride_x, int64_t stride_l, int64_t stride_adapter) {
  Operand op = tiles::strided_operand<T>(data, stride_x, stride_l);
  if (stride_adapter % 4 != 0) op.mode.vec = false;
  return op;
}

template <typename T>
Operand gathered_operand(const void* data, int64_t stride_x, int64_t stride_l) {
  Operand op = tiles::strided_operand<T>(data, stride_x, stride_l);
  op.mode.vec = false;  // GatherLoader loads element by element
  return op;
}

unsigned seg_blocks(const Segments& seg, int bi) {
  return static_cast<unsigned>((seg.S + bi - 1) / bi + seg.n);
}

}  // namespace

cudaError_t seg_down(DType base, DType adapter, View x, View a, int64_t stride_a, MutView out, int64_t K,
                     int64_t R, float alpha, Dropout drop, const Segments& seg, const Launch& launch) {
  if (seg.S == 0 || seg.n == 0) return cudaSuccess;
  return tiles::dispatch_ranked<tiles::TallTile>(base, adapter, R, [&](auto tb, auto ta, auto cfg) {
    using TB = typename decltype(tb)::type;
    using TA = typename decltype(ta)::type;
    using Cfg = decltype(cfg);
    const Problem pb = tiles::unsplit<float>(seg.S, R, K, gathered_operand<TB>(x.data, x.stride0, x.stride1),
                                      adapter_operand<TA>(a.data, a.stride0, a.stride1, stride_a), out, alpha,
                                      MaskOn::kP, drop);
    const dim3 grid(seg_blocks(seg, Cfg::BI), static_cast<unsigned>((R + Cfg::BJ - 1) / Cfg::BJ));
    seg_down_kernel<Cfg, TB, TA><<<grid, 256, 0, launch.stream>>>(pb, seg, stride_a);
    return cudaGetLastError();
  });
}

cudaError_t seg_expand(DType base, DType adapter, View h, View b, int64_t stride_b, MutView out, int64_t N,
                       int64_t R, float alpha, Dropout drop, const Segments& seg, int64_t phase,
                       const Launch& launch) {
  if (seg.S == 0 || seg.n == 0 || N == 0) return cudaSuccess;
  return tiles::dispatch_base_adapter(base, adapter, [&](auto tb, auto ta) {
    using TB = typename decltype(tb)::type;
    using TA = typename decltype(ta)::type;
    const int64_t tiles_n = (N + ExpandTile::BJ - 1) / ExpandTile::BJ;
    if (tiles_n > 65535) return cudaErrorInvalidConfiguration;
    const Problem pb = tiles::unsplit<TB>(seg.S, N, R, tiles::strided_operand<TA>(h.data, h.stride0, h.stride1),
                                   adapter_operand<TA>(b.data, b.stride0, b.stride1, stride_b), out, alpha,
                                   MaskOn::kC, drop);
    const dim3 grid(seg_blocks(seg, ExpandTile::BI), static_cast<unsigned>(tiles_n));
    seg_expand_kernel<TA, TB><<<grid, 256, 0, launch.stream>>>(pb, seg, stride_b, phase);
    return cudaGetLastError();
  });
}

cudaError_t seg_reduce(DType base, DType adapter, View g, View x, float* out, int64_t F, int64_t R,
                       float alpha, Dropout drop, const Segments& seg, const Launch& launch) {
  if (seg.n == 0 || F == 0) return cudaSuccess;
  if (seg.n > 65535) return cudaErrorInvalidConfiguration;
  return tiles::dispatch_ranked<tiles::WideTile>(base, adapter, R, [&](auto tb, auto ta, auto cfg) {
    using TB = typename decltype(tb)::type;
    using TA = typename decltype(ta)::type;
    using Cfg = decltype(cfg);
    const Problem pb = tiles::unsplit<float>(R, F, seg.S, tiles::strided_operand<TA>(g.data, g.stride1, g.stride0),
                                      gathered_operand<TB>(x.data, x.stride1, x.stride0), MutView{out, F, 1}, alpha,
                                      MaskOn::kQ, drop);
    const int64_t tiles_ij = ((R + Cfg::BI - 1) / Cfg::BI) * ((F + Cfg::BJ - 1) / Cfg::BJ);
    const dim3 grid(static_cast<unsigned>(tiles_ij), static_cast<unsigned>(seg.n));
    seg_reduce_kernel<Cfg, TA, TB><<<grid, 256, 0, launch.stream>>>(pb, seg, R * F);
    return cudaGetLastError();
  });
}

}  // namespace multi_lora
}  // namespace lowrank_kernels
