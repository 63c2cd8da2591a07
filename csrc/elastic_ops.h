// The element-wise updates of EASGD and its baselines, written once for the CPU and CUDA
// launchers. Each functor processes V consecutive elements starting at index i (i a multiple
// of V); with V > 1 the CUDA launcher has checked that every pointer is aligned for V-wide
// vector loads. Center and arithmetic are float32; parameters (X) and wire buffers (W) may be
// float32, bfloat16 or float16. Every functor reads an element before writing it, so aliasing
// is only allowed where a kernel says so.
#pragma once

#include <cstdint>

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

// Synchronous EASGD, before the all-reduce: wire = d = alpha (x - c), rounded to the wire
// dtype. x is left alone, so an exchange that must be skipped (a non-finite d on some rank)
// leaves every worker as it was.
template <typename X, typename W> struct ElasticDifference {
  const X* x; const float* c; W* wire; float alpha;

  template <int V> EASGD_HD void apply(int64_t i) const {
    const Vec<X, V> xv = load<V>(x + i);
    const Vec<float, V> cv = load<V>(c + i);
    Vec<W, V> dv;
    EASGD_UNROLL for (int k = 0; k < V; ++k)
      dv.v[k] = from_float<W>(alpha * (to_float(xv.v[k]) - cv.v[k]));
    store<V>(wire + i, dv);
  }
  template <int V> EASGD_HD bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(c) && aligned_for<V>(wire);
  }
};

// Synchronous EASGD, after the all-reduce: x -= d; c += sum_i d_i. d is recomputed from the
// unchanged x and c with the same float32 operations and rounding as ElasticDifference, so x
// loses bit for bit what it sent.
template <typename X, typename W> struct SyncApply {
  X* x; float* c; const W* reduced; float alpha;

  template <int V> EASGD_HD void apply(int64_t i) const {
    const Vec<X, V> xv = load<V>(x + i);
    Vec<float, V> cv = load<V>(c + i);
    const Vec<W, V> sv = load<V>(reduced + i);
    Vec<X, V> xo;
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      const float xf = to_float(xv.v[k]);
      const float d = to_float(from_float<W>(alpha * (xf - cv.v[k])));
      xo.v[k] = from_float<X>(xf - d);
      cv.v[k] += to_float(sv.v[k]);
    }
    store<V>(x + i, xo);
    store<V>(c + i, cv);
  }
  template <int V> EASGD_HD bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(c) && aligned_for<V>(reduced);
  }
};

// Asynchronous EASGD against a center: e = alpha (x - c); x -= e; c += what x actually lost
// (x_old - x_new after rounding x), so sum x_i + c is conserved to float32 rounding in any dtype.
template <typename X> struct AsyncExchange {
  X* x; float* c; float alpha;

  template <int V> EASGD_HD void apply(int64_t i) const {
    const Vec<X, V> xv = load<V>(x + i);
    Vec<float, V> cv = load<V>(c + i);
    Vec<X, V> xo;
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      const float xf = to_float(xv.v[k]);
      xo.v[k] = from_float<X>(xf - alpha * (xf - cv.v[k]));
      cv.v[k] += xf - to_float(xo.v[k]);
    }
    store<V>(x + i, xo);
    store<V>(c + i, cv);
  }
  template <int V> EASGD_HD bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(c);
  }
};

// DOWNPOUR push: the local change since the last pull, v = x - x_last, onto the wire.
template <typename X, typename W> struct DownpourPush {
  const X* x; const X* x_last; W* wire;

  template <int V> EASGD_HD void apply(int64_t i) const {
    const Vec<X, V> xv = load<V>(x + i);
    const Vec<X, V> lv = load<V>(x_last + i);
    Vec<W, V> dv;
    EASGD_UNROLL for (int k = 0; k < V; ++k)
      dv.v[k] = from_float<W>(to_float(xv.v[k]) - to_float(lv.v[k]));
    store<V>(wire + i, dv);
  }
  template <int V> EASGD_HD bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(x_last) && aligned_for<V>(wire);
  }
};

// DOWNPOUR pull (synchronous form): c += sum_i v_i; x = c; x_last = x.
template <typename X, typename W> struct DownpourPull {
  float* c; const W* reduced; X* x; X* x_last;

  template <int V> EASGD_HD void apply(int64_t i) const {
    Vec<float, V> cv = load<V>(c + i);
    const Vec<W, V> sv = load<V>(reduced + i);
    Vec<X, V> xo;
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      cv.v[k] += to_float(sv.v[k]);
      xo.v[k] = from_float<X>(cv.v[k]);
    }
    store<V>(c + i, cv);
    store<V>(x + i, xo);
    store<V>(x_last + i, xo);
  }
  template <int V> EASGD_HD bool vectorizable() const {
    return aligned_for<V>(c) && aligned_for<V>(reduced) && aligned_for<V>(x) &&
           aligned_for<V>(x_last);
  }
};

// DOWNPOUR against a shared center (asynchronous form): c += x - x_last; x = c; x_last = x.
template <typename X> struct DownpourAsyncExchange {
  X* x; X* x_last; float* c;

  template <int V> EASGD_HD void apply(int64_t i) const {
    const Vec<X, V> xv = load<V>(x + i);
    const Vec<X, V> lv = load<V>(x_last + i);
    Vec<float, V> cv = load<V>(c + i);
    Vec<X, V> xo;
    EASGD_UNROLL for (int k = 0; k < V; ++k) {
      cv.v[k] += to_float(xv.v[k]) - to_float(lv.v[k]);
      xo.v[k] = from_float<X>(cv.v[k]);
    }
    store<V>(c + i, cv);
    store<V>(x + i, xo);
    store<V>(x_last + i, xo);
  }
  template <int V> EASGD_HD bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(x_last) && aligned_for<V>(c);
  }
};

// Periodic model averaging: x = reduced * scale (scale = 1/p turns the all-reduced sum into the
// mean). `reduced` may be x itself: each element is read before it is written.
template <typename X, typename W> struct AverageApply {
  X* x; const W* reduced; float scale;

  template <int V> EASGD_HD void apply(int64_t i) const {
    const Vec<W, V> sv = load<V>(reduced + i);
    Vec<X, V> xo;
    EASGD_UNROLL for (int k = 0; k < V; ++k) xo.v[k] = from_float<X>(to_float(sv.v[k]) * scale);
    store<V>(x + i, xo);
  }
  template <int V> EASGD_HD bool vectorizable() const {
    return aligned_for<V>(x) && aligned_for<V>(reduced);
  }
};

}  // namespace easgd
