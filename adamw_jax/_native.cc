// The native twin of adamw_jax/_kernel.py: torch's AdamW/Adam step in one pass over memory.
//
// One XLA FFI custom call ("adamw_jax_adam_step") updates any number of leaves of
// one compute dtype (float32 or float64; complex leaves are their interleaved
// real and imaginary parts). Per element it performs, in the same order and
// with the same roundings, what _kernel._real_step makes XLA emit; that order
// is written once, in adamw_jax/_kernel.py's docstring (AMSGrad's
// max propagates NaN, as XLA's; the gradient's sign is a multiplication by +-1,
// exact; the division by sqrt(1 - b2**t) is _steer.divide_by_scalar's Markstein
// step). With q = p * (1 - lr*wd) (AdamW) or q = p, and s the step (s*m)/d:
//
//   out:  s                                 (mode 0: the step, no parameter read)
//         (q + s) - p                       (mode 1: the optax update)
//         p + ((q + s) - p)                 (mode 2: update + optax.apply_updates, in place)
//         p + s                             (mode 3: mode 0 + optax.apply_updates, in place)
//         nothing: m, v, vm only            (mode 4: the pure kernel computes the step)
//
// Compiled with -ffp-contract=off, so the only fused multiply-adds are the
// std::fma calls in Block, where XLA fuses them in the pure kernel. The work is split into blocks run on XLA's intra-op
// thread pool and on the calling thread, each with the caller's floating-point
// control word (XLA runs with denormals flushed to zero).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ADAMW_JAX_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Decay : int64_t { kNoDecay = 0, kDecoupled = 1, kL2 = 2 };
enum Mode : int64_t { kStep = 0, kUpdate = 1, kFused = 2, kFusedStep = 3, kMoments = 4 };

// The order of the scalars in the first operand (see _native.py).
template <typename T>
struct Scalars {
  T one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, eps_root, step_size, decay, sign;
  T inv_bc2_sqrt;  // 1 / bc2_sqrt, rounded
  T max;           // the largest finite T
};

template <typename T>
struct Leaf {
  const T* g;
  const T* p;  // the parameter read (== out in fused mode)
  T* m;
  T* v;
  T* vm;
  T* out;
  int64_t n;
};

#if defined(__GNUC__) && !defined(__clang__) && defined(ADAMW_JAX_X86)
#define ADAMW_JAX_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define ADAMW_JAX_CLONES
#endif

// a / bc2_sqrt, correctly rounded, without a division: the product with the
// rounded reciprocal and one residual step (Markstein's theorem), as the pure
// kernel does for large arrays (_steer.divide_by_scalar; equal to the true
// quotient bit for bit, tests/test_fidelity.py). The cap keeps inf / b = inf.
template <typename T>
inline T DivideByScalar(T a, const Scalars<T>& c) {
  T q0 = a * c.inv_bc2_sqrt;
  q0 = q0 < c.max ? q0 : (q0 != q0 ? q0 : c.max);
  const T residual = std::fma(-q0, c.bc2_sqrt, a);  // exact
  return std::fma(residual, c.inv_bc2_sqrt, q0);
}

template <typename T, int64_t kDecay, bool kAmsgrad, int64_t kMode>
ADAMW_JAX_CLONES void Block(const Scalars<T> c, const T* __restrict g, const T* p, T* m, T* v,
                            T* vm, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T gi = g[i] * c.sign;
    constexpr bool kReadsP = kMode != kStep && (kMode != kMoments || kDecay == kL2);
    const T pi = kReadsP ? p[i] : T(0);
    if (kDecay == kL2) gi = std::fma(c.decay, pi, gi);
    const T mo = m[i];
    const T mi = std::fma(c.one_minus_b1, gi - mo, mo);
    const T vi = std::fma(c.one_minus_b2 * gi, gi, v[i] * c.b2);
    m[i] = mi;
    v[i] = vi;
    T vu = vi;
    if (kAmsgrad) {
      const T a = vm[i];
      vu = (a > vi || a != a) ? a : vi;
      vm[i] = vu;
    }
    if (kMode == kMoments) continue;
    vu = vu + c.eps_root;
    const T d = DivideByScalar(std::sqrt(vu), c) + c.eps;
    const T s = (c.step_size * mi) / d;
    if (kMode == kStep) {
      out[i] = s;
    } else if (kMode == kFusedStep) {
      out[i] = pi + s;
    } else {
      const T q = (kDecay == kDecoupled) ? pi * c.decay : pi;
      const T u = (q + s) - pi;
      out[i] = (kMode == kFused) ? pi + u : u;
    }
  }
}

struct Range {
  int leaf;
  int64_t start, end;
};

constexpr int64_t kBlock = int64_t{1} << 16;        // elements per task
constexpr int64_t kParallelMin = int64_t{1} << 15;  // below: on the calling thread only

template <typename T, int64_t kDecay, bool kAmsgrad, int64_t kMode>
struct Job {
  Scalars<T> c;
  std::vector<Leaf<T>> leaves;
  std::vector<Range> ranges;
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};
  unsigned csr = 0;

  void RunOne(const Range& r) {
    const Leaf<T>& l = leaves[r.leaf];
    const int64_t k = r.start;
    Block<T, kDecay, kAmsgrad, kMode>(c, l.g + k, l.p ? l.p + k : nullptr, l.m + k, l.v + k,
                                      kAmsgrad ? l.vm + k : nullptr, l.out ? l.out + k : nullptr,
                                      r.end - k);
  }

  void Work() {
#ifdef ADAMW_JAX_X86
    const unsigned saved = _mm_getcsr();
    _mm_setcsr(csr);
#endif
    for (size_t i = next.fetch_add(1); i < ranges.size(); i = next.fetch_add(1)) {
      RunOne(ranges[i]);
      done.fetch_add(1, std::memory_order_release);
    }
#ifdef ADAMW_JAX_X86
    _mm_setcsr(saved);
#endif
  }
};

template <typename T, int64_t kDecay, bool kAmsgrad, int64_t kMode>
void Run(ffi::ThreadPool& pool, const Scalars<T>& c, std::vector<Leaf<T>> leaves) {
  auto job = std::make_shared<Job<T, kDecay, kAmsgrad, kMode>>();
  job->c = c;
  job->leaves = std::move(leaves);
  int64_t total = 0;
  for (int i = 0; i < static_cast<int>(job->leaves.size()); ++i) {
    const int64_t n = job->leaves[i].n;
    total += n;
    for (int64_t k = 0; k < n; k += kBlock) job->ranges.push_back({i, k, std::min(n, k + kBlock)});
  }
#ifdef ADAMW_JAX_X86
  job->csr = _mm_getcsr();
#endif
  const size_t blocks = job->ranges.size();
  const size_t threads = total < kParallelMin ? 0 : static_cast<size_t>(pool.num_threads());
  // The calling thread works too: threads - 1 helpers keep every core busy, no more.
  const size_t helpers = blocks == 0 || threads == 0 ? 0 : std::min(threads - 1, blocks - 1);
  for (size_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  // Every block has been claimed; wait for those that other threads are running.
  while (job->done.load(std::memory_order_acquire) < job->ranges.size()) {
    std::this_thread::yield();
  }
}

template <typename T>
ffi::Error Dispatch(ffi::ThreadPool& pool, const Scalars<T>& c, std::vector<Leaf<T>> leaves,
                    int64_t mode, int64_t decay, bool amsgrad) {
#define ADAMW_JAX_CASE(D, A, M)                                        \
  if (decay == D && amsgrad == A && mode == M) {                       \
    Run<T, D, A, M>(pool, c, std::move(leaves));                       \
    return ffi::Error::Success();                                      \
  }
#define ADAMW_JAX_MODES(D, A) \
  ADAMW_JAX_CASE(D, A, kStep) ADAMW_JAX_CASE(D, A, kUpdate) \
  ADAMW_JAX_CASE(D, A, kFused) ADAMW_JAX_CASE(D, A, kFusedStep) ADAMW_JAX_CASE(D, A, kMoments)
  ADAMW_JAX_MODES(kNoDecay, false)
  ADAMW_JAX_MODES(kNoDecay, true)
  ADAMW_JAX_MODES(kDecoupled, false)
  ADAMW_JAX_MODES(kDecoupled, true)
  ADAMW_JAX_MODES(kL2, false)
  ADAMW_JAX_MODES(kL2, true)
#undef ADAMW_JAX_MODES
#undef ADAMW_JAX_CASE
  return ffi::Error::InvalidArgument("adamw_jax_adam_step: unknown mode " + std::to_string(mode) +
                                     " / decay " + std::to_string(decay));
}

// Real elements of a buffer (a complex element is two).
int64_t Elements(const ffi::AnyBuffer& b) {
  const bool complex = b.element_type() == ffi::C64 || b.element_type() == ffi::C128;
  return static_cast<int64_t>(b.element_count()) * (complex ? 2 : 1);
}

template <typename T>
ffi::Error Collect(ffi::ThreadPool& pool, const ffi::AnyBuffer& scalars, ffi::RemainingArgs args,
                   ffi::RemainingRets rets, int64_t mode, int64_t decay, bool amsgrad) {
  const T* s = reinterpret_cast<const T*>(scalars.untyped_data());
  const Scalars<T> c{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8],
                     T(1) / s[3], std::numeric_limits<T>::max()};
  const bool has_p = mode != kStep && (mode != kMoments || decay == kL2);
  const bool has_out = mode != kMoments;
  const bool in_place = mode == kFused || mode == kFusedStep;
  const size_t in_per_leaf = 3 + (amsgrad ? 1 : 0) + (has_p ? 1 : 0);
  const size_t out_per_leaf = (has_out ? 1 : 0) + 2 + (amsgrad ? 1 : 0);
  if (args.size() % in_per_leaf != 0 || rets.size() != args.size() / in_per_leaf * out_per_leaf) {
    return ffi::Error::InvalidArgument("adamw_jax_adam_step: operand count mismatch");
  }
  const size_t leaves = args.size() / in_per_leaf;
  std::vector<Leaf<T>> out(leaves);
  for (size_t i = 0; i < leaves; ++i) {
    const size_t a = i * in_per_leaf, r = i * out_per_leaf;
    auto arg = [&](size_t k) { return args.get<ffi::AnyBuffer>(a + k); };
    const size_t first = has_out ? 1 : 0;  // results: [out], m, v, [vm]
    auto ret = [&](size_t k) { return rets.get<ffi::AnyBuffer>(r + first + k); };
    auto g = arg(0), m = arg(1), v = arg(2);
    auto mo = ret(0), vo = ret(1);
    if (g.has_error() || m.has_error() || v.has_error()) return ffi::Error::InvalidArgument("bad operand");
    if (mo.has_error() || vo.has_error()) return ffi::Error::InvalidArgument("bad result");
    Leaf<T>& l = out[i];
    l.n = Elements(*g);
    l.g = reinterpret_cast<const T*>(g->untyped_data());
    l.m = reinterpret_cast<T*>((*mo)->untyped_data());
    l.v = reinterpret_cast<T*>((*vo)->untyped_data());
    l.out = nullptr;
    if (has_out) {
      auto o = rets.get<ffi::AnyBuffer>(r);
      if (o.has_error()) return ffi::Error::InvalidArgument("bad result");
      l.out = reinterpret_cast<T*>((*o)->untyped_data());
    }
    // The moments are aliased to their results: copy only if XLA did not alias them.
    if (l.m != m->untyped_data()) std::copy_n(reinterpret_cast<const T*>(m->untyped_data()), l.n, l.m);
    if (l.v != v->untyped_data()) std::copy_n(reinterpret_cast<const T*>(v->untyped_data()), l.n, l.v);
    l.vm = nullptr;
    l.p = nullptr;
    size_t next = 3;
    if (amsgrad) {
      auto vm = arg(next++);
      auto vmo = ret(2);
      if (vm.has_error() || vmo.has_error()) return ffi::Error::InvalidArgument("bad nu_max");
      l.vm = reinterpret_cast<T*>((*vmo)->untyped_data());
      if (l.vm != vm->untyped_data()) std::copy_n(reinterpret_cast<const T*>(vm->untyped_data()), l.n, l.vm);
    }
    if (has_p) {
      auto p = arg(next++);
      if (p.has_error()) return ffi::Error::InvalidArgument("bad param");
      l.p = reinterpret_cast<const T*>(p->untyped_data());
      if (in_place && l.p != l.out) {
        std::copy_n(l.p, l.n, l.out);
        l.p = l.out;
      }
    }
  }
  return Dispatch<T>(pool, c, std::move(out), mode, decay, amsgrad);
}

ffi::Error AdamStep(ffi::ThreadPool pool, ffi::AnyBuffer scalars, ffi::RemainingArgs args,
                    ffi::RemainingRets rets, int64_t mode, int64_t decay, bool amsgrad) {
  switch (scalars.element_type()) {
    case ffi::F32:
      return Collect<float>(pool, scalars, args, rets, mode, decay, amsgrad);
    case ffi::F64:
      return Collect<double>(pool, scalars, args, rets, mode, decay, amsgrad);
    default:
      return ffi::Error::InvalidArgument("adamw_jax_adam_step: scalars must be float32 or float64");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamwJaxAdamStep, AdamStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("decay")
                                  .Attr<bool>("amsgrad"));
