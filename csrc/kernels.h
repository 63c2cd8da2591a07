// The kernels' argument structs, the variant that carries any one of them, and the dtype
// dispatch shared by both backends.
//
// Every element-wise Args struct names its functor: `functor<X>()` (or `functor<X, W>()` where
// the call has a wire dtype besides the parameters', `wire_dtype()`) builds it for the storage
// types of the call's dtypes. One generic `for_functor` turns any of them into a launch, so a
// new element-wise kernel is one functor (elastic_ops.h), one Args struct here (plus its entry in
// KernelCall) and one builder in bindings.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <variant>

#include "elastic_ops.h"
#include "quantize.h"

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

// ---- element-wise kernels: fields named as in the Python API --------------------------------
// `nonfinite`: where the kernel sets 1.0f when it sees an Inf/NaN it was asked to report (null:
// do not report). `guard`: the exchange's verdict (unguarded when its pointers are null).

// `keep` (optional, wire dtype): d as sent, for an apply that comes steps later.
// Kernels with a `keep` buffer (a delayed apply) name one functor per case, so the loops of
// the usual case carry no branch on it (a runtime test stopped GCC vectorizing bf16 loops).
struct ElasticDifferenceArgs {
  Buf x, center, wire; float alpha = 0.f; float* nonfinite = nullptr; Buf keep;
  DType x_dtype() const { return x.dtype; }
  DType wire_dtype() const { return wire.dtype; }
  bool kept() const { return keep.ptr != nullptr; }
  template <typename X, typename W, bool Keep> auto functor() const {
    return ElasticDifference<X, W, Keep>{x.as<X>(), center.as<float>(), wire.as<W>(), alpha, nonfinite,
                                         keep.as<W>()};
  }
};

struct SyncApplyArgs {
  Buf x, center, reduced; float alpha = 0.f; Guard guard; float* nonfinite = nullptr; Buf keep;
  DType x_dtype() const { return x.dtype; }
  DType wire_dtype() const { return reduced.dtype; }
  bool kept() const { return keep.ptr != nullptr; }
  template <typename X, typename W, bool Keep> auto functor() const {
    return SyncApply<X, W, Keep>{x.as<X>(), center.as<float>(), reduced.as<W>(), alpha, guard, nonfinite,
                                 keep.as<W>()};
  }
};

struct OuterApplyArgs {
  Buf x, center, momentum, reduced; float alpha = 0.f, lr = 1.f, mu = 0.f; int flags = 0; Guard guard;
  float* nonfinite = nullptr; Buf keep; float pull = 1.f;
  DType x_dtype() const { return x.dtype; }
  DType wire_dtype() const { return reduced.dtype; }
  bool kept() const { return keep.ptr != nullptr; }
  template <typename X, typename W, bool Keep> auto functor() const {
    return OuterApply<X, W, Keep>{x.as<X>(), center.as<float>(), momentum.as<float>(), reduced.as<W>(), alpha,
                                  lr, mu, flags, guard, nonfinite, keep.as<W>(), pull};
  }
};

struct AsyncExchangeArgs {
  Buf x, center; float alpha = 0.f; Guard guard;
  DType x_dtype() const { return x.dtype; }
  template <typename X> auto functor() const {
    return AsyncExchange<X>{x.as<X>(), center.as<float>(), alpha, guard};
  }
};

struct DownpourPushArgs {
  Buf x, x_last, wire; float* nonfinite = nullptr;
  DType x_dtype() const { return x.dtype; }
  DType wire_dtype() const { return wire.dtype; }
  template <typename X, typename W> auto functor() const {
    return DownpourPush<X, W>{x.as<X>(), x_last.as<X>(), wire.as<W>(), nonfinite};
  }
};

struct DownpourPullArgs {
  Buf center, reduced, x, x_last; Guard guard; float* nonfinite = nullptr;
  DType x_dtype() const { return x.dtype; }
  DType wire_dtype() const { return reduced.dtype; }
  template <typename X, typename W> auto functor() const {
    return DownpourPull<X, W>{center.as<float>(), reduced.as<W>(), x.as<X>(), x_last.as<X>(), guard,
                              nonfinite};
  }
};

struct DownpourAsyncExchangeArgs {
  Buf x, x_last, center; Guard guard;
  DType x_dtype() const { return x.dtype; }
  template <typename X> auto functor() const {
    return DownpourAsyncExchange<X>{x.as<X>(), x_last.as<X>(), center.as<float>(), guard};
  }
};

struct AverageSendArgs {
  Buf x, wire; float* nonfinite = nullptr;
  DType x_dtype() const { return x.dtype; }
  DType wire_dtype() const { return wire.dtype; }
  template <typename X, typename W> auto functor() const {
    return AverageSend<X, W>{x.as<X>(), wire.as<W>(), nonfinite};
  }
};

struct AverageApplyArgs {
  Buf x, reduced; float scale = 1.f; Guard guard; float* nonfinite = nullptr;
  DType x_dtype() const { return x.dtype; }
  DType wire_dtype() const { return reduced.dtype; }
  template <typename X, typename W> auto functor() const {
    return AverageApply<X, W>{x.as<X>(), reduced.as<W>(), scale, guard, nonfinite};
  }
};

struct CheckFiniteArgs {
  Buf x; float* nonfinite = nullptr;
  DType x_dtype() const { return x.dtype; }
  template <typename X> auto functor() const { return CheckFinite<X>{x.as<X>(), nonfinite}; }
};

struct CopyArgs {
  Buf dst, src;
  DType x_dtype() const { return dst.dtype; }
  template <typename X> auto functor() const { return Copy<X>{dst.as<X>(), src.as<X>()}; }
};

// ---- the others -----------------------------------------------------------------------------------
// Not element-wise: header[0] = *me_bad (this rank's flag, into the wire so it travels in the
// all-reduce) and, if it is set, wire = 0 so the sum carries only the healthy ranks.
struct PublishFlagArgs { Buf wire, header; const float* me_bad = nullptr; };
// Zeroes `bytes` bytes (the exchange's status flags) in stream order.
struct ZeroArgs { void* ptr = nullptr; size_t bytes = 0; };

using KernelCall = std::variant<ElasticDifferenceArgs, SyncApplyArgs, OuterApplyArgs, AsyncExchangeArgs,
                                DownpourPushArgs, DownpourPullArgs, DownpourAsyncExchangeArgs,
                                AverageSendArgs, AverageApplyArgs, CheckFiniteArgs, CopyArgs,
                                PublishFlagArgs, ZeroArgs, QuantizedSendArgs, PublishRecordsArgs,
                                QuantizedReduceArgs, QuantizedApplyArgs>;

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

// ---- dispatch ---------------------------------------------------------------------------------
template <typename A, typename = void> struct is_elementwise : std::false_type {};
template <typename A>
struct is_elementwise<A, std::void_t<decltype(std::declval<const A&>().x_dtype())>> : std::true_type {};

template <typename A, typename = void> struct has_keep : std::false_type {};
template <typename A>
struct has_keep<A, std::void_t<decltype(std::declval<const A&>().kept())>> : std::true_type {};

template <typename A, typename = void> struct has_wire_dtype : std::false_type {};
template <typename A>
struct has_wire_dtype<A, std::void_t<decltype(std::declval<const A&>().wire_dtype())>> : std::true_type {};

// Calls f(X{}, W{}) with the storage types of two runtime dtypes (a parameter's and a wire's).
template <typename F> void dispatch_dtypes(DType x, DType w, F&& f) {
  dispatch_dtype(x, [&](auto xt) { dispatch_dtype(w, [&](auto wt) { f(xt, wt); }); });
}

// Calls launch(functor, n) with the functor an element-wise call names for its dtypes.
template <typename A, typename Launcher>
void for_functor(const A& a, int64_t n, const Launcher& launch) {
  if constexpr (has_keep<A>::value) {
    dispatch_dtypes(a.x_dtype(), a.wire_dtype(), [&](auto xt, auto wt) {
      using X = decltype(xt);
      using W = decltype(wt);
      if (a.kept()) launch(a.template functor<X, W, true>(), n);
      else launch(a.template functor<X, W, false>(), n);
    });
  } else if constexpr (has_wire_dtype<A>::value) {
    dispatch_dtypes(a.x_dtype(), a.wire_dtype(), [&](auto xt, auto wt) {
      launch(a.template functor<decltype(xt), decltype(wt)>(), n);
    });
  } else {
    dispatch_dtype(a.x_dtype(), [&](auto xt) { launch(a.template functor<decltype(xt)>(), n); });
  }
}

// The backends. Each runs any KernelCall (the element-wise ones through for_functor).
namespace cpu {
void launch(const KernelCall& call, int64_t numel, const Exec& exec);
}

#if defined(EASGD_EXT_WITH_CUDA)
namespace cuda {
void launch(const KernelCall& call, int64_t numel, const Exec& exec);
int device_count();  // 0 (not an error) where no driver or GPU is present
// Page-locks host memory for fast, asynchronous copies (false where no GPU is usable), with
// `device` current: no context is made on another GPU (device 0) as a side effect.
bool host_register(void* ptr, size_t bytes, int device);
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
