// Block-wise 8-bit and 4-bit moments (_quantize.py, torchao's) in the native kernel: a block read
// as float32, and written back as its scale and codes, as the pure kernel writes them.
//
// Writing a block of new values x[0..B) (the pure kernel's _quantize.quantize, on XLA:CPU):
//   scale = NaN if any x is NaN, else max(max |x|, 1e-12)
//   y     = x * (1 / scale)       (XLA turns the division by the broadcast scale into this)
//   code  = i, or i + 1 when y - map[i] >= (map[i + 1] - map[i]) * 0.5 (i + 1 at most K - 1),
//           where i = max(0, the largest i with map[i] <= y); a NaN y gets 0.
// The pure kernel finds i by a binary search of the map. Here the map is fixed, so i comes
// from y's bits: the sign, the exponent (clamped to [e_lo, 127]) and the top `mbits` bits of
// the significand pick a bucket; a table made from the map (_native_lowmem.py) holds the i of
// the lowest value of each bucket, and at most kSteps comparisons with the next entries
// finish it (the table is built so that no bucket needs more). Every comparison is the pure
// kernel's, so the code is the same, decided the same way.
// 4-bit codes are packed two a byte, the even element in the high nibble.

#ifndef ADAMW_JAX_NATIVE_QUANTIZE_H_
#define ADAMW_JAX_NATIVE_QUANTIZE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "_native_lowp.h"

namespace adamw_jax {

constexpr int kMaxMap = 256;
constexpr int kSteps = 2;  // comparisons after the table's guess (_native_lowmem.py checks it)

// One quantization map with its bucket table.
struct QuantMap {
  float values[kMaxMap + kSteps + 1];  // the map, then NaN: no comparison with it is true
  int size = 0;
  const uint8_t* table = nullptr;  // 2 * buckets entries: negative values mirrored, then positive
  int e_lo = 0, mbits = 0, buckets = 0;

  void Init(const float* map, int k, const uint8_t* t, int e, int bits) {
    size = k;
    std::copy_n(map, k, values);
    std::fill(values + k, values + k + kSteps + 1, std::numeric_limits<float>::quiet_NaN());
    table = t;
    e_lo = e;
    mbits = bits;
    buckets = (128 - e) << bits;
  }

  int Bucket(uint32_t u) const {
    int e = static_cast<int>((u >> 23) & 0xFFu);
    uint32_t top = (u >> (23 - mbits)) & ((1u << mbits) - 1u);
    if (e < e_lo) top = 0;
    if (e > 127) top = (1u << mbits) - 1u;
    e = std::min(std::max(e, e_lo), 127);
    const int p = ((e - e_lo) << mbits) | static_cast<int>(top);
    return (u >> 31) ? buckets - 1 - p : buckets + p;
  }

  uint8_t Code(float y) const {
    int i = table[Bucket(Bits(y))];
    for (int s = 0; s < kSteps; ++s) i += values[i + 1] <= y;
    const int up = std::min(i + 1, size - 1);
    const float down = values[i];
    const int code = y - down >= (values[up] - down) * 0.5f ? up : i;
    return static_cast<uint8_t>(y == y ? code : 0);
  }
};

// A moment held as codes and per-block scales.
struct Quantized {
  uint8_t* codes = nullptr;  // 8-bit: one a byte; 4-bit: two a byte
  float* scale = nullptr;
  const QuantMap* map = nullptr;
  int bits = 8;
  int64_t block = 0;
};

// x[0..n) = the moment's elements [k, k + n), k and n whole blocks.
inline void Dequantize(const Quantized& q, int64_t k, int64_t n, float* x) {
  const float* values = q.map->values;
  for (int64_t b = 0; b < n; b += q.block) {
    const float scale = q.scale[(k + b) / q.block];
    if (q.bits == 8) {
      const uint8_t* codes = q.codes + k + b;
      for (int64_t i = 0; i < q.block; ++i) x[b + i] = values[codes[i]] * scale;
    } else {
      const uint8_t* codes = q.codes + (k + b) / 2;
      for (int64_t i = 0; i < q.block / 2; ++i) {
        x[b + 2 * i] = values[codes[i] >> 4] * scale;
        x[b + 2 * i + 1] = values[codes[i] & 0xF] * scale;
      }
    }
  }
}

// The moment's elements [k, k + n) (whole blocks) set to x[0..n), as codes and scales.
inline void Quantize(const float* x, int64_t k, int64_t n, const Quantized& q) {
  for (int64_t b = 0; b < n; b += q.block) {
    const float* xb = x + b;
    float amax = 0.0f;
    bool nan = false;
    for (int64_t i = 0; i < q.block; ++i) {
      const float a = std::fabs(xb[i]);
      amax = a > amax ? a : amax;
      nan |= a != a;
    }
    const float scale = nan ? std::numeric_limits<float>::quiet_NaN() : std::max(amax, 1e-12f);
    q.scale[(k + b) / q.block] = scale;
    const float inv = 1.0f / scale;
    if (q.bits == 8) {
      uint8_t* codes = q.codes + k + b;
      for (int64_t i = 0; i < q.block; ++i) codes[i] = q.map->Code(xb[i] * inv);
    } else {
      uint8_t* codes = q.codes + (k + b) / 2;
      for (int64_t i = 0; i < q.block / 2; ++i) {
        const uint8_t even = q.map->Code(xb[2 * i] * inv), odd = q.map->Code(xb[2 * i + 1] * inv);
        codes[i] = static_cast<uint8_t>((even << 4) | odd);
      }
    }
  }
}

}  // namespace adamw_jax

#endif  // ADAMW_JAX_NATIVE_QUANTIZE_H_
