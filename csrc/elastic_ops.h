// The element-wise updates of EASGD and its baselines, written once for the CPU and CUDA
// launchers. Center and arithmetic are float32; parameters (X) and wire buffers (W) may be
// float32, bfloat16 or float16.
//
// Every functor works in three phases over V consecutive elements starting at index i (with
// V > 1 the launcher has checked that every pointer is aligned for V-wide vector loads):
//   load<V>(i, r)        read the inputs into registers `r`
//   update<V>(r, d)      compute in registers; returns true if it saw a non-finite value
//   store<V>(i, r)       write the outputs
// so a GPU thread can issue the loads of several vectors before any arithmetic or store (what
// reaches the memory-bandwidth limit), and `decide()` reads the exchange's verdict once per
// thread (CUDA) or once per launch (CPU), never per element.
//
// Every functor reads an element before writing it, so aliasing is only allowed where a
// kernel says so.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "dtypes.h"

namespace easgd {

// V elements held in registers; aligned so one V-wide load/store is one (or two) vector
// instructions on the GPU.
template <typename T, int V> struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T> EASGD_HD Vec<T, V> load(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <int V, typename T> EASGD_HD void store(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

template <int V, typename T> EASGD_HD bool aligned_for(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) == 0;
}

#if defined(__CUDACC__)
#define EASGD_UNROLL _Pragma("unroll")
#else
#define EASGD_UNROLL
#endif

// a if `pick` else b, as bit operations on a mask: a `?:` on a bool beside the float16
// conversions stops GCC from vectorizing the CPU loops (measured: 5x slower float16 kernels).
EASGD_HD float select(bool pick, float a, float b) {
  const uint32_t mask = 0u - uint32_t(pick);
  return bits_float((float_bits(a) & mask) | (float_bits(b) & ~mask));
}

// Inf or NaN: all exponent bits set. An integer test, so CPU loops stay vectorized.
EASGD_HD bool non_finite(float v) { return (float_bits(v) & 0x7f800000u) == 0x7f800000u; }
EASGD_HD bool non_finite(bf16 v) { return (v.bits & 0x7f80u) == 0x7f80u; }
EASGD_HD bool non_finite(f16 v) { return (v.bits & 0x7c00u) == 0x7c00u; }

// What to do when some rank's contribution was not finite.
enum class OnNonFinite : int {
  skip = 0,   // nobody applies the exchange: workers and centers stay as they were
  reset = 1,  // the flagged ranks sent zeros; they restart from the center, the rest average on
};

// The exchange's verdict, read where the data live (on the GPU by the kernel itself).
// `bad_ranks` is the all-reduced flag that travelled in the wire buffer (element type W): how
// many ranks flagged. Without it (the asynchronous exchange), `me_bad` alone decides.
struct Guard {
  const void* bad_ranks = nullptr;
  const float* me_bad = nullptr;
  OnNonFinite policy = OnNonFinite::skip;
  int world = 0;             // ranks in the all-reduce (averaging divides by the healthy ones)
  float* verdict = nullptr;  // where the launch records `bad` once, for the host to read later
};

struct Decision {
  bool skip = false;      // write nothing at all
  bool reset = false;     // this rank restarts from the center
  float healthy = 0.f;    // ranks whose contribution is in the sum (0: unguarded)
  float bad = 0.f;        // ranks that flagged
  float scale = 1.f;      // what a kernel scales the sum by, worked out once per launch
};

template <typename W> EASGD_HD Decision decide(const Guard& g) {
  Decision d;
  const bool me = g.me_bad != nullptr && *g.me_bad != 0.f;
  if (g.bad_ranks == nullptr && g.me_bad == nullptr) return d;
  const float bad = g.bad_ranks != nullptr ? to_float(*static_cast<const W*>(g.bad_ranks))
                                           : (me ? 1.f : 0.f);
  d.healthy = float(g.world) - bad;
  d.bad = bad;
  if (g.policy == OnNonFinite::skip) {
    d.skip = bad != 0.f;
  } else {
    d.reset = me;
  }
  return d;
}

// Guarded functors record the decision once per launch (the launcher calls this from one
// thread), so the host can learn what happened without reading the flags themselves.
template <typename F, typename = void> struct has_guard : std::false_type {};
template <typename F> struct has_guard<F, std::void_t<decltype(std::declval<F>().guard)>> : std::true_type {};

template <typename F> EASGD_HD void record_verdict(const F& f, const Decision& d) {
  if constexpr (has_guard<F>::value) {
    if (f.guard.verdict != nullptr) *f.guard.verdict = d.bad;
  }
}

// ---- synchronous EASGD ------------------------------------------------------------------------

// Before the all-reduce: wire = d = alpha (x - c), rounded to the wire dtype. x is left alone, so
// an exchange that is skipped leaves every worker as it was. Reports a non-finite stored d.
// With `keep` (a delayed apply: x moves on before the sum arrives) d is stored there too.
template <typename X, typename W, bool Keep = false> struct ElasticDifference {
  const X* x; const float* c; W* wire; float alpha; float* nonfinite; W* keep = nullptr;

  template <int V> struct Regs { Vec<X, V> x; Vec<float, V> c; Vec<W, V> d; };
  EASGD_HD Decision decide() const { return {}; }
  EASGD_HD float* flag() const { return nonfinite; }
  template <int V> EASGD_HD void load(int64_t i, Regs<V>& r) const {
    r.x = easgd::load<V>(x + i);
    r.c = easgd::load<V>(c + i);
  }
  template <int V> EASGD_HD bool update(Regs<V>& r, const Decision&) const {
    bool bad = false;
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      r.d.v[k] = from_float<W>(alpha * (to_float(r.x.v[k]) - r.c.v[k]));
      bad |= non_finite(r.d.v[k]);
    }
    return bad;
  }
  template <int V> EASGD_HD void store(int64_t i, const Regs<V>& r) const {
    easgd::store<V>(wire + i, r.d);
    if constexpr (Keep) easgd::store<V>(keep + i, r.d);
  }
  template <int V> bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(c) && aligned_for<V>(wire) &&
           (!Keep || aligned_for<V>(keep));
  }
};

// After the all-reduce: x -= d; c += sum_i d_i. d is recomputed from the unchanged x and c with
// the same float32 operations and rounding as ElasticDifference, so x loses bit for bit what it
// sent; with `keep` (a delayed apply, x has moved on since) d is read from there instead. A
// non-finite sum (a float16 wire that overflowed) leaves that element alone on every rank (they
// all see the same sum) and is reported. A reset rank takes the new center.
template <typename X, typename W, bool Keep = false> struct SyncApply {
  X* x; float* c; const W* reduced; float alpha; Guard guard; float* nonfinite;
  const W* keep = nullptr;

  template <int V> struct Regs { Vec<X, V> x; Vec<float, V> c; Vec<W, V> s; Vec<W, V> d; };
  EASGD_HD Decision decide() const { return easgd::decide<W>(guard); }
  EASGD_HD float* flag() const { return nonfinite; }
  template <int V> EASGD_HD void load(int64_t i, Regs<V>& r) const {
    r.x = easgd::load<V>(x + i);
    r.c = easgd::load<V>(c + i);
    r.s = easgd::load<V>(reduced + i);
    if constexpr (Keep) r.d = easgd::load<V>(keep + i);
  }
  template <int V> EASGD_HD bool update(Regs<V>& r, const Decision& dec) const {
    bool bad = false;
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      const float xf = to_float(r.x.v[k]);
      const float cf = r.c.v[k];
      const float s = to_float(r.s.v[k]);
      const bool skip = non_finite(s);
      bad |= skip;
      const float c_new = select(skip, cf, cf + s);
      float d;
      if constexpr (Keep) d = to_float(r.d.v[k]);
      else d = to_float(from_float<W>(alpha * (xf - cf)));
      // Selects in float32, one rounding to X: what keeps the CPU loops vectorized. A kept x
      // (a skipped element) round-trips exactly.
      r.x.v[k] = from_float<X>(select(dec.reset, c_new, select(skip, xf, xf - d)));
      r.c.v[k] = c_new;
    }
    return bad;
  }
  template <int V> EASGD_HD void store(int64_t i, const Regs<V>& r) const {
    easgd::store<V>(x + i, r.x);
    easgd::store<V>(c + i, r.c);
  }
  template <int V> bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(c) && aligned_for<V>(reduced) &&
           (!Keep || aligned_for<V>(keep));
  }
};

// ---- an outer optimizer on the center (EASGD with outer momentum; DiLoCo) ---------------------

// After the all-reduce of d = alpha (x - c) (ElasticDifference): g = sum (times world / healthy
// ranks with kNormalize, the mean's correction when flagged ranks sent nothing); m = mu m + g;
// c += lr (Nesterov: g + mu m; else m); x -= d (the pull of EASGD, towards the old center) or,
// with kPullNew, x -= pull (x - c_new) (pull = 1: x = c_new exactly, DiLoCo's reset). With
// kPullNew and a delayed apply (Keep: d as sent k steps ago, x_sent - c at alpha = 1, the only
// alpha kPullNew is used with), x -= pull (d - (c_new - c)): the worker keeps the progress it
// made since the send and moves by pull times the center's move it has not seen. With mu = 0 and lr = 1 it stores bit for bit what SyncApply stores. A
// non-finite sum element leaves x, c and m alone there; a reset rank takes the new center.
enum OuterFlags : int { kNesterov = 1, kPullNew = 2, kNormalize = 4 };

template <typename X, typename W, bool Keep = false> struct OuterApply {
  X* x; float* c; float* m; const W* reduced; float alpha, lr, mu; int flags; Guard guard;
  float* nonfinite; const W* keep = nullptr; float pull = 1.f;

  template <int V> struct Regs { Vec<X, V> x; Vec<float, V> c; Vec<float, V> m; Vec<W, V> s; Vec<W, V> d; };
  EASGD_HD Decision decide() const {
    Decision d = easgd::decide<W>(guard);
    if ((flags & kNormalize) != 0 && d.healthy > 0.f) d.scale = float(guard.world) / d.healthy;
    return d;
  }
  EASGD_HD float* flag() const { return nonfinite; }
  template <int V> EASGD_HD void load(int64_t i, Regs<V>& r) const {
    r.x = easgd::load<V>(x + i);
    r.c = easgd::load<V>(c + i);
    r.m = easgd::load<V>(m + i);
    r.s = easgd::load<V>(reduced + i);
    if constexpr (Keep) r.d = easgd::load<V>(keep + i);
  }
  template <int V> EASGD_HD bool update(Regs<V>& r, const Decision& dec) const {
    // Both sides of every choice computed and selected by masks: no branch in the loop, so
    // the CPU loops vectorize (the choices are the same for a whole launch).
    const bool nesterov = (flags & kNesterov) != 0, pull_new = (flags & kPullNew) != 0;
    const bool full_pull = pull == 1.f;
    bool bad = false;
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      const float xf = to_float(r.x.v[k]);
      const float cf = r.c.v[k];
      const float s = to_float(r.s.v[k]);
      const bool skip = non_finite(s);
      bad |= skip;
      const float g = s * dec.scale;
      const float m_new = mu * r.m.v[k] + g;
      const float step = select(nesterov, g + mu * m_new, m_new);
      const float c_new = cf + lr * step;
      const float c_out = select(skip, cf, c_new);  // what a reset rank takes, too
      float d;
      if constexpr (Keep) d = to_float(r.d.v[k]);
      else d = to_float(from_float<W>(alpha * (xf - cf)));
      float towards_new;
      if constexpr (Keep) towards_new = xf - pull * (d - (c_new - cf));
      else towards_new = select(full_pull, c_new, xf - pull * (xf - c_new));
      const float pulled = select(pull_new, towards_new, xf - d);
      r.x.v[k] = from_float<X>(select(dec.reset, c_out, select(skip, xf, pulled)));
      r.c.v[k] = c_out;
      r.m.v[k] = select(skip, r.m.v[k], m_new);
    }
    return bad;
  }
  template <int V> EASGD_HD void store(int64_t i, const Regs<V>& r) const {
    easgd::store<V>(x + i, r.x);
    easgd::store<V>(c + i, r.c);
    easgd::store<V>(m + i, r.m);
  }
  template <int V> bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(c) && aligned_for<V>(m) && aligned_for<V>(reduced) &&
           (!Keep || aligned_for<V>(keep));
  }
};

// ---- asynchronous EASGD -----------------------------------------------------------------------

// Against a center: e = alpha (x - c); x -= e; c += what x actually lost (x_old - x_new after
// rounding x), so sum x_i + c is conserved to float32 rounding in any dtype. A flagged worker
// (guard.me_bad) leaves the center alone and, with the reset policy, takes it.
template <typename X> struct AsyncExchange {
  X* x; float* c; float alpha; Guard guard;

  template <int V> struct Regs { Vec<X, V> x; Vec<float, V> c; };
  EASGD_HD Decision decide() const { return easgd::decide<float>(guard); }
  EASGD_HD float* flag() const { return nullptr; }
  template <int V> EASGD_HD void load(int64_t i, Regs<V>& r) const {
    r.x = easgd::load<V>(x + i);
    r.c = easgd::load<V>(c + i);
  }
  template <int V> EASGD_HD bool update(Regs<V>& r, const Decision& dec) const {
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      const float xf = to_float(r.x.v[k]);
      const X x_new = from_float<X>(select(dec.reset, r.c.v[k], xf - alpha * (xf - r.c.v[k])));
      r.c.v[k] += select(dec.reset, 0.f, xf - to_float(x_new));
      r.x.v[k] = x_new;
    }
    return false;
  }
  template <int V> EASGD_HD void store(int64_t i, const Regs<V>& r) const {
    easgd::store<V>(x + i, r.x);
    easgd::store<V>(c + i, r.c);
  }
  template <int V> bool vectorizable() const { return aligned_for<V>(x) && aligned_for<V>(c); }
};

// ---- DOWNPOUR -----------------------------------------------------------------------------------

// Push: the local change since the last pull, v = x - x_last, onto the wire.
template <typename X, typename W> struct DownpourPush {
  const X* x; const X* x_last; W* wire; float* nonfinite;

  template <int V> struct Regs { Vec<X, V> x; Vec<X, V> last; Vec<W, V> v; };
  EASGD_HD Decision decide() const { return {}; }
  EASGD_HD float* flag() const { return nonfinite; }
  template <int V> EASGD_HD void load(int64_t i, Regs<V>& r) const {
    r.x = easgd::load<V>(x + i);
    r.last = easgd::load<V>(x_last + i);
  }
  template <int V> EASGD_HD bool update(Regs<V>& r, const Decision&) const {
    bool bad = false;
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      r.v.v[k] = from_float<W>(to_float(r.x.v[k]) - to_float(r.last.v[k]));
      bad |= non_finite(r.v.v[k]);
    }
    return bad;
  }
  template <int V> EASGD_HD void store(int64_t i, const Regs<V>& r) const {
    easgd::store<V>(wire + i, r.v);
  }
  template <int V> bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(x_last) && aligned_for<V>(wire);
  }
};

// Pull (synchronous form): c += sum_i v_i; x = c; x_last = x. Flagged ranks sent zeros, so under
// the reset policy everybody simply pulls; a non-finite sum leaves that element alone.
template <typename X, typename W> struct DownpourPull {
  float* c; const W* reduced; X* x; X* x_last; Guard guard; float* nonfinite;

  template <int V> struct Regs { Vec<float, V> c; Vec<W, V> s; Vec<X, V> x; };
  EASGD_HD Decision decide() const { return easgd::decide<W>(guard); }
  EASGD_HD float* flag() const { return nonfinite; }
  template <int V> EASGD_HD void load(int64_t i, Regs<V>& r) const {
    r.c = easgd::load<V>(c + i);
    r.s = easgd::load<V>(reduced + i);
    r.x = easgd::load<V>(x + i);
  }
  template <int V> EASGD_HD bool update(Regs<V>& r, const Decision&) const {
    bool bad = false;
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      const float s = to_float(r.s.v[k]);
      const bool skip = non_finite(s);
      bad |= skip;
      r.c.v[k] = select(skip, r.c.v[k], r.c.v[k] + s);
      r.x.v[k] = from_float<X>(select(skip, to_float(r.x.v[k]), r.c.v[k]));
    }
    return bad;
  }
  template <int V> EASGD_HD void store(int64_t i, const Regs<V>& r) const {
    easgd::store<V>(c + i, r.c);
    easgd::store<V>(x + i, r.x);
    easgd::store<V>(x_last + i, r.x);
  }
  template <int V> bool vectorizable() const {
    return aligned_for<V>(c) && aligned_for<V>(reduced) && aligned_for<V>(x) &&
           aligned_for<V>(x_last);
  }
};

// Against a shared center (asynchronous form): c += x - x_last; x = c; x_last = x. A flagged
// worker leaves the center alone and, with the reset policy, pulls it.
template <typename X> struct DownpourAsyncExchange {
  X* x; X* x_last; float* c; Guard guard;

  template <int V> struct Regs { Vec<X, V> x; Vec<X, V> last; Vec<float, V> c; };
  EASGD_HD Decision decide() const { return easgd::decide<float>(guard); }
  EASGD_HD float* flag() const { return nullptr; }
  template <int V> EASGD_HD void load(int64_t i, Regs<V>& r) const {
    r.x = easgd::load<V>(x + i);
    r.last = easgd::load<V>(x_last + i);
    r.c = easgd::load<V>(c + i);
  }
  template <int V> EASGD_HD bool update(Regs<V>& r, const Decision& dec) const {
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      r.c.v[k] += select(dec.reset, 0.f, to_float(r.x.v[k]) - to_float(r.last.v[k]));
      r.x.v[k] = from_float<X>(r.c.v[k]);
    }
    return false;
  }
  template <int V> EASGD_HD void store(int64_t i, const Regs<V>& r) const {
    easgd::store<V>(c + i, r.c);
    easgd::store<V>(x + i, r.x);
    easgd::store<V>(x_last + i, r.x);
  }
  template <int V> bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(x_last) && aligned_for<V>(c);
  }
};

// ---- periodic averaging -------------------------------------------------------------------------

// Before the all-reduce: wire = x, rounded to the wire dtype; reports a non-finite stored value.
template <typename X, typename W> struct AverageSend {
  const X* x; W* wire; float* nonfinite;

  template <int V> struct Regs { Vec<X, V> x; Vec<W, V> w; };
  EASGD_HD Decision decide() const { return {}; }
  EASGD_HD float* flag() const { return nonfinite; }
  template <int V> EASGD_HD void load(int64_t i, Regs<V>& r) const { r.x = easgd::load<V>(x + i); }
  template <int V> EASGD_HD bool update(Regs<V>& r, const Decision&) const {
    bool bad = false;
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      r.w.v[k] = from_float<W>(to_float(r.x.v[k]));
      bad |= non_finite(r.w.v[k]);
    }
    return bad;
  }
  template <int V> EASGD_HD void store(int64_t i, const Regs<V>& r) const {
    easgd::store<V>(wire + i, r.w);
  }
  template <int V> bool vectorizable() const { return aligned_for<V>(x) && aligned_for<V>(wire); }
};

// After the all-reduce: x = reduced * scale (scale = 1/p turns the all-reduced sum into the mean). `reduced` may be x
// itself: each element is read before it is written. Guarded (the synchronous exchange), the
// flagged ranks sent zeros and the mean is over the healthy ranks: scale = 1 / healthy.
template <typename X, typename W> struct AverageApply {
  X* x; const W* reduced; float scale; Guard guard; float* nonfinite;

  template <int V> struct Regs { Vec<W, V> s; Vec<X, V> x; };
  EASGD_HD Decision decide() const {
    Decision d = easgd::decide<W>(guard);
    d.skip |= guard.bad_ranks != nullptr && d.healthy <= 0.f;  // nobody left to average
    return d;
  }
  EASGD_HD float* flag() const { return nonfinite; }
  template <int V> EASGD_HD void load(int64_t i, Regs<V>& r) const {
    r.s = easgd::load<V>(reduced + i);
    if (nonfinite != nullptr) r.x = easgd::load<V>(x + i);  // kept where the sum overflowed
  }
  template <int V> EASGD_HD bool update(Regs<V>& r, const Decision& dec) const {
    const float k_scale = dec.healthy > 0.f ? 1.f / dec.healthy : scale;
    bool bad = false;
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      const float s = to_float(r.s.v[k]);
      const bool skip = nonfinite != nullptr && non_finite(s);
      bad |= skip;
      r.x.v[k] = from_float<X>(select(skip, to_float(r.x.v[k]), s * k_scale));
    }
    return bad;
  }
  template <int V> EASGD_HD void store(int64_t i, const Regs<V>& r) const {
    easgd::store<V>(x + i, r.x);
  }
  template <int V> bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(reduced);
  }
};

// ---- helpers --------------------------------------------------------------------------------------

// Reports whether x holds an Inf or NaN (the asynchronous exchange checks before it writes).
template <typename X> struct CheckFinite {
  const X* x; float* nonfinite;

  template <int V> struct Regs { Vec<X, V> x; };
  EASGD_HD Decision decide() const { return {}; }
  EASGD_HD float* flag() const { return nonfinite; }
  template <int V> EASGD_HD void load(int64_t i, Regs<V>& r) const { r.x = easgd::load<V>(x + i); }
  template <int V> EASGD_HD bool update(Regs<V>& r, const Decision&) const {
    bool bad = false;
    EASGD_UNROLL for (int k = 0; k < V; ++k) bad |= non_finite(r.x.v[k]);
    return bad;
  }
  template <int V> EASGD_HD void store(int64_t, const Regs<V>&) const {}
  template <int V> bool vectorizable() const { return aligned_for<V>(x); }
};

// dst = src, element by element: the copy ceiling the benchmarks measure with the same launch.
template <typename X> struct Copy {
  X* dst; const X* src;

  template <int V> struct Regs { Vec<X, V> x; };
  EASGD_HD Decision decide() const { return {}; }
  EASGD_HD float* flag() const { return nullptr; }
  template <int V> EASGD_HD void load(int64_t i, Regs<V>& r) const { r.x = easgd::load<V>(src + i); }
  template <int V> EASGD_HD bool update(Regs<V>&, const Decision&) const { return false; }
  template <int V> EASGD_HD void store(int64_t i, const Regs<V>& r) const {
    easgd::store<V>(dst + i, r.x);
  }
  template <int V> bool vectorizable() const { return aligned_for<V>(dst) && aligned_for<V>(src); }
};

}  // namespace easgd
