// The kernels' named argument structs, the variant that carries any one of them, and the
// dtype dispatch shared by both backends. A backend supplies a launcher (`launcher(functor, n)`)
// and calls for_functor with it, so the mapping from arguments to a functor exists once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <variant>

#include "elastic_ops.h"

namespace easgd {

// A buffer that has passed validation: contiguous, of the call's element count, of `dtype`.
struct Buf {
  void* ptr = nullptr;
  DType dtype = DType::f32;
  template <typename T> T* as() const { return static_cast<T*>(ptr); }
  Buf offset(int64_t elements) const {
    return Buf{static_cast<char*>(ptr) + elements * dtype_size(dtype), dtype};
  }
};

// The exchange's verdict, as the bindings hand it over: `bad_ranks` points at one element of
// dtype `bad_dtype` (the all-reduced flag in the wire buffer), `me_bad` at this rank's float32
// flag. Null pointers: unguarded.
struct GuardArgs {
  const void* bad_ranks = nullptr;
  DType bad_dtype = DType::f32;
  const float* me_bad = nullptr;
  OnNonFinite policy = OnNonFinite::skip;
  int world = 0;
  float* verdict = nullptr;

  Guard guard() const { return Guard{bad_ranks, me_bad, policy, world, verdict}; }
};

// One struct per kernel, fields named as in the Python API. `nonfinite`: where the kernel sets
// 1.0f when it sees an Inf/NaN it was asked to report (null: do not report).
struct ElasticDifferenceArgs { Buf x, center, wire; float alpha = 0.f; float* nonfinite = nullptr; };
struct SyncApplyArgs { Buf x, center, reduced; float alpha = 0.f; GuardArgs guard; float* nonfinite = nullptr; };
struct AsyncExchangeArgs { Buf x, center; float alpha = 0.f; GuardArgs guard; };
struct DownpourPushArgs { Buf x, x_last, wire; float* nonfinite = nullptr; };
struct DownpourPullArgs { Buf center, reduced, x, x_last; GuardArgs guard; float* nonfinite = nullptr; };
struct DownpourAsyncExchangeArgs { Buf x, x_last, center; GuardArgs guard; };
struct AverageSendArgs { Buf x, wire; float* nonfinite = nullptr; };
struct AverageApplyArgs { Buf x, reduced; float scale = 1.f; GuardArgs guard; float* nonfinite = nullptr; };
struct CheckFiniteArgs { Buf x; float* nonfinite = nullptr; };
struct CopyArgs { Buf dst, src; };
// Not element-wise: header[0] = *me_bad (this rank's flag, into the wire so it travels in the
// all-reduce) and, if it is set, wire = 0 so the sum carries only the healthy ranks.
struct PublishFlagArgs { Buf wire, header; const float* me_bad = nullptr; };
// Zeroes `bytes` bytes (the exchange's status flags) in stream order.
struct ZeroArgs { void* ptr = nullptr; size_t bytes = 0; };

using KernelCall = std::variant<ElasticDifferenceArgs, SyncApplyArgs, AsyncExchangeArgs,
                                DownpourPushArgs, DownpourPullArgs, DownpourAsyncExchangeArgs,
                                AverageSendArgs, AverageApplyArgs, CheckFiniteArgs, CopyArgs,
                                PublishFlagArgs, ZeroArgs>;

// Where and how to run: device < 0 is the CPU (num_threads OpenMP threads), otherwise a CUDA
// device and the caller's stream (a cudaStream_t passed as an integer, 0 = legacy default).
struct Exec {
  int device = -1;
  uintptr_t stream = 0;
  int num_threads = 1;
};

// A validated call, ready to run again and again: what the averagers build once.
struct Launch {
  KernelCall call;
  int64_t numel = 0;
  int device = -1;
};

// Calls f(X{}, W{}) with the storage types of two runtime dtypes (a parameter's and a wire's).
template <typename F> void dispatch_dtypes(DType x, DType w, F&& f) {
  dispatch_dtype(x, [&](auto xt) { dispatch_dtype(w, [&](auto wt) { f(xt, wt); }); });
}

// Calls launch(functor, n) with the functor for an element-wise call's dtypes.
template <typename Launcher>
void for_functor(const ElasticDifferenceArgs& a, int64_t n, const Launcher& launch) {
  dispatch_dtypes(a.x.dtype, a.wire.dtype, [&](auto xt, auto wt) {
    using X = decltype(xt);
    using W = decltype(wt);
    launch(ElasticDifference<X, W>{a.x.as<X>(), a.center.as<float>(), a.wire.as<W>(), a.alpha,
                                   a.nonfinite}, n);
  });
}

template <typename Launcher>
void for_functor(const SyncApplyArgs& a, int64_t n, const Launcher& launch) {
  dispatch_dtypes(a.x.dtype, a.reduced.dtype, [&](auto xt, auto wt) {
    using X = decltype(xt);
    using W = decltype(wt);
    launch(SyncApply<X, W>{a.x.as<X>(), a.center.as<float>(), a.reduced.as<W>(), a.alpha,
                           a.guard.guard(), a.nonfinite}, n);
  });
}

template <typename Launcher>
void for_functor(const AsyncExchangeArgs& a, int64_t n, const Launcher& launch) {
  dispatch_dtype(a.x.dtype, [&](auto xt) {
    using X = decltype(xt);
    launch(AsyncExchange<X>{a.x.as<X>(), a.center.as<float>(), a.alpha, a.guard.guard()}, n);
  });
}

template <typename Launcher>
void for_functor(const DownpourPushArgs& a, int64_t n, const Launcher& launch) {
  dispatch_dtypes(a.x.dtype, a.wire.dtype, [&](auto xt, auto wt) {
    using X = decltype(xt);
    using W = decltype(wt);
    launch(DownpourPush<X, W>{a.x.as<X>(), a.x_last.as<X>(), a.wire.as<W>(), a.nonfinite}, n);
  });
}

template <typename Launcher>
void for_functor(const DownpourPullArgs& a, int64_t n, const Launcher& launch) {
  dispatch_dtypes(a.x.dtype, a.reduced.dtype, [&](auto xt, auto wt) {
    using X = decltype(xt);
    using W = decltype(wt);
    launch(DownpourPull<X, W>{a.center.as<float>(), a.reduced.as<W>(), a.x.as<X>(),
                              a.x_last.as<X>(), a.guard.guard(), a.nonfinite}, n);
  });
}

template <typename Launcher>
void for_functor(const DownpourAsyncExchangeArgs& a, int64_t n, const Launcher& launch) {
  dispatch_dtype(a.x.dtype, [&](auto xt) {
    using X = decltype(xt);
    launch(DownpourAsyncExchange<X>{a.x.as<X>(), a.x_last.as<X>(), a.center.as<float>(),
                                    a.guard.guard()}, n);
  });
}

template <typename Launcher>
void for_functor(const AverageSendArgs& a, int64_t n, const Launcher& launch) {
  dispatch_dtypes(a.x.dtype, a.wire.dtype, [&](auto xt, auto wt) {
    using X = decltype(xt);
    using W = decltype(wt);
    launch(AverageSend<X, W>{a.x.as<X>(), a.wire.as<W>(), a.nonfinite}, n);
  });
}

template <typename Launcher>
void for_functor(const AverageApplyArgs& a, int64_t n, const Launcher& launch) {
  dispatch_dtypes(a.x.dtype, a.reduced.dtype, [&](auto xt, auto wt) {
    using X = decltype(xt);
    using W = decltype(wt);
    launch(AverageApply<X, W>{a.x.as<X>(), a.reduced.as<W>(), a.scale, a.guard.guard(),
                              a.nonfinite}, n);
  });
}

template <typename Launcher>
void for_functor(const CheckFiniteArgs& a, int64_t n, const Launcher& launch) {
  dispatch_dtype(a.x.dtype, [&](auto xt) {
    using X = decltype(xt);
    launch(CheckFinite<X>{a.x.as<X>(), a.nonfinite}, n);
  });
}

template <typename Launcher>
void for_functor(const CopyArgs& a, int64_t n, const Launcher& launch) {
  dispatch_dtype(a.dst.dtype, [&](auto xt) {
    using X = decltype(xt);
    launch(Copy<X>{a.dst.as<X>(), a.src.as<X>()}, n);
  });
}

// The backends. Each runs any KernelCall (the element-wise ones through for_functor).
namespace cpu {
void launch(const KernelCall& call, int64_t numel, const Exec& exec);
}

#if defined(EASGD_EXT_WITH_CUDA)
namespace cuda {
void launch(const KernelCall& call, int64_t numel, const Exec& exec);
int device_count();  // 0 (not an error) where no driver or GPU is present
// Page-locks host memory for fast, asynchronous copies (false where no GPU is usable).
bool host_register(void* ptr, size_t bytes);
void host_unregister(void* ptr);
}  // namespace cuda
#endif

// Runs a prepared launch on the CPU or the GPU its buffers live on.
inline void run(const Launch& l, uintptr_t stream, int num_threads) {
  Exec exec;
  exec.device = l.device;
  exec.stream = stream;
  exec.num_threads = num_threads < 1 ? 1 : num_threads;
  if (l.device >= 0) {
#if defined(EASGD_EXT_WITH_CUDA)
    cuda::launch(l.call, l.numel, exec);
#else
    throw std::runtime_error("easgd_ext: a CUDA launch in a build without CUDA");
#endif
  } else {
    cpu::launch(l.call, l.numel, exec);
  }
}

}  // namespace easgd
