// The package's one counter-based RNG, bit-identical to lowrank_kernels/ops/_rng.py.
//
// Every draw is a pure function of (k0, k1, row, col) in 32-bit unsigned arithmetic:
//     h = mix32(k0 ^ mix32(row + mix32(col ^ k1)))        (all mod 2^32)
// with mix32 the "lowbias32" finaliser. (k0, k1) = (seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF)
// come from the Python side (ops/_rng.py split_seed); rows and columns are taken mod 2^32, as the
// reference and the Triton kernels do. Maps from h, all exact:
//     dropout keep:  (h >> 8) >= threshold          threshold = round(p * 2^24)
//     uniform:       (h >> 8) * 2^-24               in [0, 1), exact in fp32
//     sign:          1 - 2 * (h >> 31)              +1 or -1
// The functions are host and device so host code and tests can produce the same draws.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LOWRANK_HD __host__ __device__ __forceinline__
#else
#define LOWRANK_HD inline
#endif

namespace lowrank_kernels {
namespace rng {

LOWRANK_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// row and col are reduced mod 2^32 by the caller's cast, matching `& 0xFFFFFFFF` in the reference.
LOWRANK_HD uint32_t hash32(uint32_t k0, uint32_t k1, uint32_t row, uint32_t col) {
  return mix32(k0 ^ mix32(row + mix32(col ^ k1)));
}

LOWRANK_HD bool dropout_keep(uint32_t k0, uint32_t k1, uint32_t threshold, uint32_t row, uint32_t col) {
  return (hash32(k0, k1, row, col) >> 8) >= threshold;
}

LOWRANK_HD float uniform(uint32_t k0, uint32_t k1, uint32_t row, uint32_t col) {
  return static_cast<float>(hash32(k0, k1, row, col) >> 8) * (1.0f / 16777216.0f);
}

LOWRANK_HD float sign(uint32_t k0, uint32_t k1, uint32_t row, uint32_t col) {
  return 1.0f - 2.0f * static_cast<float>(hash32(k0, k1, row, col) >> 31);
}

}  // namespace rng
}  // namespace lowrank_kernels
