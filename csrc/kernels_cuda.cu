// CUDA backend: every element-wise update runs on the caller's stream, never with a device
// synchronize. Launch shape: one block per kThreads x kUnroll vectors of kVec elements, each
// thread issuing the loads of all its kUnroll vectors before any arithmetic or store. That is
// the shape reported to reach the copy bandwidth of an H100 for this kind of update (about
// 2.9 TB/s, against about 2.4 TB/s for a grid-stride loop capped at SMs x 8 blocks) in
// measurements made outside this project; this project has not measured it on a GPU yet
// (benchmarks/gpu_session.sh does, against a vectorized copy kernel). When a pointer is not
// aligned for kVec-element vectors (a view at an odd offset), a scalar grid-stride loop handles
// any element alignment.
#include <cuda_runtime.h>

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <cstdint>
#include <vector>

#include "cuda_check.h"
#include "kernels.h"

namespace easgd {
namespace {

constexpr int kVec = 8;      // elements per vector: 32 B of float32 (2 x 16 B), 16 B of bf16/f16
constexpr int kUnroll = 2;   // vectors per thread: 4 float4 of each float32 buffer in flight
constexpr int kThreads = 256;
constexpr int kScalarBlocksPerSm = 8;

template <typename F> __device__ void report(const F& f, bool seen) {
  if (seen && f.flag() != nullptr) *f.flag() = 1.f;  // any thread: all write the same value
}

template <typename F>
__global__ void __launch_bounds__(kThreads) vector_kernel(F f, int64_t n_vec, int64_t n) {
  const Decision dec = f.decide();  // every thread reads the verdict once (a cached broadcast)
  if (blockIdx.x == 0 && threadIdx.x == 0) record_verdict(f, dec);
  if (dec.skip) return;
  using R = typename F::template Regs<kVec>;
  R r[kUnroll];
  const int64_t first = int64_t(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
  bool seen = false;
  // All loads first, then the arithmetic, then the stores: kUnroll independent vectors per
  // thread in flight hide the memory latency without a grid-stride loop.
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t j = first + int64_t(u) * kThreads;
    if (j < n_vec) f.template load<kVec>(j * kVec, r[u]);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t j = first + int64_t(u) * kThreads;
    if (j < n_vec) seen |= f.template update<kVec>(r[u], dec);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t j = first + int64_t(u) * kThreads;
    if (j < n_vec) f.template store<kVec>(j * kVec, r[u]);
  }
  // Fewer than kVec elements are left after the vectors: the last block's first threads.
  if (blockIdx.x == gridDim.x - 1) {
    const int64_t i = n_vec * kVec + threadIdx.x;
    if (i < n) {
      typename F::template Regs<1> one;
      f.template load<1>(i, one);
      seen |= f.template update<1>(one, dec);
      f.template store<1>(i, one);
    }
  }
  report(f, seen);
}

template <typename F> __global__ void __launch_bounds__(kThreads) scalar_kernel(F f, int64_t n) {
  const Decision dec = f.decide();
  if (blockIdx.x == 0 && threadIdx.x == 0) record_verdict(f, dec);
  if (dec.skip) return;
  bool seen = false;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    typename F::template Regs<1> r;
    f.template load<1>(i, r);
    seen |= f.template update<1>(r, dec);
    f.template store<1>(i, r);
  }
  report(f, seen);
}

// header[0] = *me_bad; if set, the wire is zeroed. One block: it only writes when a rank has
// diverged, the rare path, and otherwise costs one tiny launch.
template <typename W>
__global__ void __launch_bounds__(kThreads) publish_flag_kernel(W* wire, W* header, const float* me_bad,
                                                                int64_t n) {
  const float flag = *me_bad;
  if (threadIdx.x == 0) *header = from_float<W>(flag);
  if (flag == 0.f) return;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) wire[i] = from_float<W>(0.f);
}

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= int(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    cuda_check(cudaDeviceGetAttribute(&cache[device], cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
  }
  return cache[device];
}

struct CudaLauncher {
  cudaStream_t stream;
  int device;

  template <typename F> void operator()(const F& f, int64_t n) const {
    if (f.template vectorizable<kVec>()) {
      const int64_t n_vec = n / kVec;
      const int64_t per_block = int64_t(kThreads) * kUnroll;
      const int64_t blocks = std::max<int64_t>(1, (n_vec + per_block - 1) / per_block);
      if (blocks > INT32_MAX) throw std::invalid_argument("easgd_ext: buffer too large for one launch");
      vector_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(f, n_vec, n);
    } else {
      const int64_t wanted = (n + kThreads - 1) / kThreads;
      const int blocks = int(std::min<int64_t>(wanted, int64_t(sm_count(device)) * kScalarBlocksPerSm));
      scalar_kernel<<<blocks, kThreads, 0, stream>>>(f, n);
    }
    cuda_check(cudaGetLastError(), "kernel launch");
  }
};


// ---- the quantized wires (quantize.h): one warp per block of kQuantBlock elements -----------
// Each lane takes kPerLane consecutive elements, so its levels fill whole bytes at every
// width (8, 4 or 2 bits: kPerLane, kPerLane / 2 or kPerLane / 4 bytes) and no two lanes share
// a byte; each lane issues all its loads before any arithmetic or store, as 16-byte vectors
// (and its packed levels as one 8-, 4- or 2-byte word) wherever the span is aligned and whole,
// element by element otherwise (a view at an odd offset, the last block's tail).
constexpr int kWarp = 32;
constexpr int kPerLane = kQuantBlock / kWarp;
constexpr int kQuantWarpsPerBlock = kThreads / kWarp;
static_assert(kPerLane % 4 == 0, "a lane's levels must fill whole bytes at 2 bits");

// The warp's maximum of |v| as bits (quantize.h: the CPU's order, NaN included).
__device__ uint32_t warp_max(uint32_t m) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  return m;
}

// A lane's kPerLane values as float32, from `avail` of them at p (the rest read as 0): 16-byte
// loads when the span is whole and aligned. Nothing at or past p + avail is read.
template <typename X> __device__ void load_span(const X* __restrict__ p, int64_t avail, float* out) {
  constexpr int kPer16 = 16 / int(sizeof(X));
  static_assert(kPerLane % kPer16 == 0, "a lane's span is whole 16-byte vectors");
  if (avail >= kPerLane && aligned_for<kPer16>(p)) {
#pragma unroll
    for (int v = 0; v < kPerLane / kPer16; ++v) {
      const Vec<X, kPer16> w = load<kPer16>(p + v * kPer16);
#pragma unroll
      for (int k = 0; k < kPer16; ++k) out[v * kPer16 + k] = to_float(w.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) out[k] = k < avail ? to_float(p[k]) : 0.f;
  }
}

// The first `avail` of a lane's kPerLane values into p, as X: 16-byte stores when whole and
// aligned.
template <typename X> __device__ void store_span(X* __restrict__ p, int64_t avail, const float* in) {
  constexpr int kPer16 = 16 / int(sizeof(X));
  if (avail >= kPerLane && aligned_for<kPer16>(p)) {
#pragma unroll
    for (int v = 0; v < kPerLane / kPer16; ++v) {
      Vec<X, kPer16> w;
#pragma unroll
      for (int k = 0; k < kPer16; ++k) w.v[k] = from_float<X>(in[v * kPer16 + k]);
      store<kPer16>(p + v * kPer16, w);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kPerLane; ++k)
      if (k < avail) p[k] = from_float<X>(in[k]);
  }
}

// A lane's packed levels: kPerLane * Bits / 8 bytes (8, 4 or 2), one word when aligned for it.
template <int Bits> struct LaneBytes {
  static constexpr int kBytes = kPerLane * Bits / 8;
  using Word = std::conditional_t<kBytes == 8, uint2, std::conditional_t<kBytes == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(Word) == kBytes, "one word per lane");
  union Bytes {
    Word word;
    uint8_t b[kBytes];
  };
  static __device__ bool aligned(const uint8_t* p) { return reinterpret_cast<uintptr_t>(p) % kBytes == 0; }
};

// A lane's kPerLane levels into / out of their packed bytes.
template <int Bits>
__device__ void store_lane(const int8_t* q, uint8_t* __restrict__ out) {
  using P = Packing<Bits>;
  using L = LaneBytes<Bits>;
  typename L::Bytes bytes;
#pragma unroll
  for (int j = 0; j < L::kBytes; ++j) bytes.b[j] = P::byte(q + j * P::kPerByte);
  if (L::aligned(out)) {
    *reinterpret_cast<typename L::Word*>(out) = bytes.word;
  } else {
#pragma unroll
    for (int j = 0; j < L::kBytes; ++j) out[j] = bytes.b[j];
  }
}

template <int Bits>
__device__ void load_lane(const uint8_t* __restrict__ in, int8_t* q) {
  using L = LaneBytes<Bits>;
  typename L::Bytes bytes;
  if (L::aligned(in)) {
    bytes.word = *reinterpret_cast<const typename L::Word*>(in);
  } else {
#pragma unroll
    for (int j = 0; j < L::kBytes; ++j) bytes.b[j] = in[j];
  }
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) q[k] = Packing<Bits>::get(bytes.b, k);
}

template <typename X, QuantRule R, int Bits>
__global__ void __launch_bounds__(kThreads) quantized_send_kernel(QuantizedSendArgs a) {
  const QuantLayout l = a.layout;
  const int64_t b = int64_t(blockIdx.x) * kQuantWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (b >= l.blocks()) return;  // whole warps leave together
  const int64_t begin = b * kQuantBlock;
  const int64_t len = min(int64_t(kQuantBlock), l.n - begin);
  const int64_t first = int64_t(lane) * kPerLane;
  const X* __restrict__ x = static_cast<const X*>(a.x) + begin + first;
  const X* __restrict__ last = R == QuantRule::downpour ? static_cast<const X*>(a.x_last) + begin + first : nullptr;
  const float* __restrict__ c = R == QuantRule::elastic ? a.center + begin + first : nullptr;
  const float* __restrict__ r = a.residual + begin + first;
  const int64_t avail = len - first;  // this lane's elements in the block (<= 0: none)
  float xf[kPerLane], other[kPerLane], rf[kPerLane];
  load_span(x, avail, xf);  // loads first
  if constexpr (R == QuantRule::elastic) load_span(c, avail, other);
  if constexpr (R == QuantRule::downpour) load_span(last, avail, other);
  load_span(r, avail, rf);
  float d[kPerLane], v[kPerLane];
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    d[k] = R == QuantRule::elastic ? a.alpha * (xf[k] - other[k])
           : R == QuantRule::downpour ? xf[k] - other[k] : xf[k];
    v[k] = k < avail ? d[k] + rf[k] : 0.f;
    m = max(m, abs_bits(v[k]));
  }
  if (a.keep != nullptr) store_span(a.keep + begin + first, avail, d);
  m = warp_max(m);
  const bool bad = m >= 0x7f800000u;
  const Place p = place(l, begin);
  uint8_t* rec = a.records + p.owner * l.record;
  constexpr float levels = quant_levels(Bits);
  const BlockScale s = block_scale(bits_float(m), levels);
  if (lane == 0) l.scales(rec)[p.block] = s.scale;
  int8_t q[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) q[k] = quantize_level<Bits>(v[k], s.inv);  // the tail's 0 -> 0
  store_lane<Bits>(q, l.q(rec) + l.q_byte(p.index + first));
  if (bad && lane == 0 && a.nonfinite != nullptr) *a.nonfinite = 1.f;
}

// Every record's header gets the flag (block 0); a flagged rank's records are zeroed past their
// headers by the whole grid (a record of a large piece is megabytes: one block would crawl).
__global__ void __launch_bounds__(kThreads) publish_records_kernel(PublishRecordsArgs a) {
  const QuantLayout l = a.layout;
  const float flag = *a.me_bad;
  if (blockIdx.x == 0) {
    for (int w = threadIdx.x; w < l.world; w += blockDim.x) *QuantLayout::flag(a.records + w * l.record) = flag;
  }
  if (flag == 0.f) return;
  const int64_t body = l.record - kHeaderBytes;
  const int64_t total = int64_t(l.world) * body;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    a.records[(i / body) * l.record + kHeaderBytes + i % body] = 0;
  }
}

template <int Bits>
__global__ void __launch_bounds__(kThreads) quantized_reduce_kernel(QuantizedReduceArgs a) {
  const QuantLayout l = a.layout;
  const int64_t jb = int64_t(blockIdx.x) * kQuantWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  float bad = 0.f;
  for (int w = 0; w < l.world; ++w) bad += *QuantLayout::flag(a.received + w * l.record);
  if (blockIdx.x == 0 && threadIdx.x == 0) *QuantLayout::flag(a.own) = bad;
  if (jb >= l.chunk_blocks()) return;
  const bool keep_residual = a.policy == OnNonFinite::skip && bad != 0.f;
  const int64_t at = jb * kQuantBlock + int64_t(lane) * kPerLane;
  float* __restrict__ residual = a.server_residual + at;
  float s[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) s[k] = 0.f;
  for (int w = 0; w < l.world; ++w) {  // ranks in order, as on the CPU
    const uint8_t* rec = a.received + w * l.record;
    const float scale = l.scales(rec)[jb];
    int8_t q[kPerLane];
    load_lane<Bits>(l.q(rec) + l.q_byte(at), q);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) s[k] += dequantize(q[k], scale);
  }
  float res[kPerLane];
  load_span(residual, kPerLane, res);  // a chunk is whole blocks: every lane's span is whole
  uint32_t m = 0;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    s[k] += res[k];
    m = max(m, abs_bits(s[k]));
  }
  m = warp_max(m);
  constexpr float levels = quant_levels(Bits);
  const BlockScale bs = block_scale(bits_float(m), levels);
  if (lane == 0) l.scales(a.own)[jb] = bs.scale;
  int8_t q[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) q[k] = quantize_level<Bits>(s[k], bs.inv);
  store_lane<Bits>(q, l.q(a.own) + l.q_byte(at));
  if (!keep_residual) {
    float left[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) left[k] = s[k] - dequantize(q[k], bs.scale);
    store_span(residual, kPerLane, left);
  }
}

template <typename X, QuantRule R, int Bits>
__global__ void __launch_bounds__(kThreads) quantized_apply_kernel(QuantizedApplyArgs a) {
  const QuantLayout l = a.layout;
  const float bad = *QuantLayout::flag(a.gathered);
  if (blockIdx.x == 0 && threadIdx.x == 0 && a.verdict != nullptr) *a.verdict = bad;
  if (a.policy == OnNonFinite::skip && bad != 0.f) return;
  const bool reset = a.policy == OnNonFinite::reset && a.me_bad != nullptr && *a.me_bad != 0.f;
  const int64_t b = int64_t(blockIdx.x) * kQuantWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (b >= l.blocks()) return;
  const int64_t begin = b * kQuantBlock;
  const int64_t len = min(int64_t(kQuantBlock), l.n - begin);
  const int64_t first = int64_t(lane) * kPerLane;
  const int64_t i0 = begin + first;
  const Place p = place(l, begin);
  const uint8_t* got = a.gathered + p.owner * l.record;
  const uint8_t* sent = a.sent + p.owner * l.record;
  const float got_scale = l.scales(got)[p.block], sent_scale = l.scales(sent)[p.block];
  X* __restrict__ x = static_cast<X*>(a.x) + i0;
  X* __restrict__ last = R == QuantRule::downpour ? static_cast<X*>(a.x_last) + i0 : nullptr;
  float* __restrict__ r = a.residual + i0;
  const float* __restrict__ keep = a.keep != nullptr ? a.keep + i0 : nullptr;
  int8_t got_q[kPerLane], sent_q[kPerLane];
  load_lane<Bits>(got + l.q_offset() + l.q_byte(p.index + first), got_q);
  load_lane<Bits>(sent + l.q_offset() + l.q_byte(p.index + first), sent_q);
  const int64_t avail = len - first;
  if constexpr (R == QuantRule::given) {  // the sum into x (float32) for the rule's own apply
    float kf[kPerLane], rf[kPerLane], rn[kPerLane], sum[kPerLane];
    load_span(keep, avail, kf);  // loads first
    load_span(r, avail, rf);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      rn[k] = select(reset, rf[k], (kf[k] + rf[k]) - dequantize(sent_q[k], sent_scale));
      sum[k] = dequantize(got_q[k], got_scale);
    }
    store_span(r, avail, rn);
    store_span(static_cast<float*>(a.x) + i0, avail, sum);  // x is the float32 sum buffer here
    return;
  }
  float* __restrict__ c = a.center + i0;
  float xf[kPerLane], cf[kPerLane], rf[kPerLane], d[kPerLane];
  load_span(x, avail, xf);  // loads first
  load_span(c, avail, cf);
  load_span(r, avail, rf);
  if (keep != nullptr) {
    load_span(keep, avail, d);
  } else if constexpr (R == QuantRule::downpour) {
    load_span(last, avail, d);  // x_last for now: d = x - x_last below
  }
  float xn[kPerLane], cn[kPerLane], rn[kPerLane];
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    if (keep == nullptr) d[k] = R == QuantRule::elastic ? a.alpha * (xf[k] - cf[k]) : xf[k] - d[k];
    const QuantApplied out = quant_apply_element<R>(xf[k], cf[k], rf[k], d[k], dequantize(got_q[k], got_scale),
                                                    dequantize(sent_q[k], sent_scale), reset);
    rn[k] = out.r;
    cn[k] = out.c;
    xn[k] = out.x;
  }
  store_span(r, avail, rn);
  store_span(c, avail, cn);
  store_span(x, avail, xn);
  if constexpr (R == QuantRule::downpour) store_span(last, avail, xn);
}

unsigned quant_grid(int64_t blocks) {
  const int64_t grid = std::max<int64_t>(1, (blocks + kQuantWarpsPerBlock - 1) / kQuantWarpsPerBlock);
  if (grid > INT32_MAX) throw std::invalid_argument("easgd_ext: buffer too large for one launch");
  return unsigned(grid);
}

template <typename A, typename F> void with_rule(const A& a, F&& f) {
  dispatch_dtype(a.x_dtype, [&](auto xt) {
    with_bits(a.layout.bits, [&](auto bits) {
      if (a.rule == QuantRule::elastic) f(std::integral_constant<int, 0>{}, xt, bits);
      else if (a.rule == QuantRule::downpour) f(std::integral_constant<int, 1>{}, xt, bits);
      else f(std::integral_constant<int, 2>{}, xt, bits);
    });
  });
}

void run_special(const QuantizedSendArgs& a, cudaStream_t stream) {
  with_rule(a, [&](auto rule, auto xt, auto bits) {
    quantized_send_kernel<decltype(xt), QuantRule(decltype(rule)::value), decltype(bits)::value>
        <<<quant_grid(a.layout.blocks()), kThreads, 0, stream>>>(a);
  });
}
void run_special(const QuantizedApplyArgs& a, cudaStream_t stream) {
  with_rule(a, [&](auto rule, auto xt, auto bits) {
    quantized_apply_kernel<decltype(xt), QuantRule(decltype(rule)::value), decltype(bits)::value>
        <<<quant_grid(a.layout.blocks()), kThreads, 0, stream>>>(a);
  });
}
void run_special(const QuantizedReduceArgs& a, cudaStream_t stream) {
  with_bits(a.layout.bits, [&](auto bits) {
    quantized_reduce_kernel<decltype(bits)::value><<<quant_grid(a.layout.chunk_blocks()), kThreads, 0, stream>>>(a);
  });
}
void run_special(const PublishRecordsArgs& a, cudaStream_t stream) {
  const int64_t total = int64_t(a.layout.world) * (a.layout.record - kHeaderBytes);
  const int64_t blocks = std::min<int64_t>(1024, std::max<int64_t>(1, (total + 4 * kThreads - 1) / (4 * kThreads)));
  publish_records_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
}

}  // namespace

int cuda::device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error; no GPU is not a failure here
    return 0;
  }
  return count;
}

bool cuda::host_register(void* ptr, size_t bytes, int device) {
  if (device_count() == 0) return false;
  DeviceGuard guard(device);
  // Portable: pinned for every context of this process, whichever device the worker uses.
  const cudaError_t err = cudaHostRegister(ptr, bytes, cudaHostRegisterPortable);
  if (err == cudaErrorHostMemoryAlreadyRegistered) {
    cudaGetLastError();
    return false;  // someone else pinned it and will unpin it
  }
  cuda_check(err, "cudaHostRegister of the shared center");
  return true;
}

void cuda::host_unregister(void* ptr) {
  if (cudaHostUnregister(ptr) != cudaSuccess) cudaGetLastError();  // at exit the context may be gone
}

void cuda::launch(const KernelCall& call, int64_t numel, const Exec& exec) {
  DeviceGuard guard(exec.device);
  const auto stream = reinterpret_cast<cudaStream_t>(exec.stream);
  const CudaLauncher launcher{stream, exec.device};
  std::visit([&](const auto& a) {
    using A = std::decay_t<decltype(a)>;
    if constexpr (std::is_same_v<A, ZeroArgs>) {
      cuda_check(cudaMemsetAsync(a.ptr, 0, a.bytes, stream), "cudaMemsetAsync");
    } else if constexpr (std::is_same_v<A, PublishFlagArgs>) {
      dispatch_dtype(a.wire.dtype, [&](auto wt) {
        using W = decltype(wt);
        publish_flag_kernel<<<1, kThreads, 0, stream>>>(a.wire.template as<W>(), a.header.template as<W>(), a.me_bad, numel);
      });
      cuda_check(cudaGetLastError(), "kernel launch");
    } else if constexpr (is_elementwise<A>::value) {
      if (numel > 0) for_functor(a, numel, launcher);
    } else {
      run_special(a, stream);
    }
    cuda_check(cudaGetLastError(), "kernel launch");
  }, call);
}

}  // namespace easgd
