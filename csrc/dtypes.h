// Storage types and float conversions shared by the CPU and CUDA kernels.
//
// Parameters and wire buffers may be float32, bfloat16 or float16; all arithmetic is float32.
// bf16/f16 are plain 16-bit structs (layout-compatible with torch's and CUDA's types) so this
// header compiles with or without nvcc. Conversions round to nearest even on both sides, so the
// CPU and GPU paths store bit-identical results for the same float32 value.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define EASGD_HD __host__ __device__ __forceinline__
#else
#define EASGD_HD inline __attribute__((always_inline))
#endif

namespace easgd {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

EASGD_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

EASGD_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// ---- to float32 (exact for every input) -----------------------------------------------------
EASGD_HD float to_float(float v) { return v; }

EASGD_HD float to_float(bf16 v) { return bits_float(uint32_t(v.bits) << 16); }

EASGD_HD float to_float(f16 v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  // Branch-free so the CPU loop vectorizes: move exponent and mantissa into float32 position and
  // rebias; Inf/NaN get the rest of the bias, subnormals are renormalised by a float subtraction.
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t em = uint32_t(v.bits & 0x7fffu) << 13;   // exponent+mantissa, float32 position
  const uint32_t exp = em & 0x0f800000u;
  const uint32_t normal = em + (112u << 23);                // rebias 15 -> 127
  const uint32_t infnan = normal + (112u << 23);            // exponent all ones
  const float sub = bits_float(normal + (1u << 23)) - bits_float(113u << 23);
  uint32_t out = exp == 0x0f800000u ? infnan : normal;
  out = exp == 0 ? float_bits(sub) : out;
  return bits_float(out | sign);
#endif
}

// ---- from float32, round to nearest even ---------------------------------------------------------
template <typename T> EASGD_HD T from_float(float f);

template <> EASGD_HD float from_float<float>(float f) { return f; }

template <> EASGD_HD bf16 from_float<bf16>(float f) {
#if defined(__CUDA_ARCH__)
  return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16{uint16_t(nan ? ((u >> 16) | 0x0040u) : rounded)};   // keep NaN a (quiet) NaN
#endif
}

template <> EASGD_HD f16 from_float<f16>(float f) {
#if defined(__CUDA_ARCH__)
  return f16{__half_as_ushort(__float2half_rn(f))};
#else
  // Branch-free: compute the three candidate encodings and select.
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  // |f| >= 2^16 (and NaN/Inf): Inf, or a quiet NaN. 65520 <= |f| < 2^16 reaches Inf by rounding.
  const uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // |f| < 2^-14: the float addition of 0.5 aligns the mantissa so the FPU rounds to the f16
  // subnormal grid (round to nearest even), then the magic bits are removed again.
  const uint32_t sub = float_bits(bits_float(u) + 0.5f) - float_bits(0.5f);
  // Normal range: rebias 127 -> 15 and round the 13 dropped mantissa bits to nearest even.
  const uint32_t norm = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;
  uint32_t out = u >= 0x47800000u ? big : norm;
  out = u < 0x38800000u ? sub : out;
  return f16{uint16_t(out | sign)};
#endif
}

// ---- names -------------------------------------------------------------------------------------
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::bf16: return "bfloat16";
    case DType::f16: return "float16";
  }
  return "?";
}

inline int dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

// Calls f(T{}) with the storage type for a runtime dtype; the basis of every kernel's dispatch.
template <typename F> decltype(auto) dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::bf16: return f(bf16{});
    case DType::f16: return f(f16{});
    case DType::f32: default: return f(float{});
  }
}

}  // namespace easgd
