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
#include <cstring>

namespace adamw_jax {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline uint32_t Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

inline float FromBits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

inline uint16_t ToBF16(float x) {
  const uint32_t u = Bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = ((u >> 16) & 0x8000u) | 0x7FC0u;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

inline float FromBF16(uint16_t h) { return FromBits(static_cast<uint32_t>(h) << 16); }

inline uint16_t ToF16(float x) {
  const uint32_t u = Bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // 65520 and up: inf
  if (a >= 0x38800000u) {                                               // normal: 2**-14 and up
    const uint32_t r = a - 0x38000000u;                                 // exponent rebiased
    return static_cast<uint16_t>(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
  }
  if (a <= 0x33000000u) return static_cast<uint16_t>(sign);  // up to 2**-25 (a tie): zero
  // Subnormal: the significand, implicit bit included, in units of 2**-24, rounded to even.
  const uint32_t shift = 126u - (a >> 23);  // 14..24
  const uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
  const uint32_t k = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  return static_cast<uint16_t>(sign | (k + (rest > half || (rest == half && (k & 1u)))));
}

inline float FromF16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return FromBits(sign | 0x7F800000u | (m << 13) | (m ? 0x400000u : 0u));
  if (e == 0) {  // subnormal: m * 2**-24, a normal float32 (exact, whatever the control word)
    const float magnitude = static_cast<float>(m) * 5.9604644775390625e-08f;
    return FromBits(sign | Bits(magnitude));
  }
  return FromBits(sign | ((e + 112u) << 23) | (m << 13));
}

// A value rounded to a storage dtype and read back (the identity for float32).
template <int kType>
inline float Round(float x) {
  if (kType == kBF16) return FromBF16(ToBF16(x));
  if (kType == kF16) return FromF16(ToF16(x));
  return x;
}

// Arithmetic in a compute dtype. Float32: as written, with the multiply-adds
// XLA fuses (std::fma). bfloat16 / float16: each operation in float32, rounded.
template <int kType>
struct Emulated {
  static constexpr bool kFma = kType == kF32;
  static float R(float x) { return Round<kType>(x); }
};

// threefry2x32 (Salmon et al. 2011; JAX's), 20 rounds, on (x0, x1) in place.
inline uint32_t RotateLeft(uint32_t v, int r) { return (v << r) | (v >> (32 - r)); }

inline void Threefry2x32(uint32_t k0, uint32_t k1, uint32_t& x0, uint32_t& x1) {
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
inline uint32_t RandomBits(uint32_t k0, uint32_t k1, uint64_t j) {
  uint32_t x0 = static_cast<uint32_t>(j >> 32), x1 = static_cast<uint32_t>(j);
  Threefry2x32(k0, k1, x0, x1);
  return x0 ^ x1;
}

// _lowprec.stochastic_round_bf16 of x with the random word `bits`.
inline uint16_t StochasticBF16(float x, uint32_t bits) {
  const uint32_t u = Bits(x);
  const uint32_t truncated = u & 0xFFFF0000u;
  const uint32_t rounded = (bits >> 16) < (u & 0xFFFFu) ? truncated + 0x10000u : truncated;
  const bool finite = (u & 0x7F800000u) != 0x7F800000u;
  return finite ? static_cast<uint16_t>(rounded >> 16) : ToBF16(x);
}

}  // namespace adamw_jax

#endif  // ADAMW_JAX_NATIVE_LOWP_H_
