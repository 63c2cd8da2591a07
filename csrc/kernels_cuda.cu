// CUDA backend: one grid-stride pass over the buffers on the caller's stream, never a device
// synchronize. When every pointer is aligned for 8-element vectors (the usual case: torch's
// allocator and our flat buffers align to 256+ bytes) each thread moves 16- or 32-byte vectors;
// otherwise (a view at an odd offset) a scalar loop handles any element alignment.
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace easgd {
namespace {

constexpr int kVec = 8;        // elements per vector: 32 B of float32, 16 B of bf16/f16
constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;  // 8 x 256 threads fill an SM (2048 threads) in one wave

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("easgd_ext: CUDA error in ") + what + ": " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

template <typename F>
__global__ void __launch_bounds__(kThreads) vector_kernel(F f, int64_t n_vec, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t j = tid; j < n_vec; j += stride) f.template apply<kVec>(j * kVec);
  const int64_t tail = n_vec * kVec + tid;  // fewer than kVec leftover elements
  if (tail < n) f.template apply<1>(tail);
}

template <typename F> __global__ void __launch_bounds__(kThreads) scalar_kernel(F f, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    f.template apply<1>(i);
}

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= int(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    check(cudaDeviceGetAttribute(&cache[device], cudaDevAttrMultiProcessorCount, device),
          "cudaDeviceGetAttribute");
  }
  return cache[device];
}

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

struct CudaLauncher {
  cudaStream_t stream;
  int max_blocks;

  template <typename F> void operator()(const F& f, int64_t n) const {
    const bool vec = f.template vectorizable<kVec>();
    const int64_t items = vec ? n / kVec : n;
    const int64_t wanted = (std::max<int64_t>(items, 1) + kThreads - 1) / kThreads;
    const int blocks = int(std::min<int64_t>(wanted, max_blocks));
    if (vec) {
      vector_kernel<<<blocks, kThreads, 0, stream>>>(f, items, n);
    } else {
      scalar_kernel<<<blocks, kThreads, 0, stream>>>(f, n);
    }
    check(cudaGetLastError(), "kernel launch");
  }
};

}  // namespace

int cuda::device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error; no GPU is not a failure here
    return 0;
  }
  return count;
}

bool cuda::host_register(void* ptr, size_t bytes) {
  if (device_count() == 0) return false;
  // Portable: pinned for every context of this process, whichever device the worker uses.
  const cudaError_t err = cudaHostRegister(ptr, bytes, cudaHostRegisterPortable);
  if (err == cudaErrorHostMemoryAlreadyRegistered) {
    cudaGetLastError();
    return false;  // someone else pinned it and will unpin it
  }
  check(err, "cudaHostRegister of the shared center");
  return true;
}

void cuda::host_unregister(void* ptr) {
  if (cudaHostUnregister(ptr) != cudaSuccess) cudaGetLastError();  // at exit the context may be gone
}

void cuda::launch(Kernel kernel, const KernelArgs& args, const Exec& exec) {
  if (args.numel == 0) return;
  DeviceGuard guard(exec.device);
  const CudaLauncher launcher{reinterpret_cast<cudaStream_t>(exec.stream),
                              sm_count(exec.device) * kBlocksPerSm};
  run_kernel(kernel, args, launcher);
}

}  // namespace easgd
