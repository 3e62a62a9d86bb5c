// The native twin of the low-memory options: the one step of _core.py for a leaf whose moments
// are bfloat16/float16 or block-wise quantized (_moments.py), whose parameter is
// bfloat16/float16, or whose parameter is written by stochastic rounding or with Kahan
// compensation (_writes.py), in one pass over memory.
//
// One XLA FFI custom call ("adamw_jax_lowmem_step") updates any number of leaves of one
// compute dtype and writer. Per chunk of a leaf (in L1, whole quantization blocks):
//   1. read g and p, and load m, v, vm as float32 (_moments.load: converted or dequantized);
//   2. Core: the Adam step of _kernel._real_step, as _native.cc's Block, in the compute dtype:
//      float32 with XLA's fused multiply-adds, or bfloat16/float16 emulated as XLA:CPU
//      computes them (each operation in float32, rounded; the division by sqrt(1 - b2**t) a
//      true division below `small` elements and _steer's Markstein step, in that dtype, from
//      it on: the two differ there);
//   3. store m, v, vm (_moments.store: rounded to their dtype, or requantized);
//   4. write the parameter as the leaf's writer does (_writes.py):
//        nearest:     the parameter's dtype P: s (mode 0, the gradient's dtype),
//                     u = R_P(R_P(q + s) - p) (mode 1), p + u (mode 2), p + R(s) (mode 3);
//        stochastic:  n = stochastic_round_bf16(q + s) with the leaf's key; n or n - p;
//        kahan:       c = R_P(c + ((q + s) - p)); n = R_P(p + c); c = R_P(c + R_P(p - n));
//                     n or n - p;
//        remainder:   the float32 master M = combine(p, r) (_remainder.py) is the step's
//                     parameter; M' = M + (o - M) (with the parameters) or M + s, as the
//                     nearest writer's float32 modes; (p', r) = split(M'); p' (fused) or
//                     the float32 update f32(p') - f32(p).
// The bit-level operations are in _native_lowp.h and _native_quantize.h; the parallel
// loop and the scalars are _native.cc's (_native_common.h).

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "_native_common.h"
#include "_native_lowp.h"
#include "_native_quantize.h"

namespace ffi = xla::ffi;

namespace {

using namespace adamw_jax;  // NOLINT: the kernel's shared vocabulary

enum Writer : int64_t { kNearest = 0, kStochastic = 1, kKahan = 2, kRemainder = 3 };

constexpr int kInt16 = 3;  // a Stream's type: the remainders (raw 16-bit words)

// Per-leaf flags (the "flags" attribute; _native_lowmem.py).
constexpr int64_t kHasParam = 1, kQuantized = 2, kHasBuffer = 4, kHasKey = 8;

constexpr int64_t kChunk = 1024;  // elements per chunk, at least a quantization block

struct Stream {  // a full-precision array: float32, bfloat16 or float16
  void* data = nullptr;
  int type = kF32;
};

struct Moment {
  Stream full;
  Quantized q;
  bool quantized = false;
};

struct LowLeaf {
  int64_t n = 0;
  int64_t chunk = kChunk;  // whole quantization blocks
  Stream g, p, out, buffer;
  Moment m, v, vm;
  uint32_t key[2] = {0, 0};
  bool markstein = false;  // emulated compute: the pure kernel divides by Markstein's step
};

struct Config {
  int64_t mode, writer;
};

template <int kType>
inline void ReadAs(const void* data, int64_t k, int64_t n, float* x) {
  if (kType == kBF16) {
    const uint16_t* h = static_cast<const uint16_t*>(data) + k;
    for (int64_t i = 0; i < n; ++i) x[i] = FromBF16(h[i]);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(data) + k;
    for (int64_t i = 0; i < n; ++i) x[i] = FromF16(h[i]);
  }
}

template <int kType>
inline void WriteAs(const float* x, int64_t k, int64_t n, void* data) {
  uint16_t* h = static_cast<uint16_t*>(data) + k;
  if (kType == kBF16) {
    for (int64_t i = 0; i < n; ++i) h[i] = ToBF16(x[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) h[i] = ToF16(x[i]);
  }
}

// The elements [k, k + n) of `s` as float32: in place when it is float32, else in `scratch`.
ADAMW_JAX_CLONES float* Read(const Stream& s, int64_t k, int64_t n, float* scratch) {
  switch (s.type) {
    case kBF16:
      ReadAs<kBF16>(s.data, k, n, scratch);
      return scratch;
    case kF16:
      ReadAs<kF16>(s.data, k, n, scratch);
      return scratch;
    default:
      return static_cast<float*>(s.data) + k;
  }
}

ADAMW_JAX_CLONES void Write(const float* x, int64_t k, int64_t n, const Stream& s) {
  switch (s.type) {
    case kBF16:
      return WriteAs<kBF16>(x, k, n, s.data);
    case kF16:
      return WriteAs<kF16>(x, k, n, s.data);
    default:
      if (x != static_cast<float*>(s.data) + k) std::copy_n(x, n, static_cast<float*>(s.data) + k);
  }
}

float* Load(const Moment& m, int64_t k, int64_t n, float* scratch) {
  if (!m.quantized) return Read(m.full, k, n, scratch);
  Dequantize(m.q, k, n, scratch);
  return scratch;
}

void Store(const Moment& m, int64_t k, int64_t n, const float* x) {
  if (m.quantized) {
    Quantize(x, k, n, m.q);
  } else {
    Write(x, k, n, m.full);
  }
}

// Core in an emulated compute dtype (every operation rounded) as three loops over the chunk:
// the moments (and v's term under the root, into o), the denominator (in o), the step. Each
// loop's chain of roundings is short enough for the processor to overlap iterations, which
// one loop over all of it (about 20 dependent roundings an element) does not. The same
// operations as Core's, in the same order.
template <int kE, int64_t kDecay, bool kAmsgrad, bool kPlain>
ADAMW_JAX_CLONES void EmulatedMoments(const Scalars<float> c, const float* __restrict g,
                                      const float* __restrict p, float* __restrict m,
                                      float* __restrict v, float* __restrict vm,
                                      float* __restrict root, int64_t n) {
  using E = Emulated<kE, kPlain>;
  for (int64_t i = 0; i < n; ++i) {
    float gi = g[i] * c.sign;
    if (kDecay == kL2) gi = E::R(E::R(c.decay * p[i]) + gi);
    const float mo = m[i];
    m[i] = E::R(E::R(c.one_minus_b1 * E::R(gi - mo)) + mo);
    const float vi = E::R(E::R(E::R(c.one_minus_b2 * gi) * gi) + E::R(v[i] * c.b2));
    v[i] = vi;
    float vu = vi;
    if (kAmsgrad) {
      const float a = vm[i];
      vu = (a > vi || a != a) ? a : vi;
      vm[i] = vu;
    }
    root[i] = E::R(vu + c.eps_root);
  }
}

template <int kE, bool kMarkstein, bool kPlain>
ADAMW_JAX_CLONES void EmulatedDenominator(const Scalars<float> c, float* __restrict d,
                                          int64_t n) {
  using E = Emulated<kE, kPlain>;
  for (int64_t i = 0; i < n; ++i) {
    const float a = E::R(std::sqrt(d[i]));
    float q;
    if (kMarkstein) {
      float q0 = E::R(a * c.inv_bc2_sqrt);
      q0 = q0 < c.max ? q0 : (q0 != q0 ? q0 : c.max);
      const float residual = E::R(a - E::R(q0 * c.bc2_sqrt));
      q = E::R(E::R(residual * c.inv_bc2_sqrt) + q0);
    } else {
      q = E::R(a / c.bc2_sqrt);
    }
    d[i] = E::R(q + c.eps);
  }
}

template <int kE, int64_t kDecay, bool kNew, bool kPlain>
ADAMW_JAX_CLONES void EmulatedStep(const Scalars<float> c, const float* __restrict p,
                                   const float* __restrict m, float* __restrict o, int64_t n) {
  using E = Emulated<kE, kPlain>;
  for (int64_t i = 0; i < n; ++i) {
    const float s = E::R(E::R(c.step_size * m[i]) / o[i]);
    if (kNew) {
      const float q = kDecay == kDecoupled ? E::R(p[i] * c.decay) : p[i];
      o[i] = E::R(q + s);
    } else {
      o[i] = s;
    }
  }
}

// The Adam step on float32 arrays in the compute dtype kE: new m, v, vm in place, and
// o = q + s (kNew) or s. Operations and order: _native.cc's Block; see the file's comment.
template <int kE, int64_t kDecay, bool kAmsgrad, bool kNew, bool kMarkstein, bool kPlain>
ADAMW_JAX_CLONES void Core(const Scalars<float> c, const float* __restrict g,
                           const float* __restrict p, float* __restrict m, float* __restrict v,
                           float* __restrict vm, float* __restrict o, int64_t n) {
  using E = Emulated<kE, kPlain>;
  if constexpr (!E::kFma) {
    EmulatedMoments<kE, kDecay, kAmsgrad, kPlain>(c, g, p, m, v, vm, o, n);
    EmulatedDenominator<kE, kMarkstein, kPlain>(c, o, n);
    return EmulatedStep<kE, kDecay, kNew, kPlain>(c, p, m, o, n);
  }
  for (int64_t i = 0; i < n; ++i) {  // float32, with XLA's fused multiply-adds
    float gi = g[i] * c.sign;
    constexpr bool kReadsP = kNew || kDecay == kL2;
    const float pi = kReadsP ? p[i] : 0.0f;
    const float mo = m[i];
    if (kDecay == kL2) gi = std::fma(c.decay, pi, gi);
    const float mi = std::fma(c.one_minus_b1, gi - mo, mo);
    const float vi = std::fma(c.one_minus_b2 * gi, gi, v[i] * c.b2);
    m[i] = mi;
    v[i] = vi;
    float vu = vi;
    if (kAmsgrad) {
      const float a = vm[i];
      vu = (a > vi || a != a) ? a : vi;
      vm[i] = vu;
    }
    vu = vu + c.eps_root;
    const float d = DivideByScalar(std::sqrt(vu), c) + c.eps;
    const float s = (c.step_size * mi) / d;
    if (kNew) {
      const float q = kDecay == kDecoupled ? pi * c.decay : pi;
      o[i] = q + s;
    } else {
      o[i] = s;
    }
  }
}

// The nearest writer into a parameter of dtype kP (the gradient's dtype kG for mode 3's step).
template <int kP, int kG, int64_t kMode, bool kPlain>
ADAMW_JAX_CLONES void Nearest(const float* __restrict o, const float* __restrict p,
                              float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (kMode == kFusedStep) {
      out[i] = Round<kP, kPlain>(p[i] + Round<kG, kPlain>(o[i]));
    } else {
      const float u = Round<kP, kPlain>(Round<kP, kPlain>(o[i]) - p[i]);
      out[i] = kMode == kFused ? Round<kP, kPlain>(p[i] + u) : u;
    }
  }
}

template <int kP, int kG, bool kPlain>
void NearestMode(int64_t mode, const float* o, const float* p, float* out, int64_t n) {
  switch (mode) {
    case kFusedStep:
      return Nearest<kP, kG, kFusedStep, kPlain>(o, p, out, n);
    case kFused:
      return Nearest<kP, kG, kFused, kPlain>(o, p, out, n);
    default:
      return Nearest<kP, kG, kUpdate, kPlain>(o, p, out, n);
  }
}

template <int kP>
void NearestFor(int64_t mode, int g, bool plain, const float* o, const float* p, float* out,
                int64_t n) {
  switch (g) {
    case kBF16:
      return plain ? NearestMode<kP, kBF16, true>(mode, o, p, out, n)
                   : NearestMode<kP, kBF16, false>(mode, o, p, out, n);
    case kF16:
      return NearestMode<kP, kF16, false>(mode, o, p, out, n);
    default:
      return plain ? NearestMode<kP, kF32, true>(mode, o, p, out, n)
                   : NearestMode<kP, kF32, false>(mode, o, p, out, n);
  }
}

template <bool kFusedOut>
ADAMW_JAX_CLONES void Stochastic(const uint32_t key[2], int64_t k, const float* __restrict o,
                                 const float* __restrict p, uint16_t* __restrict out, int64_t n) {
  const uint32_t k0 = key[0], k1 = key[1];
  // The index's high word is fixed in a chunk unless the chunk crosses a multiple of 2**32.
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(k) >> 32);
  const uint32_t lo = static_cast<uint32_t>(k);
  const bool crosses = (static_cast<uint64_t>(k + n - 1) >> 32) != hi;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t x0 = crosses ? static_cast<uint32_t>(static_cast<uint64_t>(k + i) >> 32) : hi;
    uint32_t x1 = lo + static_cast<uint32_t>(i);
    Threefry2x32(k0, k1, x0, x1);
    const uint16_t rounded = StochasticBF16(o[i], x0 ^ x1);
    out[i] = kFusedOut ? rounded : ToBF16(FromBF16(rounded) - p[i]);
  }
}

template <int kP, bool kFusedOut, bool kPlain>
ADAMW_JAX_CLONES void Kahan(const float* __restrict o, const float* __restrict p,
                            float* __restrict c, float* __restrict out, int64_t n) {
  using E = Emulated<kP, kPlain>;
  for (int64_t i = 0; i < n; ++i) {
    const float sum = E::R(c[i] + (o[i] - p[i]));
    const float next = E::R(p[i] + sum);
    c[i] = E::R(sum + E::R(p[i] - next));
    out[i] = kFusedOut ? next : E::R(next - p[i]);
  }
}

bool OrdinaryScalars(const Scalars<float>& c) {
  for (float x : {c.one_minus_b1, c.b2, c.one_minus_b2, c.bc2_sqrt, c.eps, c.eps_root, c.step_size,
                  c.decay, c.sign, c.inv_bc2_sqrt}) {
    if (x != x) return false;
  }
  return true;
}

// Whether no element of x[0, n) is a NaN: the chunk may take the kPlain roundings (a NaN
// made by the arithmetic from such inputs has no payload).
ADAMW_JAX_CLONES bool Ordinary(const float* __restrict x, int64_t n) {
  uint32_t worst = 0;
  for (int64_t i = 0; i < n; ++i) worst = std::max(worst, Bits(x[i]) & 0x7FFFFFFFu);
  return worst <= 0x7F800000u;
}

// _remainder.combine: the float32 master of a bfloat16 parameter (as float32) and its remainder.
ADAMW_JAX_CLONES void Combine(const float* __restrict p, const uint16_t* __restrict r,
                              float* __restrict master, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = Bits(p[i]) >> 16, ri = r[i];
    const bool nan = (b & 0x7FFFu) > 0x7F80u, zero = (b & 0x7FFFu) == 0;
    const bool down = ri >= 0x8000u && !nan;  // b was rounded up from the master: hi = b - 1
    const uint32_t hi = Select(down && !zero, b - 1u, b);
    const uint32_t lo = Select(down && zero, 0u, ri);
    master[i] = FromBits((hi << 16) | lo);
  }
}

// The new master from Core's `o` (nearest's float32 modes), split into the parameter (fused:
// `out` bfloat16) or the float32 update f32(p') - f32(p) (`out` float32), and the remainder.
template <int64_t kMode>
ADAMW_JAX_CLONES void Remainder(const float* __restrict o, const float* __restrict master,
                                const float* __restrict p, uint16_t* __restrict r,
                                void* __restrict out, int64_t n) {
  constexpr bool kStepOnly = kMode == kStep || kMode == kFusedStep;
  constexpr bool kParamOut = kMode == kFused || kMode == kFusedStep;
  for (int64_t i = 0; i < n; ++i) {
    const float next = kStepOnly ? master[i] + o[i] : master[i] + (o[i] - master[i]);
    const uint32_t bits = Bits(next), magnitude = bits & 0x7FFFFFFFu;
    const uint32_t hi = magnitude >> 16, lo = bits & 0xFFFFu;
    const uint32_t rounded =
        Select(magnitude > 0x7F800000u, hi | 0x40u, hi + static_cast<uint32_t>(lo >= 0x8000u));
    const uint16_t param = static_cast<uint16_t>(((bits & 0x80000000u) >> 16) | rounded);
    r[i] = static_cast<uint16_t>(lo);
    if (kParamOut) {
      static_cast<uint16_t*>(out)[i] = param;
    } else {
      static_cast<float*>(out)[i] = FromBF16(param) - p[i];
    }
  }
}

void WriteRemainder(const Config& cfg, const LowLeaf& l, int64_t k, int64_t n, const float* o,
                    const float* master, const float* p) {
  uint16_t* r = static_cast<uint16_t*>(l.buffer.data) + k;
  switch (cfg.mode) {
    case kFused:
      return Remainder<kFused>(o, master, p, r, static_cast<uint16_t*>(l.out.data) + k, n);
    case kFusedStep:
      return Remainder<kFusedStep>(o, master, p, r, static_cast<uint16_t*>(l.out.data) + k, n);
    case kUpdate:
      return Remainder<kUpdate>(o, master, p, r, static_cast<float*>(l.out.data) + k, n);
    default:
      return Remainder<kStep>(o, master, p, r, static_cast<float*>(l.out.data) + k, n);
  }
}

// Step 4 for the chunk [k, k + n): `o` from Core, `p` the parameter as float32; `work` and
// `work2` are scratch rows.
void WriteParameter(const Config& cfg, const LowLeaf& l, int64_t k, int64_t n, bool plain,
                    const float* o, const float* p, float* work, float* work2) {
  if (cfg.writer == kStochastic) {
    uint16_t* out = static_cast<uint16_t*>(l.out.data) + k;
    if (cfg.mode == kFused) {
      Stochastic<true>(l.key, k, o, p, out, n);
    } else {
      Stochastic<false>(l.key, k, o, p, out, n);
    }
    return;
  }
  if (cfg.writer == kKahan) {
    float* c = Read(l.buffer, k, n, work);
    float* out = work2;
    const bool fused = cfg.mode == kFused;
    if (l.p.type == kBF16 && plain && Ordinary(c, n)) {
      fused ? Kahan<kBF16, true, true>(o, p, c, out, n)
            : Kahan<kBF16, false, true>(o, p, c, out, n);
    } else if (l.p.type == kBF16) {
      fused ? Kahan<kBF16, true, false>(o, p, c, out, n)
            : Kahan<kBF16, false, false>(o, p, c, out, n);
    } else {
      fused ? Kahan<kF16, true, false>(o, p, c, out, n)
            : Kahan<kF16, false, false>(o, p, c, out, n);
    }
    Write(c, k, n, l.buffer);
    Write(out, k, n, l.out);
    return;
  }
  if (cfg.mode == kStep) {
    Write(o, k, n, l.out);
    return;
  }
  const int type = l.out.type;
  float* out = type == kF32 ? static_cast<float*>(l.out.data) + k : work;
  if (type == kBF16) {
    NearestFor<kBF16>(cfg.mode, l.g.type, plain, o, p, out, n);
  } else if (type == kF16) {
    NearestFor<kF16>(cfg.mode, l.g.type, false, o, p, out, n);
  } else {
    NearestFor<kF32>(cfg.mode, l.g.type, false, o, p, out, n);
  }
  Write(out, k, n, l.out);
}

// Scratch rows of one chunk: g, p, m, v, vm, o, and two for the writer.
struct Scratch {
  std::vector<float> data;
  float* Row(int r, int64_t chunk) { return data.data() + r * chunk; }
};

template <int kE, int64_t kDecay, bool kAmsgrad, bool kNew>
void Chunk(const Config& cfg, const Scalars<float>& c, const LowLeaf& l, int64_t k, int64_t n,
           Scratch& s) {
  const int64_t w = l.chunk;
  const float* g = Read(l.g, k, n, s.Row(0, w));
  const float* p = l.p.data != nullptr ? Read(l.p, k, n, s.Row(1, w)) : nullptr;
  const float* step_p = p;  // the parameter the step computes with: the master for kRemainder
  if (cfg.writer == kRemainder) {
    float* master = s.Row(6, w);
    Combine(p, static_cast<const uint16_t*>(l.buffer.data) + k, master, n);
    step_p = master;
  }
  float* m = Load(l.m, k, n, s.Row(2, w));
  float* v = Load(l.v, k, n, s.Row(3, w));
  float* vm = kAmsgrad ? Load(l.vm, k, n, s.Row(4, w)) : nullptr;
  float* o = s.Row(5, w);
  // No NaN among the inputs (and the scalars): the bfloat16 roundings need no NaN select.
  // Asked only where a bfloat16 rounding follows (the compute dtype, Kahan's, nearest's).
  const bool rounds = kE == kBF16 || cfg.writer == kKahan ||
                      (cfg.writer == kNearest && l.out.type == kBF16);
  const bool plain = rounds && OrdinaryScalars(c) && Ordinary(g, n) &&
                     (step_p == nullptr || Ordinary(step_p, n)) && Ordinary(m, n) &&
                     Ordinary(v, n) && (!kAmsgrad || Ordinary(vm, n));
  if constexpr (kE == kBF16) {
    if (plain) {
      l.markstein ? Core<kE, kDecay, kAmsgrad, kNew, true, true>(c, g, step_p, m, v, vm, o, n)
                  : Core<kE, kDecay, kAmsgrad, kNew, false, true>(c, g, step_p, m, v, vm, o, n);
    } else if (l.markstein) {
      Core<kE, kDecay, kAmsgrad, kNew, true, false>(c, g, step_p, m, v, vm, o, n);
    } else {
      Core<kE, kDecay, kAmsgrad, kNew, false, false>(c, g, step_p, m, v, vm, o, n);
    }
  } else if (kE != kF32 && l.markstein) {
    Core<kE, kDecay, kAmsgrad, kNew, true, false>(c, g, step_p, m, v, vm, o, n);
  } else {
    Core<kE, kDecay, kAmsgrad, kNew, false, false>(c, g, step_p, m, v, vm, o, n);
  }
  Store(l.m, k, n, m);
  Store(l.v, k, n, v);
  if (kAmsgrad) Store(l.vm, k, n, vm);
  if (cfg.writer == kRemainder) return WriteRemainder(cfg, l, k, n, o, step_p, p);
  WriteParameter(cfg, l, k, n, plain, o, p, s.Row(6, w), s.Row(7, w));
}

struct Range {
  int leaf;
  int64_t start, end;
};

template <int kE, int64_t kDecay, bool kAmsgrad, bool kNew>
void Run(ffi::ThreadPool& pool, const Config& cfg, const Scalars<float>& c,
         const std::vector<LowLeaf>& leaves) {
  std::vector<Range> ranges;
  int64_t total = 0, widest = kChunk;
  for (int i = 0; i < static_cast<int>(leaves.size()); ++i) {
    const LowLeaf& l = leaves[i];
    const int64_t task = std::max(l.chunk, kBlock / l.chunk * l.chunk);
    total += l.n;
    widest = std::max(widest, l.chunk);
    for (int64_t k = 0; k < l.n; k += task) ranges.push_back({i, k, std::min(l.n, k + task)});
  }
  ParallelFor::Run(pool, ranges.size(), total >= kParallelMin, [&](size_t index) {
    thread_local Scratch scratch;
    const size_t size = static_cast<size_t>(8 * widest);
    if (scratch.data.size() < size) scratch.data.resize(size);
    const Range& r = ranges[index];
    const LowLeaf& l = leaves[r.leaf];
    for (int64_t k = r.start; k < r.end; k += l.chunk) {
      Chunk<kE, kDecay, kAmsgrad, kNew>(cfg, c, l, k, std::min(l.chunk, r.end - k), scratch);
    }
  });
}

template <int kE>
ffi::Error DispatchE(ffi::ThreadPool& pool, const Config& cfg, const Scalars<float>& c,
                     const std::vector<LowLeaf>& leaves, int64_t decay, bool amsgrad) {
  // The remainder writer steps its master in the nearest writer's float32 modes.
  const bool with_new = (cfg.writer != kNearest && cfg.writer != kRemainder) ||
                        cfg.mode == kUpdate || cfg.mode == kFused;
#define ADAMW_JAX_CASE(D, A, N)                                \
  if (decay == D && amsgrad == A && with_new == N) {           \
    Run<kE, D, A, N>(pool, cfg, c, leaves);                    \
    return ffi::Error::Success();                              \
  }
#define ADAMW_JAX_NEW(D, A) ADAMW_JAX_CASE(D, A, false) ADAMW_JAX_CASE(D, A, true)
  ADAMW_JAX_NEW(kNoDecay, false)
  ADAMW_JAX_NEW(kNoDecay, true)
  ADAMW_JAX_NEW(kDecoupled, false)
  ADAMW_JAX_NEW(kDecoupled, true)
  ADAMW_JAX_NEW(kL2, false)
  ADAMW_JAX_NEW(kL2, true)
#undef ADAMW_JAX_NEW
#undef ADAMW_JAX_CASE
  return ffi::Error::InvalidArgument("adamw_jax_lowmem_step: unknown decay " +
                                     std::to_string(decay));
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("adamw_jax_lowmem_step: " + what);
}

// The operands and results of one call, in _native_lowmem.py's order.
class Reader {
 public:
  Reader(ffi::RemainingArgs args, ffi::RemainingRets rets) : args_(args), rets_(rets) {}

  ffi::ErrorOr<ffi::AnyBuffer> Arg() {
    if (a_ >= args_.size()) return ffi::Unexpected(Invalid("too few operands"));
    return args_.get<ffi::AnyBuffer>(a_++);
  }

  ffi::ErrorOr<void*> Ret() {
    if (r_ >= rets_.size()) return ffi::Unexpected(Invalid("too few results"));
    auto r = rets_.get<ffi::AnyBuffer>(r_++);
    if (r.has_error()) return ffi::Unexpected(r.error());
    return (*r)->untyped_data();
  }

  // An operand updated in place (aliased to its result): the result's memory, holding the
  // operand's bytes, and the operand's element count and type.
  ffi::Error InPlace(void** data, size_t* count, ffi::DataType* type) {
    auto in = Arg();
    if (in.has_error()) return in.error();
    auto out = Ret();
    if (out.has_error()) return out.error();
    if (*out != in->untyped_data()) {
      std::copy_n(static_cast<const char*>(in->untyped_data()), in->size_bytes(),
                  static_cast<char*>(*out));
    }
    *data = *out;
    *count = in->element_count();
    *type = in->element_type();
    return ffi::Error::Success();
  }

  bool Done() const { return a_ == args_.size() && r_ == rets_.size(); }

 private:
  ffi::RemainingArgs args_;
  ffi::RemainingRets rets_;
  size_t a_ = 0, r_ = 0;
};

ffi::ErrorOr<int> TypeOf(ffi::DataType t) {
  switch (t) {
    case ffi::F32:
      return kF32;
    case ffi::BF16:
      return kBF16;
    case ffi::F16:
      return kF16;
    default:
      return ffi::Unexpected(Invalid("a float32, bfloat16 or float16 array was expected"));
  }
}

ffi::Error ReadStream(Reader& in, int64_t n, Stream& s) {
  auto arg = in.Arg();
  if (arg.has_error()) return arg.error();
  auto type = TypeOf(arg->element_type());
  if (type.has_error()) return type.error();
  if (static_cast<int64_t>(arg->element_count()) != n) return Invalid("operand of another size");
  s.type = *type;
  s.data = arg->untyped_data();
  return ffi::Error::Success();
}

ffi::Error ReadInPlace(Reader& in, int64_t n, Stream& s) {
  size_t count;
  ffi::DataType t;
  if (auto e = in.InPlace(&s.data, &count, &t); e.failure()) return e;
  auto type = TypeOf(t);
  if (type.has_error()) return type.error();
  if (static_cast<int64_t>(count) != n) return Invalid("state of another size");
  s.type = *type;
  return ffi::Error::Success();
}

ffi::Error ReadMoment(Reader& in, bool quantized, const QuantMap* map, int64_t n, Moment& m) {
  m.quantized = quantized;
  if (!quantized) return ReadInPlace(in, n, m.full);
  size_t codes, blocks;
  ffi::DataType codes_type, scale_type;
  void *codes_data, *scale_data;
  if (auto e = in.InPlace(&codes_data, &codes, &codes_type); e.failure()) return e;
  if (auto e = in.InPlace(&scale_data, &blocks, &scale_type); e.failure()) return e;
  const int64_t c = static_cast<int64_t>(codes), b = static_cast<int64_t>(blocks);
  if (codes_type != ffi::U8 || scale_type != ffi::F32 || b == 0 || n % b != 0 ||
      (c != n && 2 * c != n) || (c != n && (n / b) % 2 != 0)) {
    return Invalid("a quantized moment must be uint8 codes and float32 scales of whole blocks");
  }
  m.q = Quantized{static_cast<uint8_t*>(codes_data), static_cast<float*>(scale_data), map,
                  c == n ? 8 : 4, n / b};
  return ffi::Error::Success();
}

ffi::Error ReadLeaf(Reader& in, int64_t flags, const Config& cfg, bool amsgrad, int compute,
                    int64_t small, const QuantMap maps[2], LowLeaf& l) {
  auto g = in.Arg();
  if (g.has_error()) return g.error();
  l.n = static_cast<int64_t>(g->element_count());
  auto gt = TypeOf(g->element_type());
  if (gt.has_error()) return gt.error();
  l.g = Stream{g->untyped_data(), *gt};
  if (flags & kHasParam) {
    if (auto e = ReadStream(in, l.n, l.p); e.failure()) return e;
  }
  auto out = in.Ret();
  if (out.has_error()) return out.error();
  // The result's dtype: the parameter's, or the gradient's for the step alone (mode 0); the
  // remainder writer's update is float32.
  const bool update = cfg.mode == kStep || cfg.mode == kUpdate;
  l.out = Stream{*out, cfg.writer == kRemainder ? (update ? kF32 : l.p.type)
                                                : (cfg.mode == kStep ? l.g.type : l.p.type)};
  const bool quantized = (flags & kQuantized) != 0;
  if (auto e = ReadMoment(in, quantized, &maps[0], l.n, l.m); e.failure()) return e;
  if (auto e = ReadMoment(in, quantized, &maps[1], l.n, l.v); e.failure()) return e;
  if (amsgrad) {
    if (auto e = ReadMoment(in, quantized, &maps[1], l.n, l.vm); e.failure()) return e;
  }
  if ((flags & kHasBuffer) && cfg.writer == kRemainder) {
    size_t count;
    ffi::DataType t;
    if (auto e = in.InPlace(&l.buffer.data, &count, &t); e.failure()) return e;
    if (t != ffi::S16 || static_cast<int64_t>(count) != l.n) {
      return Invalid("the remainders must be int16 of the parameter's size");
    }
    l.buffer.type = kInt16;
  } else if (flags & kHasBuffer) {
    if (auto e = ReadInPlace(in, l.n, l.buffer); e.failure()) return e;
  }
  if (flags & kHasKey) {
    auto key = in.Arg();
    if (key.has_error()) return key.error();
    if (key->element_type() != ffi::U32 || key->element_count() != 2) return Invalid("bad key");
    std::copy_n(static_cast<const uint32_t*>(key->untyped_data()), 2, l.key);
  }
  if (quantized) {
    const int64_t block = l.m.q.block;
    if (l.v.q.block != block || (amsgrad && l.vm.q.block != block)) {
      return Invalid("moments of one leaf in different blocks");
    }
    l.chunk = std::max(block, kChunk / block * block);
  }
  l.markstein = compute != kF32 && l.n >= small;
  const bool needs_p = cfg.writer != kNearest || cfg.mode != kStep;
  if (needs_p && l.p.data == nullptr) return Invalid("the parameter is needed");
  if (cfg.writer == kStochastic && (l.p.type != kBF16 || !(flags & kHasKey))) {
    return Invalid("stochastic rounding writes bfloat16 parameters with a key");
  }
  if (cfg.writer == kKahan && (l.p.type == kF32 || l.buffer.type != l.p.type)) {
    return Invalid("Kahan compensation writes bfloat16/float16 parameters with a buffer");
  }
  if (cfg.writer == kRemainder && (l.p.type != kBF16 || l.buffer.type != kInt16)) {
    return Invalid("the remainder writer writes bfloat16 parameters with int16 remainders");
  }
  return ffi::Error::Success();
}

Scalars<float> ComputeScalars(const float* s, int compute) {
  Scalars<float> c = ReadScalars(s);
  if (compute == kBF16) {
    c.inv_bc2_sqrt = Round<kBF16>(1.0f / c.bc2_sqrt);
    c.max = FromBF16(0x7F7F);
  } else if (compute == kF16) {
    c.inv_bc2_sqrt = Round<kF16>(1.0f / c.bc2_sqrt);
    c.max = 65504.0f;
  }
  return c;
}

ffi::Error LowmemStep(ffi::ThreadPool pool, ffi::AnyBuffer scalars, ffi::RemainingArgs args,
                      ffi::RemainingRets rets, int64_t mode, int64_t decay, bool amsgrad,
                      int64_t writer, int64_t compute, int64_t small, int64_t bits,
                      ffi::Span<const int64_t> qparams, ffi::Span<const int64_t> flags) {
  if (scalars.element_type() != ffi::F32 || scalars.element_count() != 9) {
    return Invalid("the scalars must be float32[9]");
  }
  if (mode < kStep || mode > kFusedStep || writer < kNearest || writer > kRemainder ||
      compute < kF32 || compute > kF16 || (writer != kNearest && compute != kF32)) {
    return Invalid("unknown mode, writer or compute dtype");
  }
  const Config cfg{mode, writer};
  Reader in(args, rets);
  QuantMap maps[2];
  if (bits != 0) {
    if (qparams.size() != 4) return Invalid("qparams: e_lo and mbits of two maps");
    for (int k = 0; k < 2; ++k) {
      auto map = in.Arg();
      auto table = in.Arg();
      if (map.has_error() || table.has_error()) return Invalid("missing quantization map");
      const int size = static_cast<int>(map->element_count());
      const int e_lo = static_cast<int>(qparams[2 * k]), mbits = static_cast<int>(qparams[2 * k + 1]);
      if (map->element_type() != ffi::F32 || size < 2 || size > kMaxMap ||
          table->element_type() != ffi::U32 || mbits < 1 || mbits > 22 || e_lo < 1 ||
          e_lo > 127 ||
          static_cast<int64_t>(table->element_count()) != QuantMap::Entries(e_lo, mbits)) {
        return Invalid("bad quantization map or table");
      }
      maps[k].Init(static_cast<const float*>(map->untyped_data()), size,
                   static_cast<const uint32_t*>(table->untyped_data()), e_lo, mbits);
    }
  }
  std::vector<LowLeaf> leaves(flags.size());
  for (size_t i = 0; i < flags.size(); ++i) {
    if ((flags[i] & kQuantized) && bits == 0) return Invalid("a quantized leaf without maps");
    if (auto e = ReadLeaf(in, flags[i], cfg, amsgrad, static_cast<int>(compute), small, maps,
                          leaves[i]);
        e.failure()) {
      return e;
    }
  }
  if (!in.Done()) return Invalid("operand count mismatch");
  const Scalars<float> c = ComputeScalars(static_cast<const float*>(scalars.untyped_data()),
                                          static_cast<int>(compute));
  switch (compute) {
    case kBF16:
      return DispatchE<kBF16>(pool, cfg, c, leaves, decay, amsgrad);
    case kF16:
      return DispatchE<kF16>(pool, cfg, c, leaves, decay, amsgrad);
    default:
      return DispatchE<kF32>(pool, cfg, c, leaves, decay, amsgrad);
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamwJaxLowmemStep, LowmemStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("decay")
                                  .Attr<bool>("amsgrad")
                                  .Attr<int64_t>("writer")
                                  .Attr<int64_t>("compute")
                                  .Attr<int64_t>("small")
                                  .Attr<int64_t>("bits")
                                  .Attr<ffi::Span<const int64_t>>("qparams")
                                  .Attr<ffi::Span<const int64_t>>("flags"));
