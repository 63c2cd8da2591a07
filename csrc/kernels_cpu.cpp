// CPU backend: one pass over the buffers, split across OpenMP threads and vectorized by the
// compiler (the functors are branch-free, the bf16/f16 conversions included). CMake compiles
// this file once per x86-64 ISA level, each into its own namespace (EASGD_CPU_ISA); the
// dispatcher in cpu_dispatch.cpp picks the best one the running CPU supports.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu_isa.h"
#include "kernels.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#ifndef EASGD_CPU_ISA
#define EASGD_CPU_ISA baseline
#endif

namespace easgd {
namespace cpu {
namespace EASGD_CPU_ISA {
namespace {

// Below this many elements thread start-up costs more than it saves.
constexpr int64_t kParallelThreshold = 1 << 15;

int threads_for(int64_t n, int requested) {
  return n >= kParallelThreshold && requested > 1 ? requested : 1;
}

struct CpuLauncher {
  int num_threads;

  // The verdict is read once per launch (it cannot change during one); a non-finite value seen
  // by any thread sets the functor's flag once, after the loop.
  template <typename F> void operator()(const F& f, int64_t n) const {
    const Decision dec = f.decide();
    record_verdict(f, dec);
    if (dec.skip) return;
    const int threads = threads_for(n, num_threads);
    const bool seen = threads > 1 ? run_parallel(f, dec, n, threads) : run_range(f, dec, 0, n);
    if (seen && f.flag() != nullptr) *f.flag() = 1.f;
  }

  // [begin, end) in this thread; whether a non-finite value was seen.
  template <typename F>
  static bool run_range(const F& f, const Decision& dec, int64_t begin, int64_t end) {
    int seen = 0;
    for (int64_t i = begin; i < end; ++i) {
      typename F::template Regs<1> r;
      f.template load<1>(i, r);
      seen |= int(f.template update<1>(r, dec));
      f.template store<1>(i, r);
    }
    return seen != 0;
  }

  // Small buffers never get here: a parallel region costs microseconds even for one thread,
  // which is what a 161-tensor model's exchange is made of.
  template <typename F>
  static bool run_parallel(const F& f, const Decision& dec, int64_t n, int threads) {
    int seen = 0;
    (void)threads;  // unused when built without OpenMP
#pragma omp parallel num_threads(threads) reduction(| : seen)
    {
#if defined(_OPENMP)
      const int64_t parts = omp_get_num_threads(), me = omp_get_thread_num();
#else
      const int64_t parts = 1, me = 0;
#endif
      // Contiguous pieces, split on multiples of 64 elements (cache lines of every dtype).
      const int64_t piece = (n / parts + 63) / 64 * 64;
      const int64_t begin = std::min(n, me * piece), end = std::min(n, begin + piece);
      seen |= int(run_range(f, dec, begin, end));
    }
    return seen != 0;
  }
};

void publish_flag(const PublishFlagArgs& a, int64_t n) {
  const float flag = *a.me_bad;
  dispatch_dtype(a.wire.dtype, [&](auto wt) {
    using W = decltype(wt);
    *a.header.as<W>() = from_float<W>(flag);
  });
  if (flag != 0.f) std::memset(a.wire.ptr, 0, size_t(n) * size_t(dtype_size(a.wire.dtype)));
}

}  // namespace

void launch(const KernelCall& call, int64_t numel, const Exec& exec) {
  const CpuLauncher launcher{exec.num_threads};
  std::visit([&](const auto& a) {
    using A = std::decay_t<decltype(a)>;
    if constexpr (std::is_same_v<A, ZeroArgs>) {
      std::memset(a.ptr, 0, a.bytes);
    } else if constexpr (std::is_same_v<A, PublishFlagArgs>) {
      publish_flag(a, numel);
    } else if (numel > 0) {
      for_functor(a, numel, launcher);
    }
  }, call);
}

void copy(void* dst, const void* src, size_t bytes, int num_threads) {
  // One contiguous piece per thread: large memcpy calls let the C library use non-temporal
  // stores, which skip reading the destination first, so this is the honest copy ceiling.
  const int threads = threads_for(int64_t(bytes / 4), num_threads);
  const size_t piece = (bytes / size_t(threads) + 63) & ~size_t(63);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int k = 0; k < threads; ++k) {
    const size_t begin = std::min(bytes, size_t(k) * piece);
    const size_t len = std::min(piece, bytes - begin);
    std::memcpy(static_cast<char*>(dst) + begin, static_cast<const char*>(src) + begin, len);
  }
}

namespace {
// Non-finite means all exponent bits set (Inf or NaN): an integer test that vectorizes.
template <typename Bits>
int64_t count_exponent_all_ones(const Bits* p, int64_t n, Bits exponent, int threads) {
  int64_t count = 0;
  (void)threads;
#pragma omp parallel for simd schedule(static) reduction(+ : count) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) count += (p[i] & exponent) == exponent;
  return count;
}
}  // namespace

int64_t count_nonfinite(const void* data, int64_t n, DType dtype, int num_threads) {
  const int threads = threads_for(n, num_threads);
  switch (dtype) {
    case DType::f32:
      return count_exponent_all_ones(static_cast<const uint32_t*>(data), n, uint32_t(0x7F800000u), threads);
    case DType::bf16:
      return count_exponent_all_ones(static_cast<const uint16_t*>(data), n, uint16_t(0x7F80u), threads);
    case DType::f16: default:
      return count_exponent_all_ones(static_cast<const uint16_t*>(data), n, uint16_t(0x7C00u), threads);
  }
}

}  // namespace EASGD_CPU_ISA
}  // namespace cpu
}  // namespace easgd
