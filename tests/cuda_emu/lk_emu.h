// Host emulation of the CUDA subset that csrc/*.cu uses, so the torch-free kernels compile with g++
// and run on the CPU, one OS thread per CUDA thread (tests/test_cuda_emulation.py).
//
// - Blocks of a launch run one after another; the block's threads run concurrently, so
//   __shared__ variables can be static storage (the build helper rewrites `extern __shared__`
//   arrays to the launch's dynamic buffer, and `k<<<g, b, s, st>>>(args)` to a Launch call).
// - __syncthreads and __syncwarp are barriers over the threads that have not yet returned, as on
//   the GPU, where exited threads no longer count at a barrier.
// - Warp shuffles go through a per-warp exchange buffer between two warp barriers.
// - nvcuda::wmma fragments hold the whole 16 x 16 tile in every lane; loads check the alignment
//   and ldm rules of the real API (a violation aborts with a message), mma_sync accumulates in
//   fp32, stores are done by lane 0.
// - __half and __nv_bfloat16 are 16-bit storage types with round-to-nearest-even conversions.
#pragma once

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// ---- runtime types ----
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNotSupported = 801,
};
typedef struct lk_emu_stream* cudaStream_t;
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace lk_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "lk_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

inline thread_local cudaError_t last_error = cudaSuccess;

// A barrier over `active` threads; a thread that leaves stops counting (an exited CUDA thread).
class Barrier {
 public:
  void reset(int n) {
    std::lock_guard<std::mutex> lk(m_);
    active_ = n;
    arrived_ = 0;
  }
  void sync() {
    std::unique_lock<std::mutex> lk(m_);
    const uint64_t gen = gen_;
    if (++arrived_ >= active_) {
      release();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
  }
  void leave() {
    std::lock_guard<std::mutex> lk(m_);
    --active_;
    if (arrived_ > 0 && arrived_ >= active_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int active_ = 0, arrived_ = 0;
  uint64_t gen_ = 0;
};

struct BlockContext {
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<uint64_t> exchange;  // 32 slots per warp for shuffles
  std::vector<unsigned char> dynamic_smem;
  int threads = 0;
};

inline thread_local BlockContext* ctx = nullptr;

inline int linear_tid() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}
inline int lane() { return linear_tid() % 32; }
inline int warp_id() { return linear_tid() / 32; }

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(ctx->dynamic_smem.data());
}

inline void syncthreads() { ctx->block.sync(); }
inline void syncwarp() { ctx->warps[warp_id()].sync(); }

template <typename T>
T shuffle(T v, int src_of_lane(int, int), int arg) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int w = warp_id(), l = lane();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  ctx->exchange[w * 32 + l] = bits;
  syncwarp();
  int src = src_of_lane(l, arg);
  if (src < 0 || src >= 32) src = l;
  T out;
  const uint64_t got = ctx->exchange[w * 32 + src];
  std::memcpy(&out, &got, sizeof(T));
  syncwarp();
  return out;
}

// One launch: every block in turn, blockDim threads each (OS threads), a barrier between blocks.
struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}

  template <class F>
  void exec(F&& body) const {
    const int threads = static_cast<int>(block.x * block.y * block.z);
    if (threads < 1 || threads > 1024 || grid.y > 65535 || grid.z > 65535 || grid.x < 1 || grid.y < 1 ||
        grid.z < 1 || smem > 48 * 1024) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    last_error = cudaSuccess;
    BlockContext bc;
    bc.threads = threads;
    bc.warps = std::vector<Barrier>((threads + 31) / 32);
    bc.exchange.assign(32 * bc.warps.size(), 0);
    bc.dynamic_smem.assign(smem + 64, 0);
    Barrier between;  // all threads finish block b before any starts block b + 1
    between.reset(threads);
    auto reset = [&] {
      bc.block.reset(threads);
      for (size_t w = 0; w < bc.warps.size(); ++w)
        bc.warps[w].reset(std::min<int>(32, threads - static_cast<int>(w) * 32));
    };
    reset();
    const dim3 grid_ = grid, block_ = block;
    auto worker = [&, grid_, block_](int t) {
      ctx = &bc;
      blockDim = block_;
      gridDim = grid_;
      threadIdx = {t % block_.x, (t / block_.x) % block_.y, t / (block_.x * block_.y)};
      for (unsigned bz = 0; bz < grid_.z; ++bz)
        for (unsigned by = 0; by < grid_.y; ++by)
          for (unsigned bx = 0; bx < grid_.x; ++bx) {
            blockIdx = {bx, by, bz};
            body();
            bc.block.leave();
            bc.warps[t / 32].leave();
            between.sync();
            if (t == 0) reset();
            between.sync();
          }
      ctx = nullptr;
    };
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) pool.emplace_back(worker, t);
    for (auto& th : pool) th.join();
  }

  template <class K>
  auto run(K kernel) const {
    const Launch self = *this;
    return [self, kernel](auto&&... args) { self.exec([&] { kernel(args...); }); };
  }
};

}  // namespace lk_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = lk_emu::last_error;
  lk_emu::last_error = cudaSuccess;
  return e;
}

inline void __syncthreads() { lk_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { lk_emu::syncwarp(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
  return lk_emu::shuffle<T>(v, [](int l, int m) { return l ^ m; }, mask);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, int delta, int = 32) {
  return lk_emu::shuffle<T>(v, [](int l, int d) { return l + d; }, delta);
}

inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
// Rounded (never fused) products and sums: what the host's IEEE float arithmetic gives.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
// Read-only cached load: a plain load on the host.
template <typename T>
T __ldg(const T* p) { return *p; }

// ---- 16-bit types ----
struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    b.bits = static_cast<uint16_t>(u >> 16);
  }
  return b;
}
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

// ---- nvcuda::wmma (16 x 16 x 16 only) ----
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation covers 16 x 16 x 16 fragments");
  float v[16][16];  // (row, col) of the fragment's matrix, in every lane
};

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
void check_pointer(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) lk_emu::fail((std::string(what) + ": pointer not 256-bit aligned").c_str());
  if (ldm % (16 / sizeof(T)) != 0) lk_emu::fail((std::string(what) + ": ldm not a multiple of 16 bytes").c_str());
}

template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same<Use, matrix_a>::value || std::is_same<Use, matrix_b>::value, "a or b");
  check_pointer(p, ldm, "load_matrix_sync");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = to_f(std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
}

template <class T>
void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, T x) {
  for (auto& row : f.v)
    for (float& e : row) e = static_cast<float>(x);
}

template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s = std::fma(a.v[i][k], b.v[k][j], s);
      out[i][j] = s;
    }
  std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  check_pointer(p, ldm, "store_matrix_sync");
  if (lk_emu::lane() != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
}
}  // namespace wmma
}  // namespace nvcuda
