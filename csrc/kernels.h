// Kernel ids, their validated arguments, and the dtype dispatch shared by both backends.
// A backend supplies a launcher (`launcher(functor, n)`) and calls run_kernel with it, so the
// mapping from a kernel id to its functor exists once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "elastic_ops.h"

namespace easgd {

enum class Kernel {
  elastic_difference,       // bufs: x, center, wire;  scalar: alpha
  sync_apply,               // bufs: x, center, reduced; scalar: alpha
  async_exchange,           // bufs: x, center;        scalar: alpha
  downpour_push,            // bufs: x, x_last, wire
  downpour_pull,            // bufs: center, reduced, x, x_last
  downpour_async_exchange,  // bufs: x, x_last, center
  average_apply,            // bufs: x, reduced;       scalar: scale
};

// A buffer that has passed validation: contiguous, `numel` elements of `dtype`.
struct Buf {
  void* ptr = nullptr;
  DType dtype = DType::f32;
  template <typename T> T* as() const { return static_cast<T*>(ptr); }
};

struct KernelArgs {
  Buf bufs[4];
  int64_t numel = 0;
  float scalar = 0.f;
};

// Where and how to run: device < 0 is the CPU (num_threads OpenMP threads), otherwise a CUDA
// device and the caller's stream (a cudaStream_t passed as an integer, 0 = legacy default).
struct Exec {
  int device = -1;
  uintptr_t stream = 0;
  int num_threads = 1;
};

template <typename Launcher>
void run_kernel(Kernel kernel, const KernelArgs& a, const Launcher& launch) {
  const Buf* b = a.bufs;
  const int64_t n = a.numel;
  switch (kernel) {
    case Kernel::elastic_difference:
      return dispatch_dtype(b[0].dtype, [&](auto xt) {
        using X = decltype(xt);
        dispatch_dtype(b[2].dtype, [&](auto wt) {
          using W = decltype(wt);
          launch(ElasticDifference<X, W>{b[0].as<X>(), b[1].as<float>(), b[2].as<W>(), a.scalar}, n);
        });
      });
    case Kernel::sync_apply:
      return dispatch_dtype(b[0].dtype, [&](auto xt) {
        using X = decltype(xt);
        dispatch_dtype(b[2].dtype, [&](auto wt) {
          using W = decltype(wt);
          launch(SyncApply<X, W>{b[0].as<X>(), b[1].as<float>(), b[2].as<W>(), a.scalar}, n);
        });
      });
    case Kernel::async_exchange:
      return dispatch_dtype(b[0].dtype, [&](auto xt) {
        using X = decltype(xt);
        launch(AsyncExchange<X>{b[0].as<X>(), b[1].as<float>(), a.scalar}, n);
      });
    case Kernel::downpour_push:
      return dispatch_dtype(b[0].dtype, [&](auto xt) {
        using X = decltype(xt);
        dispatch_dtype(b[2].dtype, [&](auto wt) {
          using W = decltype(wt);
          launch(DownpourPush<X, W>{b[0].as<X>(), b[1].as<X>(), b[2].as<W>()}, n);
        });
      });
    case Kernel::downpour_pull:
      return dispatch_dtype(b[2].dtype, [&](auto xt) {
        using X = decltype(xt);
        dispatch_dtype(b[1].dtype, [&](auto wt) {
          using W = decltype(wt);
          launch(DownpourPull<X, W>{b[0].as<float>(), b[1].as<W>(), b[2].as<X>(), b[3].as<X>()}, n);
        });
      });
    case Kernel::downpour_async_exchange:
      return dispatch_dtype(b[0].dtype, [&](auto xt) {
        using X = decltype(xt);
        launch(DownpourAsyncExchange<X>{b[0].as<X>(), b[1].as<X>(), b[2].as<float>()}, n);
      });
    case Kernel::average_apply:
      return dispatch_dtype(b[0].dtype, [&](auto xt) {
        using X = decltype(xt);
        dispatch_dtype(b[1].dtype, [&](auto wt) {
          using W = decltype(wt);
          launch(AverageApply<X, W>{b[0].as<X>(), b[1].as<W>(), a.scalar}, n);
        });
      });
  }
  throw std::logic_error("easgd_ext: unknown kernel id");
}

namespace cpu {
void launch(Kernel kernel, const KernelArgs& args, const Exec& exec);
}

#if defined(EASGD_EXT_WITH_CUDA)
namespace cuda {
void launch(Kernel kernel, const KernelArgs& args, const Exec& exec);
int device_count();  // 0 (not an error) where no driver or GPU is present
// Page-locks host memory for fast, asynchronous copies (false where no GPU is usable).
bool host_register(void* ptr, size_t bytes);
void host_unregister(void* ptr);
}
#endif

}  // namespace easgd
