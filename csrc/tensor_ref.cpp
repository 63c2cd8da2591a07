#include "tensor_ref.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cfloat>
#include <cmath>

namespace py = pybind11;

namespace easgd {
namespace {

bool parse_dtype(const std::string& s, DType* out) {
  if (s == "float32") { *out = DType::f32; return true; }
  if (s == "bfloat16") { *out = DType::bf16; return true; }
  if (s == "float16") { *out = DType::f16; return true; }
  return false;
}

bool overlap(const TensorRef& a, const TensorRef& b) {
  if (a.numel == 0 || b.numel == 0) return false;
  return a.ptr < b.ptr + b.nbytes() && b.ptr < a.ptr + a.nbytes();
}

int element_size(const TensorRef& t) {
  DType d;
  return parse_dtype(t.dtype, &d) ? dtype_size(d) : 1;
}

}  // namespace

std::string TensorRef::device_str() const {
  return device_index >= 0 && device_type != "cpu" ? device_type + ":" + std::to_string(device_index)
                                                   : device_type;
}

size_t TensorRef::nbytes() const { return size_t(numel) * size_t(element_size(*this)); }

DType float_dtype(const TensorRef& t) {
  DType d;
  if (!parse_dtype(t.dtype, &d)) {
    throw py::type_error(t.name + " must be float32, bfloat16 or float16, got " + t.dtype);
  }
  return d;
}

DType center_dtype(const TensorRef& t) {
  if (t.dtype != "float32") {
    throw py::type_error(t.name + " must be float32 (the center is always kept in float32), got " +
                         t.dtype);
  }
  return DType::f32;
}

DType same_dtype_as(const TensorRef& t, const TensorRef& like) {
  if (t.dtype != like.dtype) {
    throw py::type_error(t.name + " must have the dtype of " + like.name + " (" + like.dtype +
                         "), got " + t.dtype);
  }
  return float_dtype(t);
}

float finite_scalar(const char* name, double value) {
  if (!std::isfinite(value) || std::fabs(value) > FLT_MAX) {
    throw py::value_error(std::string(name) + " must be a finite float32 number, got " +
                          std::to_string(value));
  }
  return float(value);
}

void* flag_pointer(const TensorRef* t, const Exec& exec, const std::vector<const TensorRef*>& data,
                   const char* dtype) {
  if (t == nullptr) return nullptr;
  if (t->dtype != dtype) {
    throw py::type_error(t->name + " must be " + dtype + ", got " + t->dtype);
  }
  const bool on_cpu = exec.device < 0;
  const bool same_device = on_cpu ? t->device_type == "cpu"
                                  : t->device_type == "cuda" && std::max(0, t->device_index) == exec.device;
  if (!same_device) {
    throw py::value_error(t->name + " is on " + t->device_str() + ", not on the device of the call");
  }
  if (t->numel < 1 || t->ptr == 0) throw py::value_error(t->name + " must hold at least one element");
  if (t->ptr % element_size(*t) != 0) throw py::value_error(t->name + " is not aligned to its element size");
  TensorRef one = *t;
  one.numel = 1;
  for (const TensorRef* d : data) {
    if (overlap(one, *d)) {
      throw py::value_error(t->name + " and " + d->name + " overlap in memory; pass separate buffers");
    }
  }
  return reinterpret_cast<void*>(t->ptr);
}

uint8_t* bytes_pointer(const TensorRef& t, int64_t bytes, const Exec& exec,
                       const std::vector<const TensorRef*>& others) {
  if (t.dtype != "uint8") throw py::type_error(t.name + " must be uint8 (a byte buffer), got " + t.dtype);
  if (t.numel != bytes) {
    throw py::value_error(t.name + " must hold " + std::to_string(bytes) + " bytes, got " + std::to_string(t.numel));
  }
  const bool on_cpu = exec.device < 0;
  const bool same_device = on_cpu ? t.device_type == "cpu"
                                  : t.device_type == "cuda" && std::max(0, t.device_index) == exec.device;
  if (!same_device) throw py::value_error(t.name + " is on " + t.device_str() + ", not on the device of the call");
  if (t.ptr == 0 || t.ptr % 64 != 0) throw py::value_error(t.name + " must be 64-byte aligned");
  for (const TensorRef* o : others) {
    if (overlap(t, *o)) throw py::value_error(t.name + " and " + o->name + " overlap in memory; pass separate buffers");
  }
  return reinterpret_cast<uint8_t*>(t.ptr);
}

Exec check_call(const std::vector<const TensorRef*>& args,
                const std::vector<std::pair<const TensorRef*, const TensorRef*>>& may_alias,
                uintptr_t stream, int num_threads) {
  const TensorRef& first = **args.begin();
  for (const TensorRef* t : args) {
    if (t->device_type != "cpu" && t->device_type != "cuda") {
      throw py::value_error(t->name + " is on " + t->device_str() +
                            "; easgd_ext kernels take cpu or cuda tensors");
    }
    if (t->numel < 0) throw py::value_error(t->name + " has a negative element count");
    if (t->numel != first.numel) {
      throw py::value_error(t->name + " has " + std::to_string(t->numel) + " elements but " +
                            first.name + " has " + std::to_string(first.numel));
    }
    if (t->device_str() != first.device_str()) {
      throw py::value_error(t->name + " is on " + t->device_str() + " but " + first.name +
                            " is on " + first.device_str());
    }
    if (t->numel > 0 && t->ptr == 0) throw py::value_error(t->name + " has a null data pointer");
    if (t->ptr % element_size(*t) != 0) {
      throw py::value_error(t->name + " is not aligned to its element size");
    }
  }
  for (auto a = args.begin(); a != args.end(); ++a) {
    for (auto b = a + 1; b != args.end(); ++b) {
      if (!overlap(**a, **b)) continue;
      bool allowed = false;
      for (const auto& pair : may_alias) {
        const bool same_pair = (pair.first == *a && pair.second == *b) ||
                               (pair.first == *b && pair.second == *a);
        allowed |= same_pair && (*a)->ptr == (*b)->ptr && (*a)->dtype == (*b)->dtype;
      }
      if (!allowed) {
        throw py::value_error((*a)->name + " and " + (*b)->name +
                              " overlap in memory; pass separate buffers");
      }
    }
  }

  Exec exec;
  exec.num_threads = num_threads < 1 ? 1 : num_threads;
  if (first.device_type == "cuda") {
#if defined(EASGD_EXT_WITH_CUDA)
    exec.device = first.device_index < 0 ? 0 : first.device_index;
    exec.stream = stream;
#else
    (void)stream;
    throw std::runtime_error(first.name + " is a CUDA tensor but this easgd_ext was built without "
                             "CUDA (easgd_ext.build_info()['cuda'] is False); reinstall it where "
                             "nvcc is on PATH or CUDA_HOME is set, or with EASGD_EXT_CUDA=1");
#endif
  }
  return exec;
}

}  // namespace easgd
