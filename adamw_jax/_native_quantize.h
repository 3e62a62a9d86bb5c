// Block-wise 8-bit and 4-bit moments (_quantize.py, torchao's) in the native kernel: a block read
// as float32, and written back as its scale and codes, as the pure kernel writes them.
//
// Writing a block of new values x[0..B) (the pure kernel's _quantize.quantize, on XLA:CPU):
//   scale = NaN if any x is NaN, else max(max |x|, 1e-12)
//   y     = x * (1 / scale)       (XLA turns the division by the broadcast scale into this)
//   code  = i, or i + 1 when y - map[i] >= (map[i + 1] - map[i]) * 0.5 (i + 1 at most K - 1),
//           where i = max(0, the largest i with map[i] <= y); a NaN y gets 0.
// For each i, y - map[i] (one rounding) never decreases as y grows, so "i + 1 rather than i"
// happens from a threshold on: t_i, the least float32 y with y - map[i] >= (map[i+1] - map[i])
// * 0.5, with map[i] < t_i <= map[i + 1]. The code of a y is the number of t_i <= y (K - 1 of
// them), for every float32 y but NaN: the same code, decided by the same comparisons.
//
// The thresholds are found once, in _native_lowmem.py, into a bucket table (`bucket_table`): a
// bucket is a sign and the top bits of the magnitude (the exponent and the top `mbits` bits of
// the significand: a run of consecutive float32s), fine enough that a bucket holds at most
// one threshold. Its entry is (b << 23) | (w - 1): b the number of
// thresholds below the bucket, w the position of its threshold among the bucket's floats in
// increasing order (2**(23 - mbits): none). The code of y is then
//   b + [(y's low 23 - mbits magnitude bits, complemented when y < 0) >= w]
// (a negative bucket's floats increase as their magnitude decreases), and 0 for a NaN:
// one table read, integer operations, no search and no branch. The magnitudes below
// 2**(e_lo - 127) (each sign's lowest bucket) and those from 1.0 up (its highest) hold no
// threshold, and are merged into those buckets.
//
// On x86 with AVX2 (checked at run time) each pass over a block is its own loop of 8 lanes:
//   1. the block maximum, as the largest magnitude's bits (non-negative float32s order as
//      their bits; a NaN's are above infinity's, so one integer maximum also finds a NaN; a
//      subnormal maximum gives the scale 1e-12 either way);
//   2. y = x * inv and its code, 8 lanes a step: integer operations and one gather of table
//      entries, the codes packed to bytes (4-bit: two a byte, the even element in the high
//      nibble). A block with a NaN or infinite scale (NaN y's) takes the scalar path;
//   3. reading a block back, map[code] * scale: 8 loads of the map put together (8-bit: on
//      AMD Zen 3 a gather of 8 lanes costs more than its loads) or two 8-entry permutes
//      (4-bit, the code's bit 3 picking the half).
// Elsewhere, and for a block's last elements when it is not a multiple of 8 (32 for the
// codes), the same operations run one element at a time (QuantMap::Code).
//
// Measured on a 16M-element float32 leaf (fused step, 2 cores of an AMD Zen 3, CPU time): the
// step with 8-bit moments from about 300 to 45-65 ms, 4-bit from about 300 to 36-50 ms
// (CHANGELOG.md). Quantizing is still the largest part (8-bit: the gathers of table entries).

#ifndef ADAMW_JAX_NATIVE_QUANTIZE_H_
#define ADAMW_JAX_NATIVE_QUANTIZE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "_native_lowp.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define ADAMW_JAX_QUANTIZE_AVX2 1
#define ADAMW_JAX_AVX2 __attribute__((target("avx2")))
#define ADAMW_JAX_AVX2_INLINE inline __attribute__((target("avx2"), always_inline))
#endif

namespace adamw_jax {

constexpr int kMaxMap = 256;

// One quantization map with its bucket table (see the comment above).
struct QuantMap {
  float values[kMaxMap];  // the map, then NaN: what a code past it reads
  int size = 0;
  const uint32_t* mid = nullptr;  // the table's middle: bucket r of y >= 0 at mid[r], of -y at
                                  // mid[-1 - r]
  int shift = 0;                  // 23 - mbits: a bucket is the magnitude's bits >> shift,
  int low = 0, top = 0;           // clamped to [low, top]
  uint32_t low_bits = 0;          // (1 << shift) - 1
  // A map of at most 16 entries (4-bit): its thresholds t_0 < ... < t_14, then NaN (no y
  // reaches them), found from Code: the least float32 whose code is above i.
  float thresholds[16];

  // The table's entries for `e_lo` and `mbits`: (top - low + 1) a sign.
  static int64_t Entries(int e_lo, int mbits) {
    return 2 * ((static_cast<int64_t>(127 - e_lo) << mbits) + 2);
  }

  void Init(const float* map, int k, const uint32_t* table, int e_lo, int mbits) {
    size = k;
    std::copy_n(map, k, values);
    std::fill(values + k, values + kMaxMap, std::numeric_limits<float>::quiet_NaN());
    shift = 23 - mbits;
    low = (e_lo << mbits) - 1;
    top = 127 << mbits;
    low_bits = (1u << shift) - 1u;
    mid = table + Entries(e_lo, mbits) / 2;
    std::fill(thresholds, thresholds + 16, std::numeric_limits<float>::quiet_NaN());
    if (k > 16) return;
    for (int i = 0; i + 1 < k; ++i) {
      // Codes grow with y: bisect the order of the float32s from -inf (code >= 0) to inf.
      int64_t below = Order(-std::numeric_limits<float>::infinity()) - 1;
      int64_t above = Order(std::numeric_limits<float>::infinity());
      if (Code(FromOrder(above)) <= static_cast<uint32_t>(i)) break;  // not reached
      while (above - below > 1) {
        const int64_t middle = below + (above - below) / 2;
        (Code(FromOrder(middle)) > static_cast<uint32_t>(i) ? above : below) = middle;
      }
      thresholds[i] = FromOrder(above);
    }
  }

  // The float32s in increasing order (-0.0 just below 0.0), and back.
  static int64_t Order(float x) {
    const int32_t s = static_cast<int32_t>(Bits(x));
    return s < 0 ? -static_cast<int64_t>(s & 0x7FFFFFFF) - 1 : s;
  }
  static float FromOrder(int64_t k) {
    return FromBits(k < 0 ? static_cast<uint32_t>(-k - 1) | 0x80000000u : static_cast<uint32_t>(k));
  }

  ADAMW_JAX_INLINE uint32_t Code(float y) const {
    const uint32_t u = Bits(y);
    const uint32_t neg = 0u - (u >> 31);
    const int32_t r =
        std::min(std::max(static_cast<int32_t>((u & 0x7FFFFFFFu) >> shift), low), top);
    const uint32_t e = mid[static_cast<int32_t>(static_cast<uint32_t>(r - low) ^ neg)];
    const uint32_t code = (e >> 23) + (((u ^ neg) & low_bits) > (e & 0x7FFFFFu));
    return y == y ? code : 0u;
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

namespace quantize {

// The block's scale (NaN with a NaN; the pure kernel's order does not matter: max is exact).
inline float Scale(float amax, bool nan) {
  return nan ? std::numeric_limits<float>::quiet_NaN() : std::max(amax, 1e-12f);
}

inline void MaxFrom(const float* x, int64_t i, int64_t n, float& amax, bool& nan) {
  for (; i < n; ++i) {
    const float a = std::fabs(x[i]);
    amax = a > amax ? a : amax;
    nan |= a != a;
  }
}

// Codes of x[i..n) * inv (n - i even for 4-bit), one element at a time.
inline void CodesFrom(const QuantMap& m, const float* x, int64_t i, int64_t n, float inv, int bits,
                      uint8_t* codes) {
  if (bits == 8) {
    for (; i < n; ++i) codes[i] = static_cast<uint8_t>(m.Code(x[i] * inv));
  } else {
    for (; i < n; i += 2) {
      const uint32_t even = m.Code(x[i] * inv), odd = m.Code(x[i + 1] * inv);
      codes[i / 2] = static_cast<uint8_t>((even << 4) | odd);
    }
  }
}

// x[i..n) = map[code] * scale, one element at a time.
inline void ValuesFrom(const QuantMap& m, const uint8_t* codes, int64_t i, int64_t n, float scale,
                       int bits, float* x) {
  if (bits == 8) {
    for (; i < n; ++i) x[i] = m.values[codes[i]] * scale;
  } else {
    for (; i < n; i += 2) {
      x[i] = m.values[codes[i / 2] >> 4] * scale;
      x[i + 1] = m.values[codes[i / 2] & 0xF] * scale;
    }
  }
}

#ifdef ADAMW_JAX_QUANTIZE_AVX2

inline bool Avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}

// QuantMap::Code of 8 lanes, none of them NaN.
struct Coder {
  const int* mid;
  __m128i shift;
  __m256i low, top, low_bits, magnitude, w_bits;

  ADAMW_JAX_AVX2 explicit Coder(const QuantMap& m)
      : mid(reinterpret_cast<const int*>(m.mid)),
        shift(_mm_cvtsi32_si128(m.shift)),
        low(_mm256_set1_epi32(m.low)),
        top(_mm256_set1_epi32(m.top)),
        low_bits(_mm256_set1_epi32(static_cast<int>(m.low_bits))),
        magnitude(_mm256_set1_epi32(0x7FFFFFFF)),
        w_bits(_mm256_set1_epi32(0x7FFFFF)) {}

  ADAMW_JAX_AVX2_INLINE __m256i operator()(__m256 y) const {
    const __m256i u = _mm256_castps_si256(y);
    const __m256i neg = _mm256_srai_epi32(u, 31);
    __m256i r = _mm256_srl_epi32(_mm256_and_si256(u, magnitude), shift);
    r = _mm256_sub_epi32(_mm256_min_epi32(_mm256_max_epi32(r, low), top), low);
    const __m256i e = _mm256_i32gather_epi32(mid, _mm256_xor_si256(r, neg), 4);
    const __m256i w = _mm256_and_si256(_mm256_xor_si256(u, neg), low_bits);
    const __m256i above = _mm256_cmpgt_epi32(w, _mm256_and_si256(e, w_bits));  // -1 or 0
    return _mm256_sub_epi32(_mm256_srli_epi32(e, 23), above);
  }
};

// The code of 8 lanes in a map of at most 16 entries: the number of thresholds <= y, by a
// binary search in registers (each step's thresholds picked by a permute), no table read.
struct SmallCoder {
  __m256 t7, level2, level3, level4;

  ADAMW_JAX_AVX2 explicit SmallCoder(const QuantMap& m) {
    const float* t = m.thresholds;
    t7 = _mm256_set1_ps(t[7]);
    level2 = _mm256_setr_ps(t[3], 0, 0, 0, t[11], 0, 0, 0);            // count >= c + 4
    level3 = _mm256_setr_ps(t[1], 0, t[5], 0, t[9], 0, t[13], 0);      // count >= c + 2
    level4 = _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]);  // c + 1
  }

  ADAMW_JAX_AVX2_INLINE __m256i operator()(__m256 y) const {
    __m256i c = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(y, t7, _CMP_GE_OQ)),
                                 _mm256_set1_epi32(8));
    c = Step(y, c, level2, 4);
    c = Step(y, c, level3, 2);
    return Step(y, c, level4, 1);
  }

  static ADAMW_JAX_AVX2_INLINE __m256i Step(__m256 y, __m256i c, __m256 level, int bit) {
    const __m256 t = _mm256_permutevar8x32_ps(level, _mm256_srli_epi32(c, 1));
    const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(y, t, _CMP_GE_OQ));
    return _mm256_or_si256(c, _mm256_and_si256(ge, _mm256_set1_epi32(bit)));
  }
};

// 32 codes (0..255) as 32 bytes in order.
ADAMW_JAX_AVX2_INLINE __m256i Bytes(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  const __m256i words = _mm256_packus_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
  return _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 32 codes (0..15) as bytes, two a byte: each pair (even, odd) read as a 16-bit word, made
// (even << 4) | odd, then narrowed to a byte.
ADAMW_JAX_AVX2_INLINE __m128i Nibbles(__m256i w) {
  const __m256i nib = _mm256_or_si256(
      _mm256_and_si256(_mm256_slli_epi16(w, 4), _mm256_set1_epi16(0xF0)), _mm256_srli_epi16(w, 8));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi16(nib, nib), 0x08));
}

ADAMW_JAX_AVX2 void QuantizeAvx2(const float* x, int64_t k, int64_t n, const Quantized& q) {
  const Coder code(*q.map);
  const bool small = q.map->size <= 16;  // 4-bit maps: codes by SmallCoder
  const SmallCoder small_code(*q.map);
  const int64_t block = q.block;
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  for (int64_t b = 0; b < n; b += block) {
    const float* xb = x + b;
    // The block's largest magnitude, as the largest of the magnitudes' bits (the order of
    // non-negative float32s; a NaN's are above infinity's): any subnormal maximum gives the
    // scale 1e-12, as the comparisons under the kernel's control word do.
    __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
    int64_t i = 0;
    for (; i + 32 <= block; i += 32) {
      m0 = _mm256_max_epi32(
          m0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + i)),
                                 magnitude));
      m1 = _mm256_max_epi32(
          m1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + i + 8)),
                                 magnitude));
      m2 = _mm256_max_epi32(
          m2, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + i + 16)),
                                 magnitude));
      m3 = _mm256_max_epi32(
          m3, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + i + 24)),
                                 magnitude));
    }
    for (; i + 8 <= block; i += 8) {
      m0 = _mm256_max_epi32(
          m0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + i)),
                                 magnitude));
    }
    const __m256i m = _mm256_max_epi32(_mm256_max_epi32(m0, m1), _mm256_max_epi32(m2, m3));
    __m128i h = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    const uint32_t top = static_cast<uint32_t>(_mm_cvtsi128_si32(h));
    bool any_nan = top > 0x7F800000u;
    float amax = any_nan ? 0.0f : FromBits(top);
    MaxFrom(xb, i, block, amax, any_nan);
    const float scale = Scale(amax, any_nan);
    q.scale[(k + b) / block] = scale;
    const float inv = 1.0f / scale;
    const __m256 inv8 = _mm256_set1_ps(inv);
    i = 0;
    if (!(std::fabs(scale) < std::numeric_limits<float>::infinity())) {
      // A NaN or infinite scale: NaN y's (code 0), one element at a time.
      CodesFrom(*q.map, xb, 0, block, inv, q.bits,
                q.bits == 8 ? q.codes + k + b : q.codes + (k + b) / 2);
    } else if (q.bits == 8) {
      uint8_t* codes = q.codes + k + b;
      for (; i + 32 <= block; i += 32) {
        const __m256i c0 = code(_mm256_mul_ps(_mm256_loadu_ps(xb + i), inv8));
        const __m256i c1 = code(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8), inv8));
        const __m256i c2 = code(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 16), inv8));
        const __m256i c3 = code(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 24), inv8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), Bytes(c0, c1, c2, c3));
      }
      CodesFrom(*q.map, xb, i, block, inv, 8, codes);
    } else {
      uint8_t* codes = q.codes + (k + b) / 2;
      for (; i + 32 <= block && small; i += 32) {
        const __m256i c0 = small_code(_mm256_mul_ps(_mm256_loadu_ps(xb + i), inv8));
        const __m256i c1 = small_code(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8), inv8));
        const __m256i c2 = small_code(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 16), inv8));
        const __m256i c3 = small_code(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 24), inv8));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i / 2), Nibbles(Bytes(c0, c1, c2, c3)));
      }
      for (; i + 32 <= block; i += 32) {
        const __m256i c0 = code(_mm256_mul_ps(_mm256_loadu_ps(xb + i), inv8));
        const __m256i c1 = code(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8), inv8));
        const __m256i c2 = code(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 16), inv8));
        const __m256i c3 = code(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 24), inv8));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i / 2), Nibbles(Bytes(c0, c1, c2, c3)));
      }
      CodesFrom(*q.map, xb, i, block, inv, 4, codes);
    }
  }
}

// map[c] of 8 codes: 8 loads (on AMD Zen 3 a gather of 8 lanes costs more than its loads).
ADAMW_JAX_AVX2_INLINE __m256 Values8(const float* values, const uint8_t* c) {
  __m128 lo = _mm_load_ss(values + c[0]);
  lo = _mm_insert_ps(lo, _mm_load_ss(values + c[1]), 0x10);
  lo = _mm_insert_ps(lo, _mm_load_ss(values + c[2]), 0x20);
  lo = _mm_insert_ps(lo, _mm_load_ss(values + c[3]), 0x30);
  __m128 hi = _mm_load_ss(values + c[4]);
  hi = _mm_insert_ps(hi, _mm_load_ss(values + c[5]), 0x10);
  hi = _mm_insert_ps(hi, _mm_load_ss(values + c[6]), 0x20);
  hi = _mm_insert_ps(hi, _mm_load_ss(values + c[7]), 0x30);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

ADAMW_JAX_AVX2 void DequantizeAvx2(const Quantized& q, int64_t k, int64_t n, float* x) {
  const QuantMap& m = *q.map;
  const int64_t block = q.block;
  for (int64_t b = 0; b < n; b += block) {
    const float scale = q.scale[(k + b) / block];
    const __m256 scale8 = _mm256_set1_ps(scale);
    float* xb = x + b;
    int64_t i = 0;
    if (q.bits == 8) {
      const uint8_t* codes = q.codes + k + b;
      for (; i + 8 <= block; i += 8) {
        _mm256_storeu_ps(xb + i, _mm256_mul_ps(Values8(m.values, codes + i), scale8));
      }
      ValuesFrom(m, codes, i, block, scale, 8, xb);
    } else {
      const uint8_t* codes = q.codes + (k + b) / 2;
      const __m256 lo = _mm256_loadu_ps(m.values), hi = _mm256_loadu_ps(m.values + 8);
      const __m128i nibble = _mm_set1_epi8(0x0F);
      for (; i + 16 <= block; i += 16) {
        const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i / 2));
        const __m128i even = _mm_and_si128(_mm_srli_epi16(c, 4), nibble);
        const __m128i both = _mm_unpacklo_epi8(even, _mm_and_si128(c, nibble));  // in order
        const __m256i c0 = _mm256_cvtepu8_epi32(both);
        const __m256i c1 = _mm256_cvtepu8_epi32(_mm_srli_si128(both, 8));
        // map[c]: the low 3 bits pick a lane, bit 3 (moved to the sign) the half.
        const __m256 v0 =
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, c0), _mm256_permutevar8x32_ps(hi, c0),
                             _mm256_castsi256_ps(_mm256_slli_epi32(c0, 28)));
        const __m256 v1 =
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, c1), _mm256_permutevar8x32_ps(hi, c1),
                             _mm256_castsi256_ps(_mm256_slli_epi32(c1, 28)));
        _mm256_storeu_ps(xb + i, _mm256_mul_ps(v0, scale8));
        _mm256_storeu_ps(xb + i + 8, _mm256_mul_ps(v1, scale8));
      }
      ValuesFrom(m, codes, i, block, scale, 4, xb);
    }
  }
}

#endif  // ADAMW_JAX_QUANTIZE_AVX2

}  // namespace quantize

// x[0..n) = the moment's elements [k, k + n), k and n whole blocks.
inline void Dequantize(const Quantized& q, int64_t k, int64_t n, float* x) {
#ifdef ADAMW_JAX_QUANTIZE_AVX2
  if (quantize::Avx2()) return quantize::DequantizeAvx2(q, k, n, x);
#endif
  for (int64_t b = 0; b < n; b += q.block) {
    const float scale = q.scale[(k + b) / q.block];
    const uint8_t* codes = q.bits == 8 ? q.codes + k + b : q.codes + (k + b) / 2;
    quantize::ValuesFrom(*q.map, codes, 0, q.block, scale, q.bits, x + b);
  }
}

// The moment's elements [k, k + n) (whole blocks) set to x[0..n), as codes and scales.
inline void Quantize(const float* x, int64_t k, int64_t n, const Quantized& q) {
#ifdef ADAMW_JAX_QUANTIZE_AVX2
  if (quantize::Avx2()) return quantize::QuantizeAvx2(x, k, n, q);
#endif
  for (int64_t b = 0; b < n; b += q.block) {
    const float* xb = x + b;
    float amax = 0.0f;
    bool nan = false;
    quantize::MaxFrom(xb, 0, q.block, amax, nan);
    const float scale = quantize::Scale(amax, nan);
    q.scale[(k + b) / q.block] = scale;
    uint8_t* codes = q.bits == 8 ? q.codes + k + b : q.codes + (k + b) / 2;
    quantize::CodesFrom(*q.map, xb, 0, q.block, 1.0f / scale, q.bits, codes);
  }
}

}  // namespace adamw_jax

#endif  // ADAMW_JAX_NATIVE_QUANTIZE_H_
