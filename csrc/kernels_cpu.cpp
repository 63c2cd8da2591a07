// CPU backend: one pass over the buffers, split across OpenMP threads and vectorized by the
// compiler (the functors are branch-free, the bf16/f16 conversions included). CMake compiles
// this file once per x86-64 ISA level, each into its own namespace (EASGD_CPU_ISA); the
// dispatcher in cpu_dispatch.cpp picks the best one the running CPU supports.
#include <algorithm>
#include <cmath>
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


// ---- the quantized wires (quantize.h): block kernels, one block of kQuantBlock elements per step

// A block's levels into its record: one byte each at 8 bits, packed below (the tail of a
// block beyond the piece packs zeros, inside the owner's padded chunk).
template <int Bits>
void store_levels(const int8_t* levels, uint8_t* packed) {
  using P = Packing<Bits>;
  if constexpr (Bits == 8) {
    std::memcpy(packed, levels, kQuantBlock);
  } else {
    for (int j = 0; j < kQuantBlock / P::kPerByte; ++j) packed[j] = P::byte(levels + j * P::kPerByte);
  }
}

// A whole block's levels out of its record, as int8 (the record holds whole blocks: a tail
// block's padding unpacks as zeros). Byte by byte, with the values of a byte in an inner loop
// of constant length: GCC vectorizes this (shifts and byte shuffles), not the per-element
// divide and modulo of Packing::get.
// At 2 bits GCC does not vectorize that loop: a table gives a byte's four levels at once.
struct TwoBitTable {
  uint32_t levels[256];
  TwoBitTable() {
    for (int b = 0; b < 256; ++b) {
      const uint8_t byte = uint8_t(b);
      int8_t four[4];
      for (int i = 0; i < 4; ++i) four[i] = Packing<2>::get(&byte, i);
      std::memcpy(&levels[b], four, 4);
    }
  }
};

template <int Bits>
void load_levels(const uint8_t* __restrict__ packed, int8_t* __restrict__ levels) {
  constexpr int per_byte = Packing<Bits>::kPerByte;
  if constexpr (Bits == 2) {
    static const TwoBitTable table;
    for (int j = 0; j < kQuantBlock / per_byte; ++j) std::memcpy(levels + 4 * j, &table.levels[packed[j]], 4);
    return;
  }
  for (int j = 0; j < kQuantBlock / per_byte; ++j) {
    const uint8_t b = packed[j];
    for (int i = 0; i < per_byte; ++i)
      levels[j * per_byte + i] = int8_t(int8_t(uint8_t(b << (8 - Bits - i * Bits))) >> (8 - Bits));
  }
}

template <typename X, QuantRule R, bool Keep, int Bits>
bool quantized_send(const QuantizedSendArgs& a, int num_threads) {
  const QuantLayout& l = a.layout;
  const X* x = static_cast<const X*>(a.x);
  const X* last = static_cast<const X*>(a.x_last);
  const float* residual = a.residual;
  float* keep = a.keep;
  const int64_t blocks = l.blocks();
  int seen = 0;
  (void)num_threads;
#pragma omp parallel for schedule(static) num_threads(threads_for(l.n, num_threads)) reduction(| : seen)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kQuantBlock;
    const int64_t len = std::min<int64_t>(kQuantBlock, l.n - begin);
    float v[kQuantBlock];
    uint32_t m = 0;
    const X* __restrict__ xb = x + begin;
    const float* __restrict__ cb = R == QuantRule::elastic ? a.center + begin : nullptr;
    const X* __restrict__ lb = R == QuantRule::downpour ? last + begin : nullptr;
    const float* __restrict__ rb = residual + begin;
    float* __restrict__ kb = Keep ? keep + begin : nullptr;
    for (int64_t k = 0; k < len; ++k) {
      float d;
      if constexpr (R == QuantRule::elastic) d = a.alpha * (to_float(xb[k]) - cb[k]);
      else if constexpr (R == QuantRule::downpour) d = to_float(xb[k]) - to_float(lb[k]);
      else d = to_float(xb[k]);
      if constexpr (Keep) kb[k] = d;
      v[k] = d + rb[k];
      const uint32_t bits = abs_bits(v[k]);
      m = bits > m ? bits : m;
    }
    seen |= int(m >= 0x7f800000u);  // an Inf or a NaN in the block
    const Place p = place(l, begin);
    uint8_t* rec = a.records + p.owner * l.record;
    constexpr float levels = quant_levels(Bits);
    const BlockScale s = block_scale(bits_float(m), levels);
    l.scales(rec)[p.block] = s.scale;
    uint8_t* packed = l.q(rec) + l.q_byte(p.index);
    if constexpr (Bits == 8) {
      int8_t* q = reinterpret_cast<int8_t*>(packed);
      for (int64_t k = 0; k < len; ++k) q[k] = quantize_level<Bits>(v[k], s.inv);
    } else {
      int8_t q[kQuantBlock] = {};
      for (int64_t k = 0; k < len; ++k) q[k] = quantize_level<Bits>(v[k], s.inv);
      store_levels<Bits>(q, packed);
    }
  }
  return seen != 0;
}

void publish_records(const PublishRecordsArgs& a) {
  const QuantLayout& l = a.layout;
  const float flag = *a.me_bad;
  for (int w = 0; w < l.world; ++w) {
    uint8_t* rec = a.records + w * l.record;
    *QuantLayout::flag(rec) = flag;
    if (flag != 0.f) std::memset(rec + kHeaderBytes, 0, size_t(l.record - kHeaderBytes));
  }
}

template <int Bits>
void quantized_reduce(const QuantizedReduceArgs& a, int num_threads) {
  const QuantLayout& l = a.layout;
  float bad = 0.f;
  for (int w = 0; w < l.world; ++w) bad += *QuantLayout::flag(a.received + w * l.record);
  *QuantLayout::flag(a.own) = bad;
  const bool keep_residual = a.policy == OnNonFinite::skip && bad != 0.f;  // nothing applies
  const int64_t blocks = l.chunk_blocks();
  (void)num_threads;
#pragma omp parallel for schedule(static) num_threads(threads_for(l.chunk, num_threads))
  for (int64_t jb = 0; jb < blocks; ++jb) {
    const int64_t begin = jb * kQuantBlock;
    float s[kQuantBlock] = {};
    for (int w = 0; w < l.world; ++w) {
      const uint8_t* rec = a.received + w * l.record;
      const float scale = l.scales(rec)[jb];
      int8_t q[kQuantBlock];
      load_levels<Bits>(l.q(rec) + l.q_byte(begin), q);
      for (int k = 0; k < kQuantBlock; ++k) s[k] += dequantize(q[k], scale);
    }
    uint32_t m = 0;
    for (int k = 0; k < kQuantBlock; ++k) {
      s[k] += a.server_residual[begin + k];
      const uint32_t bits = abs_bits(s[k]);
      m = bits > m ? bits : m;
    }
    constexpr float levels = quant_levels(Bits);
    const BlockScale bs = block_scale(bits_float(m), levels);
    l.scales(a.own)[jb] = bs.scale;
    int8_t q[kQuantBlock];
    for (int k = 0; k < kQuantBlock; ++k) q[k] = quantize_level<Bits>(s[k], bs.inv);
    store_levels<Bits>(q, l.q(a.own) + l.q_byte(begin));
    if (!keep_residual) {
      for (int k = 0; k < kQuantBlock; ++k) a.server_residual[begin + k] = s[k] - dequantize(q[k], bs.scale);
    }
  }
}

template <typename X, QuantRule R, bool Keep, int Bits>
void quantized_apply(const QuantizedApplyArgs& a, int num_threads) {
  const QuantLayout& l = a.layout;
  const float bad = *QuantLayout::flag(a.gathered);  // every owner's header holds the same count
  if (a.verdict != nullptr) *a.verdict = bad;
  if (a.policy == OnNonFinite::skip && bad != 0.f) return;
  const bool reset = a.policy == OnNonFinite::reset && a.me_bad != nullptr && *a.me_bad != 0.f;
  X* x = static_cast<X*>(a.x);
  X* last = static_cast<X*>(a.x_last);
  float* center = a.center;
  float* residual = a.residual;
  const float* keep = a.keep;
  const int64_t blocks = l.blocks();
  (void)num_threads;
#pragma omp parallel for schedule(static) num_threads(threads_for(l.n, num_threads))
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kQuantBlock;
    const int64_t len = std::min<int64_t>(kQuantBlock, l.n - begin);
    const Place p = place(l, begin);
    const uint8_t* got = a.gathered + p.owner * l.record;
    const uint8_t* sent = a.sent + p.owner * l.record;
    const float got_scale = l.scales(got)[p.block], sent_scale = l.scales(sent)[p.block];
    int8_t got_levels[Bits == 8 ? 1 : kQuantBlock], sent_levels[Bits == 8 ? 1 : kQuantBlock];
    const int8_t* got_q;
    const int8_t* sent_q;
    if constexpr (Bits == 8) {
      got_q = reinterpret_cast<const int8_t*>(l.q(got) + p.index);
      sent_q = reinterpret_cast<const int8_t*>(l.q(sent) + p.index);
    } else {
      load_levels<Bits>(l.q(got) + l.q_byte(p.index), got_levels);
      load_levels<Bits>(l.q(sent) + l.q_byte(p.index), sent_levels);
      got_q = got_levels;
      sent_q = sent_levels;
    }
    float* __restrict__ rb = residual + begin;
    const float* __restrict__ kb = Keep ? keep + begin : nullptr;
    if constexpr (R == QuantRule::given) {  // the sum into x (float32) for the rule's own apply
      if constexpr (Keep) {
        float* __restrict__ sb = static_cast<float*>(a.x) + begin;
        for (int64_t k = 0; k < len; ++k) {
          rb[k] = select(reset, rb[k], (kb[k] + rb[k]) - dequantize(sent_q[k], sent_scale));
          sb[k] = dequantize(got_q[k], got_scale);
        }
      }
      continue;
    }
    // Distinct buffers (the bindings check): restrict lets the compiler vectorize. A 16-bit x
    // goes through float scratch (one loop per conversion): with 16-bit, 8-bit and 32-bit
    // values in one loop GCC vectorizes nothing.
    X* __restrict__ xb = x + begin;
    X* __restrict__ lb = R == QuantRule::downpour ? last + begin : nullptr;
    float* __restrict__ cb = center + begin;
    float xf[kQuantBlock], lf[kQuantBlock], xn[kQuantBlock];
    for (int64_t k = 0; k < len; ++k) xf[k] = to_float(xb[k]);
    if constexpr (R == QuantRule::downpour && !Keep) {
      for (int64_t k = 0; k < len; ++k) lf[k] = to_float(lb[k]);
    }
    for (int64_t k = 0; k < len; ++k) {
      float d;
      if constexpr (Keep) d = kb[k];
      else if constexpr (R == QuantRule::elastic) d = a.alpha * (xf[k] - cb[k]);
      else d = xf[k] - lf[k];
      const QuantApplied out = quant_apply_element<R>(xf[k], cb[k], rb[k], d, dequantize(got_q[k], got_scale),
                                                      dequantize(sent_q[k], sent_scale), reset);
      xn[k] = out.x;
      cb[k] = out.c;
      rb[k] = out.r;
    }
    for (int64_t k = 0; k < len; ++k) xb[k] = from_float<X>(xn[k]);
    if constexpr (R == QuantRule::downpour) {
      for (int64_t k = 0; k < len; ++k) lb[k] = from_float<X>(xn[k]);
    }
  }
}

// Calls f(rule, X{}, keep, bits) with the compile-time rule, parameter type, keep flag and
// width of a call.
template <typename A, typename F> void for_rule(const A& a, F&& f) {
  dispatch_dtype(a.x_dtype, [&](auto xt) {
    const bool keep = a.keep != nullptr;
    auto with_keep = [&](auto rule) {
      with_bits(a.layout.bits, [&](auto bits) {
        if (keep) f(rule, xt, std::true_type{}, bits);
        else f(rule, xt, std::false_type{}, bits);
      });
    };
    if (a.rule == QuantRule::elastic) with_keep(std::integral_constant<int, 0>{});
    else if (a.rule == QuantRule::downpour) with_keep(std::integral_constant<int, 1>{});
    else with_keep(std::integral_constant<int, 2>{});
  });
}

void run_special(const QuantizedSendArgs& a, int64_t, int threads) {
  bool seen = false;
  for_rule(a, [&](auto rule, auto xt, auto keep, auto bits) {
    seen = quantized_send<decltype(xt), QuantRule(decltype(rule)::value), decltype(keep)::value,
                          decltype(bits)::value>(a, threads);
  });
  if (seen && a.nonfinite != nullptr) *a.nonfinite = 1.f;
}

void run_special(const QuantizedApplyArgs& a, int64_t, int threads) {
  for_rule(a, [&](auto rule, auto xt, auto keep, auto bits) {
    quantized_apply<decltype(xt), QuantRule(decltype(rule)::value), decltype(keep)::value,
                    decltype(bits)::value>(a, threads);
  });
}

void run_special(const PublishRecordsArgs& a, int64_t, int) { publish_records(a); }
void run_special(const QuantizedReduceArgs& a, int64_t, int threads) {
  with_bits(a.layout.bits, [&](auto bits) { quantized_reduce<decltype(bits)::value>(a, threads); });
}
void run_special(const ZeroArgs& a, int64_t, int) { std::memset(a.ptr, 0, a.bytes); }
void run_special(const PublishFlagArgs& a, int64_t n, int) { publish_flag(a, n); }

}  // namespace

void launch(const KernelCall& call, int64_t numel, const Exec& exec) {
  const CpuLauncher launcher{exec.num_threads};
  std::visit([&](const auto& a) {
    using A = std::decay_t<decltype(a)>;
    if constexpr (is_elementwise<A>::value) {
      if (numel > 0) for_functor(a, numel, launcher);
    } else {
      run_special(a, numel, exec.num_threads);
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
