// What the Python layer tells the native core about a tensor (no torch headers needed), and the
// checks every kernel entry runs on it. Errors name the argument and say what was wrong; they
// surface in Python as TypeError (wrong dtype) or ValueError (everything else).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"

namespace easgd {

struct TensorRef {
  std::string name;         // the argument's name, for error messages
  uintptr_t ptr = 0;        // data pointer (torch: tensor.data_ptr())
  int64_t numel = 0;
  std::string dtype;        // "float32", "bfloat16", "float16", ... (torch's name without "torch.")
  std::string device_type;  // "cpu" or "cuda"
  int device_index = -1;

  std::string device_str() const;
  size_t nbytes() const;
};

// dtype checks: a parameter/wire buffer may be any of the three float types; the center is
// always float32; some buffers must share another's dtype.
DType float_dtype(const TensorRef& t);
DType center_dtype(const TensorRef& t);
DType same_dtype_as(const TensorRef& t, const TensorRef& like);

// Checks what all arguments of one kernel call must share (element count, device), that each
// pointer is usable, and that no two buffers overlap in memory, except the pairs in
// `may_alias`, which may also be the very same buffer. Returns where to run.
Exec check_call(const std::vector<const TensorRef*>& args,
                const std::vector<std::pair<const TensorRef*, const TensorRef*>>& may_alias,
                uintptr_t stream, int num_threads);

float finite_scalar(const char* name, double value);

// A one-element flag or verdict buffer of a kernel call: float32 (or `dtype`, when given), on
// the call's device, not overlapping any of `data`. Null when `t` is.
void* flag_pointer(const TensorRef* t, const Exec& exec, const std::vector<const TensorRef*>& data,
                   const char* dtype = "float32");

// A byte buffer (uint8) of exactly `bytes` bytes on the call's device, aligned for the float32
// scales it holds, overlapping none of `others` (what the 8-bit wire's records live in).
uint8_t* bytes_pointer(const TensorRef& t, int64_t bytes, const Exec& exec,
                       const std::vector<const TensorRef*>& others);

}  // namespace easgd
