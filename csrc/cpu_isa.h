// The CPU kernels exist once per instruction-set level; cpu_dispatch.cpp chooses among them.
#pragma once

#include <cstddef>
#include <string>

#include "kernels.h"

namespace easgd {
namespace cpu {

#define EASGD_DECLARE_CPU_ISA(isa)                                            \
  namespace isa {                                                             \
  void launch(const KernelCall& call, int64_t numel, const Exec& exec);        \
  void copy(void* dst, const void* src, size_t bytes, int num_threads);       \
  int64_t count_nonfinite(const void* data, int64_t n, DType dtype, int nt);  \
  }

EASGD_DECLARE_CPU_ISA(baseline)  // the compiler's default target (x86-64: SSE2)
EASGD_DECLARE_CPU_ISA(v3)        // x86-64-v3: AVX2, FMA, F16C (built on x86-64 only)
EASGD_DECLARE_CPU_ISA(v4)        // x86-64-v4: AVX-512 F/BW/CD/DQ/VL (built on x86-64 only)
#undef EASGD_DECLARE_CPU_ISA

// The level in use: the best the CPU supports, or EASGD_EXT_CPU_ISA=baseline|v3|v4 if set.
std::string isa();
// Switches level (tests compare levels); throws std::invalid_argument for an unusable name.
void set_isa(const std::string& name);
// Levels compiled into this build and supported by this CPU.
std::string available_isas();  // comma-separated
void copy(void* dst, const void* src, size_t bytes, int num_threads);
// Elements of a float32/bfloat16/float16 buffer that are Inf or NaN (one read-only pass).
int64_t count_nonfinite(const void* data, int64_t n, DType dtype, int num_threads);

}  // namespace cpu
}  // namespace easgd
