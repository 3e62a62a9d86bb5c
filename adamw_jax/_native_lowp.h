// Low-precision numbers as XLA:CPU computes them: bfloat16 and float16 conversions, arithmetic
// rounded to them, threefry2x32 random bits and stochastic rounding to bfloat16.
//
// Each function is the pure kernel's operation bit for bit (tests/test_native.py):
//   - float32 -> bfloat16: round to nearest even; a NaN becomes the quiet NaN of its sign
//     (0x7FC0 / 0xFFC0), as XLA's convert;
//   - float32 -> float16: round to nearest even, subnormals kept; a NaN keeps its sign and
//     the top 10 bits of its payload, quieted (vcvtps2ph, which XLA emits);
//   - bfloat16/float16 -> float32: exact (a float16 NaN quieted, as vcvtph2ps);
//   - XLA computes a bfloat16 or float16 operation in float32 and rounds the result, one
//     operation at a time, never fusing a multiply-add (Emulated<kBF16>::R);
//   - jax.random.bits(key, shape, uint32) with jax_threefry_partitionable (JAX's default):
//     element j is x0 ^ x1 of threefry2x32(key, (j >> 32, j & 0xFFFFFFFF));
//   - _lowprec.stochastic_round_bf16: up with probability (low 16 bits) / 2**16.
// All of it integer arithmetic or float32 operations that the control word does not change
// (XLA runs with denormals flushed to zero, and so does the kernel).

#ifndef ADAMW_JAX_NATIVE_LOWP_H_
#define ADAMW_JAX_NATIVE_LOWP_H_

#include <cstdint>
#include <algorithm>
#include <cstring>

#if defined(__GNUC__)
#define ADAMW_JAX_INLINE inline __attribute__((always_inline))  // into the kernels' loops
#else
#define ADAMW_JAX_INLINE inline
#endif

namespace adamw_jax {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

ADAMW_JAX_INLINE uint32_t Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

ADAMW_JAX_INLINE float FromBits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

ADAMW_JAX_INLINE uint16_t ToBF16(float x) {
  const uint32_t u = Bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = ((u >> 16) & 0x8000u) | 0x7FC0u;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

ADAMW_JAX_INLINE float FromBF16(uint16_t h) { return FromBits(static_cast<uint32_t>(h) << 16); }

// c ? a : b, as masks (GCC's vectorizer does not if-convert a chain of conditionals).
ADAMW_JAX_INLINE uint32_t Select(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

// Branch-free (vectorized): every case computed, the right one selected.
ADAMW_JAX_INLINE uint16_t ToF16(float x) {
  const uint32_t u = Bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // Normal (2**-14 and up): the exponent rebiased, the significand rounded to even.
  const uint32_t r = a - 0x38000000u;
  const uint32_t normal = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
  // Subnormal (and zero): |x| in units of 2**-24 (an exact product), rounded to an integer, to
  // even, by the addition of 2**23 (up to 2**-25, a tie, gives 0). Under the kernel's control
  // word, XLA's: round to nearest; a float32 subnormal counts as 0 (DAZ) and gives 0 anyway.
  const float units = FromBits(a) * 16777216.0f;
  const uint32_t subnormal = Bits(units + 8388608.0f) - 0x4B000000u;
  const uint32_t nan = 0x7E00u | ((a >> 13) & 0x3FFu);
  uint32_t magnitude = Select(a >= 0x38800000u, normal, subnormal);
  magnitude = Select(a >= 0x477FF000u, 0x7C00u, magnitude);  // 65520 and up: inf
  magnitude = Select(a > 0x7F800000u, nan, magnitude);
  return static_cast<uint16_t>(sign | magnitude);
}

ADAMW_JAX_INLINE float FromF16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  const uint32_t normal = ((e + 112u) << 23) | (m << 13);
  const uint32_t special = 0x7F800000u | (m << 13) | Select(m != 0, 0x400000u, 0u);  // inf, NaN
  // Subnormal: m * 2**-24, a normal float32 (exact, whatever the control word).
  const uint32_t subnormal = Bits(static_cast<float>(static_cast<int32_t>(m)) * 5.9604644775390625e-08f);
  return FromBits(sign | Select(e == 0x1Fu, special, Select(e == 0, subnormal, normal)));
}

// Round<kBF16> without the NaN select: the same bits for every value but a NaN with a
// payload (finite values, infinities, and the NaNs x86 arithmetic makes from those,
// 0xFFC00000 and 0x7FC00000, whose low 16 bits are zero). A NaN with other bits (read from
// memory) may carry into the exponent here; the kernel takes this path only for chunks whose
// inputs hold no NaN (Ordinary).
ADAMW_JAX_INLINE float RoundBF16Plain(float x) {
  const uint32_t u = Bits(x);
  return FromBits((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}

// A value rounded to a storage dtype and read back (the identity for float32). kPlain:
// bfloat16 by RoundBF16Plain (the caller knows no NaN with a payload can reach it).
template <int kType, bool kPlain = false>
ADAMW_JAX_INLINE float Round(float x) {
  if (kType == kBF16) return kPlain ? RoundBF16Plain(x) : FromBF16(ToBF16(x));
  if (kType == kF16) return FromF16(ToF16(x));
  return x;
}

// Arithmetic in a compute dtype. Float32: as written, with the multiply-adds
// XLA fuses (std::fma). bfloat16 / float16: each operation in float32, rounded.
template <int kType, bool kPlain = false>
struct Emulated {
  static constexpr bool kFma = kType == kF32;
  static ADAMW_JAX_INLINE float R(float x) { return Round<kType, kPlain>(x); }
};

// threefry2x32 (Salmon et al. 2011; JAX's), 20 rounds, on (x0, x1) in place.
ADAMW_JAX_INLINE uint32_t RotateLeft(uint32_t v, int r) { return (v << r) | (v >> (32 - r)); }

ADAMW_JAX_INLINE void Threefry2x32(uint32_t k0, uint32_t k1, uint32_t& x0, uint32_t& x1) {
  const uint32_t k2 = k0 ^ k1 ^ 0x1BD11BDAu;
  const uint32_t ks[3] = {k0, k1, k2};
  static constexpr int kRotations[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  x0 += k0;
  x1 += k1;
  for (int r = 0; r < 5; ++r) {
    for (int j = 0; j < 4; ++j) {
      x0 += x1;
      x1 = RotateLeft(x1, kRotations[r % 2][j]);
      x1 ^= x0;
    }
    x0 += ks[(r + 1) % 3];
    x1 += ks[(r + 2) % 3] + static_cast<uint32_t>(r + 1);
  }
}

// jax.random.bits(key, shape, jnp.uint32) at the flat index `j`.
ADAMW_JAX_INLINE uint32_t RandomBits(uint32_t k0, uint32_t k1, uint64_t j) {
  uint32_t x0 = static_cast<uint32_t>(j >> 32), x1 = static_cast<uint32_t>(j);
  Threefry2x32(k0, k1, x0, x1);
  return x0 ^ x1;
}

// _lowprec.stochastic_round_bf16 of x with the random word `bits`.
ADAMW_JAX_INLINE uint16_t StochasticBF16(float x, uint32_t bits) {
  const uint32_t u = Bits(x);
  const uint32_t truncated = u & 0xFFFF0000u;
  const uint32_t rounded = (bits >> 16) < (u & 0xFFFFu) ? truncated + 0x10000u : truncated;
  const bool finite = (u & 0x7F800000u) != 0x7F800000u;
  return finite ? static_cast<uint16_t>(rounded >> 16) : ToBF16(x);
}

}  // namespace adamw_jax

#endif  // ADAMW_JAX_NATIVE_LOWP_H_
