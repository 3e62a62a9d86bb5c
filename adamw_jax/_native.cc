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
// std::fma calls in Block, where XLA fuses them in the pure kernel. The work is split
// into blocks run in parallel (_native_common.h's ParallelFor). The low-memory
// options have a kernel of their own, _native_lowmem.cc.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "_native_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace adamw_jax;  // _native_common.h: Scalars, DivideByScalar, ParallelFor, the enums

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

template <typename T, int64_t kDecay, bool kAmsgrad, int64_t kMode>
void Run(ffi::ThreadPool& pool, const Scalars<T>& c, const std::vector<Leaf<T>>& leaves) {
  std::vector<Range> ranges;
  int64_t total = 0;
  for (int i = 0; i < static_cast<int>(leaves.size()); ++i) {
    const int64_t n = leaves[i].n;
    total += n;
    for (int64_t k = 0; k < n; k += kBlock) ranges.push_back({i, k, std::min(n, k + kBlock)});
  }
  ParallelFor::Run(pool, ranges.size(), total >= kParallelMin, [&](size_t index) {
    const Range& r = ranges[index];
    const Leaf<T>& l = leaves[r.leaf];
    const int64_t k = r.start;
    Block<T, kDecay, kAmsgrad, kMode>(c, l.g + k, l.p ? l.p + k : nullptr, l.m + k, l.v + k,
                                      kAmsgrad ? l.vm + k : nullptr, l.out ? l.out + k : nullptr,
                                      r.end - k);
  });
}

template <typename T>
ffi::Error Dispatch(ffi::ThreadPool& pool, const Scalars<T>& c, std::vector<Leaf<T>> leaves,
                    int64_t mode, int64_t decay, bool amsgrad) {
#define ADAMW_JAX_CASE(D, A, M)                  \
  if (decay == D && amsgrad == A && mode == M) { \
    Run<T, D, A, M>(pool, c, leaves);            \
    return ffi::Error::Success();                \
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
  const Scalars<T> c = adamw_jax::ReadScalars(s);
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
