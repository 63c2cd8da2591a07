// Picks the CPU kernel build for the running processor once, at first use.
#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "cpu_isa.h"

namespace easgd {
namespace cpu {
namespace {

enum class Isa { baseline = 0, v3 = 1, v4 = 2 };

bool supported(Isa isa) {
  switch (isa) {
    case Isa::baseline: return true;
#if defined(EASGD_CPU_MULTI_ISA)
    case Isa::v3:
      return __builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
             __builtin_cpu_supports("bmi2");
    case Isa::v4:
      return supported(Isa::v3) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd");
#endif
    default: return false;
  }
}

const char* name(Isa isa) {
  switch (isa) {
    case Isa::v3: return "x86-64-v3";
    case Isa::v4: return "x86-64-v4";
    default: return "baseline";
  }
}

Isa parse(const std::string& s) {
  if (s == "baseline") return Isa::baseline;
  if (s == "v3" || s == "x86-64-v3") return Isa::v3;
  if (s == "v4" || s == "x86-64-v4") return Isa::v4;
  throw std::invalid_argument("unknown CPU ISA level '" + s + "'; expected baseline, v3 or v4");
}

Isa best() {
  if (const char* forced = std::getenv("EASGD_EXT_CPU_ISA")) {
    if (*forced != '\0') {
      const Isa isa = parse(forced);
      if (!supported(isa)) {
        throw std::invalid_argument(std::string("EASGD_EXT_CPU_ISA=") + forced +
                                    " is not supported by this CPU or build; available: " +
                                    available_isas());
      }
      return isa;
    }
  }
  for (Isa isa : {Isa::v4, Isa::v3}) {
    if (supported(isa)) return isa;
  }
  return Isa::baseline;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{int(best())};
  return isa;
}

}  // namespace

std::string isa() { return name(Isa(current().load())); }

void set_isa(const std::string& s) {
  const Isa isa = parse(s);
  if (!supported(isa)) {
    throw std::invalid_argument("CPU ISA level '" + s + "' is not supported by this CPU or build; "
                                "available: " + available_isas());
  }
  current().store(int(isa));
}

std::string available_isas() {
  std::string out;
  for (Isa isa : {Isa::baseline, Isa::v3, Isa::v4}) {
    if (supported(isa)) out += (out.empty() ? "" : ",") + std::string(name(isa));
  }
  return out;
}

void launch(const KernelCall& call, int64_t numel, const Exec& exec) {
  switch (Isa(current().load())) {
#if defined(EASGD_CPU_MULTI_ISA)
    case Isa::v4: return v4::launch(call, numel, exec);
    case Isa::v3: return v3::launch(call, numel, exec);
#endif
    default: return baseline::launch(call, numel, exec);
  }
}

void copy(void* dst, const void* src, size_t bytes, int num_threads) {
  switch (Isa(current().load())) {
#if defined(EASGD_CPU_MULTI_ISA)
    case Isa::v4: return v4::copy(dst, src, bytes, num_threads);
    case Isa::v3: return v3::copy(dst, src, bytes, num_threads);
#endif
    default: return baseline::copy(dst, src, bytes, num_threads);
  }
}

int64_t count_nonfinite(const void* data, int64_t n, DType dtype, int num_threads) {
  switch (Isa(current().load())) {
#if defined(EASGD_CPU_MULTI_ISA)
    case Isa::v4: return v4::count_nonfinite(data, n, dtype, num_threads);
    case Isa::v3: return v3::count_nonfinite(data, n, dtype, num_threads);
#endif
    default: return baseline::count_nonfinite(data, n, dtype, num_threads);
  }
}

}  // namespace cpu
}  // namespace easgd
