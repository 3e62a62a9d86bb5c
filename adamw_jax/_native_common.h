// What both native kernels share: the step's scalars, the division by sqrt(1 - b2**t), and the
// parallel loop on XLA's intra-op thread pool.
//
// _native.cc (the plain kernel) and _native_lowmem.cc (the low-memory options) include it.

#ifndef ADAMW_JAX_NATIVE_COMMON_H_
#define ADAMW_JAX_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <utility>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ADAMW_JAX_X86 1
#endif

#include "xla/ffi/api/ffi.h"

// One clone per x86-64 level, picked at load time. A clone is one architecture: GCC reads
// "avx2,fma" as two clones, AVX2 without FMA and FMA without AVX2, so a CPU without AVX-512
// (AMD Zen 3) ran the AVX2 one and called fmaf() for each std::fma, unvectorized (10x slower).
#if defined(__GNUC__) && !defined(__clang__) && defined(ADAMW_JAX_X86)
#define ADAMW_JAX_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ADAMW_JAX_CLONES
#endif

namespace adamw_jax {

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
Scalars<T> ReadScalars(const T* s) {
  return Scalars<T>{s[0], s[1], s[2],       s[3], s[4], s[5], s[6], s[7], s[8],
                    T(1) / s[3], std::numeric_limits<T>::max()};
}

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

constexpr int64_t kBlock = int64_t{1} << 16;        // elements per task
constexpr int64_t kParallelMin = int64_t{1} << 15;  // below: on the calling thread only

// Runs task(0), ..., task(count - 1) on XLA's intra-op thread pool and on the
// calling thread, each with the caller's floating-point control word (XLA
// runs with denormals flushed to zero), and returns when all have run.
// `task` may refer to the caller's stack: a helper that starts after the last
// task was claimed runs none.
class ParallelFor {
 public:
  static void Run(xla::ffi::ThreadPool& pool, size_t count, bool parallel,
                  std::function<void(size_t)> task) {
    auto job = std::make_shared<Job>();
    job->task = std::move(task);
    job->count = count;
#ifdef ADAMW_JAX_X86
    job->csr = _mm_getcsr();
#endif
    const size_t threads = parallel ? static_cast<size_t>(pool.num_threads()) : 0;
    // The calling thread works too: threads - 1 helpers keep every core busy, no more.
    const size_t helpers = count == 0 || threads == 0 ? 0 : std::min(threads - 1, count - 1);
    for (size_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Work(); });
    job->Work();
    // Every task has been claimed; wait for those that other threads are running.
    while (job->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
  }

 private:
  struct Job {
    std::function<void(size_t)> task;
    size_t count = 0;
    std::atomic<size_t> next{0};
    std::atomic<size_t> done{0};
    unsigned csr = 0;

    void Work() {
#ifdef ADAMW_JAX_X86
      const unsigned saved = _mm_getcsr();
      _mm_setcsr(csr);
#endif
      for (size_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
        task(i);
        done.fetch_add(1, std::memory_order_release);
      }
#ifdef ADAMW_JAX_X86
      _mm_setcsr(saved);
#endif
    }
  };
};

}  // namespace adamw_jax

#endif  // ADAMW_JAX_NATIVE_COMMON_H_
