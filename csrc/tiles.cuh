// Skinny-GEMM tiles shared by the low-rank ops' CUDA kernels (device code; include from .cu only).
//
//     C (I, J) = alpha · [keep ⊙] (P (I, L) · Q (L, J)) + bias (J)
//
// One of I, J, L is the rank (1..256), so these products are far from the shapes cuBLAS is tuned
// for, and they carry what cuBLAS cannot: a dropout mask regenerated from the package RNG
// (rng.cuh) on P, Q or C; operands of different storage types (bf16 activations times fp32
// adapters); any strides; a bias and a scale in the epilogue. Accumulation is fp32 throughout.
// The product runs in its operands' precision (the "mma type" TM of tile_mainloop):
//   - both operands 16-bit (fp16 or bf16): tensor cores (nvcuda::wmma, HMMA on sm_80 and sm_90).
//     Operands formed in fp32 on the way in (scaled or generated basis values, fp32 intermediates
//     such as h) are rounded once to the 16-bit type, as the reference rounds them.
//   - an fp32 operand (fp32 layers, or PEFT's fp32 adapters on a 16-bit base): fp32 FMA on CUDA
//     cores, every operand widened exactly, so the product is IEEE fp32 (never tf32), as cuBLAS
//     would compute it (also on CUDA cores) after an fp32 copy of x that these kernels avoid.
//
// Structure: a block of 256 threads owns a BI × BJ tile of C and walks L in steps of BL. Each
// step's P and Q slices are formed in fp32 (masked and zero-padded at the edges) and stored
// L-major in shared memory in TM. FMA path: each thread reads TI + TJ floats with vector loads and
// does TI · TJ FMAs. MMA path: the 8 warps split the tile into 16 × 16 fragments (MmaLayout) and
// issue one wmma per fragment and 16-deep step; afterwards the fragments are staged through shared
// memory into the same per-thread TI × TJ layout, so the epilogues are shared by both paths. The
// next step's global loads are issued before the current step's math (register prefetch), which
// hides their latency with one tile of shared memory.
// Global loads run along whichever operand dimension is contiguous, 4 elements per load when the
// pointer and strides allow (checked on the host, see operand_mode()).
// When I · J alone gives too few blocks to fill the GPU, L is split: each split writes fp32
// partial sums and reduce_partials_kernel adds them in split order, so results are
// deterministic run to run (no atomics).
//
// Index math is int64 throughout (I · J, offsets); tile counts fit int32 grid dimensions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "rng.cuh"
#include "types.h"

namespace lowrank_kernels {
namespace tiles {

// ---------------------------------------------------------------------------------------------
// Element conversion (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
constexpr bool kIs16 = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;

// The type a product of operands TP and TQ runs in: their 16-bit type when both are (tensor
// cores), else fp32 (CUDA cores, IEEE).
template <typename TP, typename TQ>
using MmaType = typename std::conditional<kIs16<TP> && kIs16<TQ>, TP, float>::type;

// Four consecutive elements at an address aligned to 4 * sizeof(T), widened to fp32.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 f = *reinterpret_cast<const float4*>(p);
  v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
}
__device__ __forceinline__ void load4(const __half* p, float (&v)[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float (&v)[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}

// Four fp32 values narrowed and stored at an address aligned to 4 * sizeof(T).
__device__ __forceinline__ void store4(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(__half* p, const float* v) {
  uint2 u;
  *reinterpret_cast<__half2*>(&u.x) = __floats2half2_rn(v[0], v[1]);
  *reinterpret_cast<__half2*>(&u.y) = __floats2half2_rn(v[2], v[3]);
  *reinterpret_cast<uint2*>(p) = u;
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, const float* v) {
  uint2 u;
  *reinterpret_cast<__nv_bfloat162*>(&u.x) = __floats2bfloat162_rn(v[0], v[1]);
  *reinterpret_cast<__nv_bfloat162*>(&u.y) = __floats2bfloat162_rn(v[2], v[3]);
  *reinterpret_cast<uint2*>(p) = u;
}

// N consecutive floats from 16-byte-aligned (N % 4 == 0) or 8-byte-aligned (N == 2) shared memory.
template <int N>
__device__ __forceinline__ void load_shared(const float* p, float (&v)[N]) {
  static_assert(N == 2 || N % 4 == 0, "thread tiles are 2 or a multiple of 4 wide");
  if constexpr (N == 2) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    v[0] = f.x; v[1] = f.y;
  } else {
#pragma unroll
    for (int k = 0; k < N / 4; ++k) {
      const float4 f = reinterpret_cast<const float4*>(p)[k];
      v[4 * k] = f.x; v[4 * k + 1] = f.y; v[4 * k + 2] = f.z; v[4 * k + 3] = f.w;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Problem description (host fills it, kernels read it by value)
// ---------------------------------------------------------------------------------------------
enum class MaskOn : int { kNone = 0, kP = 1, kQ = 2, kC = 3 };

// How a thread block reads one operand: groups of 4 elements run along L (`along_l`) or along
// the operand's other dimension, and `vec` says a group may be one aligned vector load.
struct OperandMode {
  bool along_l;
  bool vec;
};

// Element (x, l) of an operand lies at data + x * stride_x + l * stride_l, where x is i for P
// and j for Q. Strides are in elements.
struct Operand {
  const void* data;
  int64_t stride_x, stride_l;
  OperandMode mode;
};

struct Problem {
  int64_t I, J, L;
  Operand p, q;
  void* c;                    // (I, J), element (i, j) at c + i * c_stride_i + j * c_stride_j
  int64_t c_stride_i, c_stride_j;
  bool c_vec;                 // rows of C may be written 4 elements per store
  const void* bias;           // (J,) in C's type, or null
  float alpha;
  // Dropout mask over the (row, col) grid of the masked operand: P (i, l), Q (l, j) or C (i, j).
  MaskOn mask_on;
  uint32_t k0, k1, threshold;
  // Split of L: split s covers [s * l_per_split, (s + 1) * l_per_split) ∩ [0, L).
  int splits;
  int64_t l_per_split;
  float* partials;            // (splits, I, J) fp32 when splits > 1
};

__device__ __forceinline__ bool keep(const Problem& pb, int64_t row, int64_t col) {
  return rng::dropout_keep(pb.k0, pb.k1, pb.threshold, static_cast<uint32_t>(row),
                           static_cast<uint32_t>(col));
}

// alpha · [keep ⊙] acc + bias: the epilogue of the tile kernel and of the split reduction alike.
template <typename TC>
__device__ __forceinline__ float epilogue(const Problem& pb, int64_t i, int64_t j, float acc) {
  float v = pb.alpha * acc;
  if (pb.mask_on == MaskOn::kC && !keep(pb, i, j)) v = 0.0f;
  return pb.bias ? v + to_float(static_cast<const TC*>(pb.bias)[j]) : v;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------
// Tile configurations: 256 threads, TI × TJ outputs each.
// ---------------------------------------------------------------------------------------------
// Shared-memory row padding: keeps rows 16-byte aligned and spreads transposed stores over banks.
constexpr int kPad = 4;
// Resident 256-thread blocks per SM: caps registers at 128 per thread (ptxas: no spills on
// sm_90; on sm_80 the 128×128 tile with fp32 inputs and a 16-bit output spills 24 bytes). The
// split planner sizes the grid to one wave of them.
constexpr int kBlocksPerSm = 2;

template <int BI_, int BJ_, int BL_, int TI_, int TJ_, bool kJFastest_>
struct TileConfig {
  static constexpr int BI = BI_, BJ = BJ_, BL = BL_, TI = TI_, TJ = TJ_;
  // Which tile index varies fastest across consecutive blocks: the one whose blocks share the
  // large operand, so it is read from L2 rather than DRAM when several blocks need it.
  static constexpr bool kJFastest = kJFastest_;
  static constexpr int kThreadsJ = BJ / TJ;
  static constexpr int kThreads = (BI / TI) * kThreadsJ;
  static_assert(kThreads == 256, "tile configs use 256 threads");
  static_assert(BI % TI == 0 && BJ % TJ == 0 && BL % 4 == 0 && BI % 4 == 0 && BJ % 4 == 0, "tile shape");
};

// I large, J = the rank (<= BJ), L large: h = x Aᵀ, g = dy B.
template <int BJ> using TallTile = TileConfig<128, BJ, 32, 4, BJ / 8, true>;
// I = the rank, J and L large: dA = gᵀ x, dBᵀ = hᵀ dy.
template <int BI> using WideTile = TileConfig<BI, 128, 32, BI / 8, 4, false>;
// I and J large, L = the rank: h Bᵀ, g A.
using SquareTile = TileConfig<128, 128, 16, 8, 8, true>;

// ---------------------------------------------------------------------------------------------
// One operand's BX × BL slice: global -> registers (widened, masked) -> shared memory S[l][x].
// ---------------------------------------------------------------------------------------------
template <typename T, int BX, int BL, int kThreads>
struct SliceLoader {
  static constexpr int kGroups = BX * BL / 4;
  static constexpr int kIters = (kGroups + kThreads - 1) / kThreads;
  float v[kIters][4];

  // f(it, x, l) for each group of this thread's share of the slice: v[it] holds its 4 elements,
  // (x, l) is its first (see group_origin). Every loader's load and store walk the groups so.
  template <typename F>
  __device__ __forceinline__ static void for_each_group(bool along_l, F&& f) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int g = it * kThreads + static_cast<int>(threadIdx.x);
      if (kGroups % kThreads != 0 && g >= kGroups) break;
      int x, l;
      group_origin(along_l, g, x, l);
      f(it, x, l);
    }
  }

  // Fills v with value(ex, el) at the slice's elements (ex, el) = (x0 + x, l0 + l); elements
  // outside [0, X) × [0, l_end) read as 0 (value is not called there).
  template <typename F>
  __device__ __forceinline__ void fill(bool along_l, int64_t x0, int64_t X, int64_t l0, int64_t l_end, F&& value) {
    const int64_t step_x = along_l ? 0 : 1, step_l = along_l ? 1 : 0;
    for_each_group(along_l, [&](int it, int x, int l) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t ex = x0 + x + e * step_x, el = l0 + l + e * step_l;
        v[it][e] = (ex < X && el < l_end) ? value(ex, el) : 0.0f;
      }
    });
  }

  // Fills v with the slice at (x0, l0); `masked` applies the dropout mask with (row, col) =
  // (x, l) when `mask_x_is_row`, else (l, x). Elements outside [0, X) × [0, l_end) read as 0.
  __device__ __forceinline__ void load(const Operand& op, const Problem& pb, int64_t x0, int64_t X,
                                       int64_t l0, int64_t l_end, bool masked, bool mask_x_is_row) {
    const T* base = static_cast<const T*>(op.data);
    for_each_group(op.mode.along_l, [&](int it, int x, int l) {
      const int64_t gx = x0 + x, gl = l0 + l;
      const int64_t step_x = op.mode.along_l ? 0 : 1, step_l = op.mode.along_l ? 1 : 0;
      const bool full = (gx + 3 * step_x < X) && (gl + 3 * step_l < l_end);
      if (op.mode.vec && full) {
        load4(base + gx * op.stride_x + gl * op.stride_l, v[it]);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t ex = gx + e * step_x, el = gl + e * step_l;
          v[it][e] = (ex < X && el < l_end) ? to_float(base[ex * op.stride_x + el * op.stride_l]) : 0.0f;
        }
      }
      if (masked) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t ex = gx + e * step_x, el = gl + e * step_l;
          if (!(mask_x_is_row ? keep(pb, ex, el) : keep(pb, el, ex))) v[it][e] = 0.0f;
        }
      }
    });
  }

  // Writes the slice to S[l][x] in the shared-memory type TS (fp32, or the 16-bit mma type).
  template <typename TS, int LD>
  __device__ __forceinline__ void store(TS (*S)[LD], bool along_l) const {
    for_each_group(along_l, [&](int it, int x, int l) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (along_l) S[l + e][x] = from_float<TS>(v[it][e]);
        else S[l][x + e] = from_float<TS>(v[it][e]);
      }
    });
  }

  // Group g's first element: consecutive groups (threads) are adjacent in memory.
  __device__ __forceinline__ static void group_origin(bool along_l, int g, int& x, int& l) {
    if (along_l) {
      l = (g % (BL / 4)) * 4;
      x = g / (BL / 4);
    } else {
      x = (g % (BX / 4)) * 4;
      l = g / (BX / 4);
    }
  }
};

// C = epilogue(Σ_s partials[s]) with s in increasing order, one thread per element.
template <typename TC>
__global__ void __launch_bounds__(256) reduce_partials_kernel(const Problem pb) {
  const int64_t n = pb.I * pb.J;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    float s = 0.0f;
    for (int z = 0; z < pb.splits; ++z) s += pb.partials[z * n + e];
    const int64_t i = e / pb.J, j = e % pb.J;
    static_cast<TC*>(pb.c)[i * pb.c_stride_i + j * pb.c_stride_j] = from_float<TC>(epilogue<TC>(pb, i, j, s));
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: read modes, split plan, launch
// ---------------------------------------------------------------------------------------------
// Groups run along the contiguous dimension; a group is one vector load when that stride is 1,
// the other stride keeps every row 4-element aligned, and the base pointer is aligned.
inline OperandMode operand_mode(const void* data, size_t elem_size, int64_t stride_x, int64_t stride_l) {
  const bool along_l = stride_l == 1 || stride_x != 1;
  const int64_t unit = along_l ? stride_l : stride_x;
  const int64_t other = along_l ? stride_x : stride_l;
  const bool vec = unit == 1 && other % 4 == 0 && reinterpret_cast<uintptr_t>(data) % (4 * elem_size) == 0;
  return {along_l, vec};
}

// gridDim.y limit, the split axis.
constexpr int64_t kMaxSplits = 65535;

// Splits of L so that tiles × splits fills the GPU; each split a whole number of BL steps.
template <class Cfg>
void plan_splits(Problem& pb, int num_sms) {
  const int64_t tiles = ((pb.I + Cfg::BI - 1) / Cfg::BI) * ((pb.J + Cfg::BJ - 1) / Cfg::BJ);
  const int64_t l_steps = std::max<int64_t>(1, (pb.L + Cfg::BL - 1) / Cfg::BL);
  const int64_t target = static_cast<int64_t>(kBlocksPerSm) * std::max(num_sms, 1);
  int64_t splits = std::min({(target + tiles - 1) / tiles, l_steps, kMaxSplits});
  const int64_t steps_per_split = (l_steps + splits - 1) / splits;
  pb.l_per_split = steps_per_split * Cfg::BL;
  pb.splits = static_cast<int>((l_steps + steps_per_split - 1) / steps_per_split);
}

inline int64_t workspace_floats(const Problem& pb) {
  return pb.splits > 1 ? static_cast<int64_t>(pb.splits) * pb.I * pb.J : 0;
}

// ---------------------------------------------------------------------------------------------
// Building blocks for tile kernels with other operands or epilogues than skinny_gemm_kernel's
// ---------------------------------------------------------------------------------------------
// skinny_gemm_kernel multiplies two strided matrices and stores C. A kernel whose operand is
// something else (e.g. a random basis generated from the RNG and scaled as it is loaded,
// csrc/random_basis.cu) or whose epilogue reduces instead of storing is assembled from the same
// steps, in the same tile configurations:
//   tile_coords    the BI × BJ tile and the L range (split) a block owns;
//   tile_mainloop  the register-prefetched shared-memory loop, with loaders supplied by the caller
//                  (fma_mainloop, or mma_mainloop and its fragments staged to the thread layout);
//   tile_store     the epilogue, or the split partials (tile_store_mma: the same from fragments);
//   launch_tiles   the tiles × splits grid of a planned problem, then the split reduction.
// A loader has load(l0, l_end), which reads its BX × BL slice at l0 into registers (widened to
// fp32, zero outside the problem and from l_end on), and store(S), which writes them to S[l][x]
// (S of any element type and row length: fp32 for the FMA path, the 16-bit type for the MMA path).

// A type as a value, for dispatching on runtime dtypes.
template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<base>{}, Tag<adapter>{}) for the dtype pairs the ops support: the adapter (or a
// sparse op's values) shares the base dtype or is fp32.
template <typename F>
cudaError_t dispatch_base_adapter(DType base, DType adapter, F&& f) {
  if (adapter == DType::kFloat32) {
    switch (base) {
      case DType::kFloat32: return f(Tag<float>{}, Tag<float>{});
      case DType::kFloat16: return f(Tag<__half>{}, Tag<float>{});
      case DType::kBFloat16: return f(Tag<__nv_bfloat16>{}, Tag<float>{});
    }
  } else if (adapter == base) {
    switch (base) {
      case DType::kFloat16: return f(Tag<__half>{}, Tag<__half>{});
      case DType::kBFloat16: return f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      default: break;
    }
  }
  return cudaErrorNotSupported;
}

// f(Tile<rank>{}) with the rank tile of a product over rank R: the smallest of 16, 32, 64 that
// holds R (larger R take several tiles).
template <template <int> class Tile, typename F>
decltype(auto) rank_tile(int64_t R, F&& f) {
  if (R <= 16) return f(Tile<16>{});
  if (R <= 32) return f(Tile<32>{});
  return f(Tile<64>{});
}

// f(Tag<base>{}, Tag<adapter>{}, Tile<rank>{}): dispatch_base_adapter, then rank_tile.
template <template <int> class Tile, typename F>
cudaError_t dispatch_ranked(DType base, DType adapter, int64_t R, F&& f) {
  return dispatch_base_adapter(base, adapter, [&](auto tb, auto ta) {
    return rank_tile<Tile>(R, [&](auto cfg) { return f(tb, ta, cfg); });
  });
}

// An I × J × L problem with its split of L planned for tile Cfg; the caller sets the rest.
template <class Cfg>
Problem planned(int64_t I, int64_t J, int64_t L, int num_sms) {
  Problem pb{};
  pb.I = I;
  pb.J = J;
  pb.L = L;
  plan_splits<Cfg>(pb, num_sms);
  return pb;
}

// A strided operand of element type T, with the read mode its pointer and strides allow.
template <typename T>
Operand strided_operand(const void* data, int64_t stride_x, int64_t stride_l) {
  return {data, stride_x, stride_l, operand_mode(data, sizeof(T), stride_x, stride_l)};
}

// C of element type TC: element (i, j) at data + i * stride_i + j * stride_j.
template <typename TC>
void set_output(Problem& pb, void* data, int64_t stride_i, int64_t stride_j) {
  pb.c = data;
  pb.c_stride_i = stride_i;
  pb.c_stride_j = stride_j;
  pb.c_vec = stride_j == 1 && stride_i % 4 == 0 && reinterpret_cast<uintptr_t>(data) % (4 * sizeof(TC)) == 0;
}

// A dropout mask on `where`; threshold 0 keeps every element, so no mask is drawn.
inline void set_mask(Problem& pb, MaskOn where, uint32_t k0, uint32_t k1, uint32_t threshold) {
  pb.mask_on = threshold > 0 ? where : MaskOn::kNone;
  pb.k0 = k0;
  pb.k1 = k1;
  pb.threshold = threshold;
}

// An I × J × L problem with L unsplit (each block covers all of it): C = alpha · [keep ⊙] (P Q)
// into `out` of TC, the mask on `mask_on`.
template <typename TC>
Problem unsplit(int64_t I, int64_t J, int64_t L, Operand p, Operand q, MutView out, float alpha, MaskOn mask_on,
                Dropout drop) {
  Problem pb{};
  pb.I = I;
  pb.J = J;
  pb.L = L;
  pb.splits = 1;
  pb.l_per_split = L;
  pb.p = p;
  pb.q = q;
  set_output<TC>(pb, out.data, out.stride0, out.stride1);
  pb.alpha = alpha;
  set_mask(pb, mask_on, drop.k0, drop.k1, drop.threshold);
  return pb;
}

struct TileCoords {
  int64_t i0, j0, l_begin, l_end;
};

// The tile (blockIdx.x, ordered as skinny_gemm_kernel orders them) and the split (blockIdx.y).
template <class Cfg>
__device__ __forceinline__ TileCoords tile_coords(const Problem& pb) {
  const int64_t tiles_i = (pb.I + Cfg::BI - 1) / Cfg::BI, tiles_j = (pb.J + Cfg::BJ - 1) / Cfg::BJ;
  const int64_t tile = blockIdx.x;
  TileCoords c;
  c.i0 = (Cfg::kJFastest ? tile / tiles_j : tile % tiles_i) * Cfg::BI;
  c.j0 = (Cfg::kJFastest ? tile % tiles_j : tile / tiles_i) * Cfg::BJ;
  c.l_begin = static_cast<int64_t>(blockIdx.y) * pb.l_per_split;
  c.l_end = min64(pb.L, c.l_begin + pb.l_per_split);
  return c;
}

// A strided matrix as a loader: SliceLoader with its operand, tile origin x0 (of X rows) and
// dropout mask bound; the mask's (row, col) is (x, l) when mask_x_is_row, else (l, x).
template <typename T, int BX, int BL>
struct StridedLoader : SliceLoader<T, BX, BL, 256> {
  using Slice = SliceLoader<T, BX, BL, 256>;
  const Operand op;  // by value: a reference into the kernel's parameter costs sm_80 registers
  const Problem& pb;
  const int64_t x0, X;
  const bool masked, mask_x_is_row;

  __device__ __forceinline__ StridedLoader(const Operand& op_, const Problem& pb_, int64_t x0_, int64_t X_,
                                           bool masked_, bool mask_x_is_row_)
      : op(op_), pb(pb_), x0(x0_), X(X_), masked(masked_), mask_x_is_row(mask_x_is_row_) {}
  __device__ __forceinline__ void load(int64_t l0, int64_t l_end) {
    Slice::load(op, pb, x0, X, l0, l_end, masked, mask_x_is_row);
  }
  template <typename TS, int LD>
  __device__ __forceinline__ void store(TS (*S)[LD]) const {
    Slice::store(S, op.mode.along_l);
  }
};

// The register-prefetched loop of both mainloops: lp's and lq's slices at l_begin are stored to
// Ps and Qs; then, per BL step, the next step's global loads are issued, step() computes on the
// stored slices, and the prefetched slices replace them. Nothing runs on an empty range (uniform
// over the block, so every thread meets every barrier).
template <int BL, class LP, class LQ, class SP, class SQ, class Step>
__device__ __forceinline__ void staged_loop(LP& lp, LQ& lq, SP Ps, SQ Qs, int64_t l_begin, int64_t l_end,
                                            Step&& step) {
  if (l_begin >= l_end) return;
  lp.load(l_begin, l_end);
  lq.load(l_begin, l_end);
  lp.store(Ps);
  lq.store(Qs);
  __syncthreads();
  for (int64_t l0 = l_begin; l0 < l_end; l0 += BL) {
    const bool more = l0 + BL < l_end;
    if (more) {
      lp.load(l0 + BL, l_end);
      lq.load(l0 + BL, l_end);
    }
    step();
    __syncthreads();
    if (more) {
      lp.store(Ps);
      lq.store(Qs);
      __syncthreads();
    }
  }
}

// acc = this thread's TI × TJ outputs of Σ_{l in [l_begin, l_end)} P(i, l) Q(l, j) over the block's
// tile, in fp32 FMA, with P's BI × BL slices from lp and Q's BJ × BL slices from lq (zero when the
// range is empty).
template <class Cfg, class LP, class LQ>
__device__ __forceinline__ void fma_mainloop(LP& lp, LQ& lq, int64_t l_begin, int64_t l_end,
                                             float (&acc)[Cfg::TI][Cfg::TJ]) {
  constexpr int BI = Cfg::BI, BJ = Cfg::BJ, BL = Cfg::BL, TI = Cfg::TI, TJ = Cfg::TJ;
  __shared__ __align__(16) float Ps[BL][BI + kPad];
  __shared__ __align__(16) float Qs[BL][BJ + kPad];
  const int tj = static_cast<int>(threadIdx.x) % Cfg::kThreadsJ;
  const int ti = static_cast<int>(threadIdx.x) / Cfg::kThreadsJ;
#pragma unroll
  for (int a = 0; a < TI; ++a)
#pragma unroll
    for (int b = 0; b < TJ; ++b) acc[a][b] = 0.0f;
  staged_loop<BL>(lp, lq, Ps, Qs, l_begin, l_end, [&] {
#pragma unroll
    for (int l = 0; l < BL; ++l) {
      float a[TI], b[TJ];
      load_shared<TI>(&Ps[l][ti * TI], a);
      load_shared<TJ>(&Qs[l][tj * TJ], b);
#pragma unroll
      for (int x = 0; x < TI; ++x)
#pragma unroll
        for (int y = 0; y < TJ; ++y) acc[x][y] = fmaf(a[x], b[y], acc[x][y]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path (16-bit products)
// ---------------------------------------------------------------------------------------------
// The 8 warps of a block split its BI × BJ tile into a WI × WJ grid, each warp holding PI × PJ
// fp32 accumulator fragments of 16 × 16. Shared-memory rows are padded by 8 elements (16 bytes),
// which keeps every fragment pointer 32-byte aligned and ldm a multiple of 8, as wmma requires.
template <class Cfg>
struct MmaLayout {
  static constexpr int FI = Cfg::BI / 16, FJ = Cfg::BJ / 16;
  static constexpr int WI = FI < 8 ? FI : 8, WJ = 8 / WI;
  static constexpr int PI = FI / WI, PJ = FJ / WJ;
  static constexpr int LDP = Cfg::BI + 8, LDQ = Cfg::BJ + 8;
  static_assert(Cfg::BI % 16 == 0 && Cfg::BJ % 16 == 0 && Cfg::BL % 16 == 0, "mma tiles are 16-aligned");
  static_assert(8 % WI == 0 && FI % WI == 0 && FJ % WJ == 0, "8 warps cover the fragment grid");
};

template <class Cfg>
struct MmaAcc {
  using L = MmaLayout<Cfg>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[L::PI][L::PJ];
  // This warp's fragment (a, b) covers rows row(a) .. row(a) + 15 and columns col(b) .. col(b) + 15.
  __device__ __forceinline__ static int warp() { return static_cast<int>(threadIdx.x) / 32; }
  __device__ __forceinline__ static int row(int a) { return (warp() / L::WJ * L::PI + a) * 16; }
  __device__ __forceinline__ static int col(int b) { return (warp() % L::WJ * L::PJ + b) * 16; }
};

// c = Σ_{l in [l_begin, l_end)} P(i, l) Q(l, j) over the block's tile on tensor cores, the operands
// rounded to TM (16-bit) as they are stored to shared memory; zero when the range is empty.
template <class Cfg, typename TM, class LP, class LQ>
__device__ __forceinline__ void mma_mainloop(LP& lp, LQ& lq, int64_t l_begin, int64_t l_end, MmaAcc<Cfg>& acc) {
  namespace wmma = nvcuda::wmma;
  using L = MmaLayout<Cfg>;
  constexpr int BL = Cfg::BL;
  __shared__ __align__(32) TM Ps[BL][L::LDP];
  __shared__ __align__(32) TM Qs[BL][L::LDQ];
#pragma unroll
  for (int a = 0; a < L::PI; ++a)
#pragma unroll
    for (int b = 0; b < L::PJ; ++b) wmma::fill_fragment(acc.c[a][b], 0.0f);
  staged_loop<BL>(lp, lq, Ps, Qs, l_begin, l_end, [&] {
#pragma unroll
    for (int k = 0; k < BL; k += 16) {
      // P (i, l) sits at Ps[l][i]: a column-major A; Q (l, j) at Qs[l][j]: a row-major B.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, TM, wmma::col_major> fa[L::PI];
#pragma unroll
      for (int a = 0; a < L::PI; ++a) wmma::load_matrix_sync(fa[a], &Ps[k][MmaAcc<Cfg>::row(a)], L::LDP);
#pragma unroll
      for (int b = 0; b < L::PJ; ++b) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TM, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, &Qs[k][MmaAcc<Cfg>::col(b)], L::LDQ);
#pragma unroll
        for (int a = 0; a < L::PI; ++a) wmma::mma_sync(acc.c[a][b], fa[a], fb, acc.c[a][b]);
      }
    }
  });
}

// The fragments in the FMA path's per-thread layout (acc[x][y] = C(ti·TI + x, tj·TJ + y)), through
// one shared-memory copy of the tile: for epilogues that work on each thread's outputs. Small
// tiles only: the tile and the thread's outputs are live at once.
template <class Cfg>
__device__ __forceinline__ void mma_to_thread_layout(const MmaAcc<Cfg>& m, float (&acc)[Cfg::TI][Cfg::TJ]) {
  using L = MmaLayout<Cfg>;
  constexpr int LDC = Cfg::BJ + 4;
  static_assert(Cfg::BI * LDC * 4 <= 20 * 1024 && Cfg::TI * Cfg::TJ <= 16, "a small tile");
  __shared__ __align__(32) float C[Cfg::BI][LDC];
#pragma unroll
  for (int a = 0; a < L::PI; ++a)
#pragma unroll
    for (int b = 0; b < L::PJ; ++b)
      nvcuda::wmma::store_matrix_sync(&C[MmaAcc<Cfg>::row(a)][MmaAcc<Cfg>::col(b)], m.c[a][b], LDC,
                                      nvcuda::wmma::mem_row_major);
  __syncthreads();
  const int tj = static_cast<int>(threadIdx.x) % Cfg::kThreadsJ;
  const int ti = static_cast<int>(threadIdx.x) / Cfg::kThreadsJ;
#pragma unroll
  for (int x = 0; x < Cfg::TI; ++x)
#pragma unroll
    for (int y = 0; y < Cfg::TJ; ++y) acc[x][y] = C[ti * Cfg::TI + x][tj * Cfg::TJ + y];
}

// acc = this thread's TI × TJ outputs of the tile's product (see fma_mainloop), in fp32 FMA
// (TM = float) or on tensor cores (TM 16-bit, then staged into the same layout).
template <class Cfg, typename TM = float, class LP, class LQ>
__device__ __forceinline__ void tile_mainloop(LP& lp, LQ& lq, int64_t l_begin, int64_t l_end,
                                              float (&acc)[Cfg::TI][Cfg::TJ]) {
  if constexpr (kIs16<TM>) {
    MmaAcc<Cfg> m;
    mma_mainloop<Cfg, TM>(lp, lq, l_begin, l_end, m);
    mma_to_thread_layout<Cfg>(m, acc);
  } else {
    fma_mainloop<Cfg>(lp, lq, l_begin, l_end, acc);
  }
}

// Writes this thread's outputs of the tile at (i0, j0): to the split's fp32 partials when
// pb.splits > 1 (reduce_partials_kernel finishes them), else through epilogue<TC> into C.
template <class Cfg, typename TC>
__device__ __forceinline__ void tile_store(const Problem& pb, int64_t i0, int64_t j0,
                                           const float (&acc)[Cfg::TI][Cfg::TJ]) {
  constexpr int TI = Cfg::TI, TJ = Cfg::TJ;
  const int tj = static_cast<int>(threadIdx.x) % Cfg::kThreadsJ;
  const int ti = static_cast<int>(threadIdx.x) / Cfg::kThreadsJ;
  const int64_t jt = j0 + tj * TJ;
#pragma unroll
  for (int x = 0; x < TI; ++x) {
    const int64_t i = i0 + ti * TI + x;
    if (i >= pb.I) break;
    if (pb.splits > 1) {
      float* out = pb.partials + (static_cast<int64_t>(blockIdx.y) * pb.I + i) * pb.J;
#pragma unroll
      for (int y = 0; y < TJ; ++y)
        if (jt + y < pb.J) out[jt + y] = acc[x][y];
      continue;
    }
    TC* out = static_cast<TC*>(pb.c) + i * pb.c_stride_i;
#pragma unroll
    for (int y = 0; y < TJ; y += 4) {
      // Four columns at a time keeps few values live (the 128×128 tile is at 128 registers).
      constexpr int kW = TJ < 4 ? TJ : 4;
      float v[4];
#pragma unroll
      for (int e = 0; e < kW; ++e) {
        const int64_t j = min64(jt + y + e, pb.J - 1);  // clamped lanes are computed, never stored
        v[e] = epilogue<TC>(pb, i, j, acc[x][y + e]);
      }
      if (kW == 4 && pb.c_vec && jt + y + 3 < pb.J) {
        store4(out + jt + y, v);
      } else {
#pragma unroll
        for (int e = 0; e < kW; ++e)
          if (jt + y + e < pb.J) out[(jt + y + e) * pb.c_stride_j] = from_float<TC>(v[e]);
      }
    }
  }
}

// Each warp passes its fragments of the tile at (i0, j0) one at a time through a 16 × 16
// shared-memory buffer of its own; each lane then calls f(i, jt, v) for the 8 consecutive outputs
// v[0..7] of row i < I from column jt that it finishes (columns past the problem's are in v too).
template <class Cfg, typename F>
__device__ __forceinline__ void for_each_fragment_row(const MmaAcc<Cfg>& m, int64_t i0, int64_t j0, int64_t I,
                                                      F&& f) {
  using L = MmaLayout<Cfg>;
  constexpr int LDB = 20;
  __shared__ __align__(32) float buf[8][16][LDB];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int r = lane / 2, c0 = (lane % 2) * 8;
#pragma unroll
  for (int a = 0; a < L::PI; ++a)
#pragma unroll
    for (int b = 0; b < L::PJ; ++b) {
      nvcuda::wmma::store_matrix_sync(&buf[warp][0][0], m.c[a][b], LDB, nvcuda::wmma::mem_row_major);
      __syncwarp();
      const int64_t i = i0 + MmaAcc<Cfg>::row(a) + r;
      if (i < I) f(i, j0 + MmaAcc<Cfg>::col(b) + c0, &buf[warp][r][c0]);
      __syncwarp();
    }
}

// tile_store for the tensor-core path, fragment by fragment (for_each_fragment_row). The
// fragments never go through the per-thread layout, which for the 128 × 128 tile would hold 64
// accumulators twice.
template <class Cfg, typename TC>
__device__ __forceinline__ void tile_store_mma(const Problem& pb, int64_t i0, int64_t j0, const MmaAcc<Cfg>& m) {
  for_each_fragment_row<Cfg>(m, i0, j0, pb.I, [&](int64_t i, int64_t jt, const float* buf) {
    if (pb.splits > 1) {
      float* out = pb.partials + (static_cast<int64_t>(blockIdx.y) * pb.I + i) * pb.J;
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (jt + e < pb.J) out[jt + e] = buf[e];
      return;
    }
    TC* out = static_cast<TC*>(pb.c) + i * pb.c_stride_i;
#pragma unroll
    for (int y = 0; y < 8; y += 4) {
      float v[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t j = min64(jt + y + e, pb.J - 1);  // clamped lanes are computed, never stored
        v[e] = epilogue<TC>(pb, i, j, buf[y + e]);
      }
      if (pb.c_vec && jt + y + 3 < pb.J) {
        store4(out + jt + y, v);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (jt + y + e < pb.J) out[(jt + y + e) * pb.c_stride_j] = from_float<TC>(v[e]);
      }
    }
  });
}

// The tile's product over [l_begin, l_end) stored at (i0, j0): on tensor cores when the mma type
// TM is 16-bit (mma_mainloop, tile_store_mma), else in fp32 FMA (fma_mainloop, tile_store).
template <class Cfg, typename TC, typename TM, class LP, class LQ>
__device__ __forceinline__ void product_tile(const Problem& pb, int64_t i0, int64_t j0, int64_t l_begin,
                                             int64_t l_end, LP& lp, LQ& lq) {
  if constexpr (kIs16<TM>) {
    MmaAcc<Cfg> m;
    mma_mainloop<Cfg, TM>(lp, lq, l_begin, l_end, m);
    tile_store_mma<Cfg, TC>(pb, i0, j0, m);
  } else {
    float acc[Cfg::TI][Cfg::TJ];
    fma_mainloop<Cfg>(lp, lq, l_begin, l_end, acc);
    tile_store<Cfg, TC>(pb, i0, j0, acc);
  }
}

// Launches kernel(pb, args...) on the tiles × splits of a problem planned for Cfg (256 threads a
// block), then reduce_partials_kernel<TC> when L is split; pb.partials must hold
// workspace_floats(pb).
template <class Cfg, typename TC, typename... KernelArgs, typename... Args>
cudaError_t launch_tiles(void (*kernel)(Problem, KernelArgs...), const Problem& pb, int num_sms,
                         cudaStream_t stream, Args&&... args) {
  if (pb.I == 0 || pb.J == 0) return cudaSuccess;
  const int64_t tiles = ((pb.I + Cfg::BI - 1) / Cfg::BI) * ((pb.J + Cfg::BJ - 1) / Cfg::BJ);
  if (tiles > INT32_MAX) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(pb.splits)), Cfg::kThreads, 0, stream>>>(
      pb, std::forward<Args>(args)...);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || pb.splits == 1) return err;
  const int64_t blocks = std::min<int64_t>((pb.I * pb.J + 255) / 256, 8LL * std::max(num_sms, 1));
  reduce_partials_kernel<TC><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(pb);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// The strided product: C = alpha · [keep ⊙] (P Q) + bias for strided P and Q
// ---------------------------------------------------------------------------------------------
template <class Cfg, typename TP, typename TQ, typename TC>
__global__ void __launch_bounds__(256, kBlocksPerSm) skinny_gemm_kernel(const Problem pb) {
  const TileCoords t = tile_coords<Cfg>(pb);
  StridedLoader<TP, Cfg::BI, Cfg::BL> lp(pb.p, pb, t.i0, pb.I, pb.mask_on == MaskOn::kP, true);
  StridedLoader<TQ, Cfg::BJ, Cfg::BL> lq(pb.q, pb, t.j0, pb.J, pb.mask_on == MaskOn::kQ, false);
  product_tile<Cfg, TC, MmaType<TP, TQ>>(pb, t.i0, t.j0, t.l_begin, t.l_end, lp, lq);
}

// Launches the product planned by plan_splits<Cfg>; pb.partials must hold workspace_floats(pb).
template <class Cfg, typename TP, typename TQ, typename TC>
cudaError_t launch(const Problem& pb, int num_sms, cudaStream_t stream) {
  return launch_tiles<Cfg, TC>(skinny_gemm_kernel<Cfg, TP, TQ, TC>, pb, num_sms, stream);
}

}  // namespace tiles
}  // namespace lowrank_kernels
