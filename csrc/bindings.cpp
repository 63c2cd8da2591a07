// Python bindings of easgd_ext._C. Each kernel entry validates its TensorRefs, then runs on the
// CPU (GIL released, OpenMP) or enqueues on the caller's CUDA stream. The user-facing wrappers
// that build TensorRefs from torch tensors live in easgd_ext/ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_isa.h"
#include "kernels.h"
#include "tensor_ref.h"

namespace py = pybind11;
using namespace easgd;

namespace easgd {
void bind_shared_segment(py::module_& m);  // bindings_shared.cpp
}

namespace {

void run(Kernel kernel, const KernelArgs& args, const Exec& exec) {
  if (exec.device >= 0) {
#if defined(EASGD_EXT_WITH_CUDA)
    cuda::launch(kernel, args, exec);
#endif
  } else {
    cpu::launch(kernel, args, exec);
  }
}

Buf buf(const TensorRef& t, DType dtype) { return Buf{reinterpret_cast<void*>(t.ptr), dtype}; }

py::dict build_info() {
  py::dict info;
#if defined(EASGD_EXT_WITH_CUDA)
  info["cuda"] = true;
  py::list archs;
  std::string all = EASGD_EXT_CUDA_ARCHS, item;
  for (char ch : all + ",") {
    if (ch == ',') { if (!item.empty()) archs.append(item); item.clear(); } else { item += ch; }
  }
  info["cuda_archs"] = archs;
  info["cuda_compiler"] = std::string("nvcc ") + EASGD_EXT_CUDA_COMPILER;
#else
  info["cuda"] = false;
  info["cuda_archs"] = py::list();
  info["cuda_compiler"] = py::none();
#endif
  info["cxx_compiler"] = EASGD_EXT_CXX_COMPILER;
  const std::string omp = EASGD_EXT_OPENMP;
  info["openmp"] = !omp.empty();
  info["openmp_version"] = omp.empty() ? py::object(py::none()) : py::object(py::str(omp));
  info["build_type"] = EASGD_EXT_BUILD_TYPE;
  info["cpu_isa"] = cpu::isa();
  info["cpu_isas_available"] = cpu::available_isas();
  return info;
}

int cuda_device_count() {
#if defined(EASGD_EXT_WITH_CUDA)
  return cuda::device_count();
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "easgd_ext native core: fused elastic-averaging kernels (CPU, CUDA)";

  py::class_<TensorRef>(m, "TensorRef")
      .def(py::init([](std::string name, uintptr_t ptr, int64_t numel, std::string dtype,
                       std::string device_type, int device_index) {
             return TensorRef{std::move(name), ptr, numel, std::move(dtype),
                              std::move(device_type), device_index};
           }),
           py::arg("name"), py::arg("ptr"), py::arg("numel"), py::arg("dtype"),
           py::arg("device_type"), py::arg("device_index") = -1)
      .def_readonly("name", &TensorRef::name)
      .def("__repr__", [](const TensorRef& t) {
        return "TensorRef(" + t.name + ", " + std::to_string(t.numel) + " x " + t.dtype + " on " +
               t.device_str() + ")";
      });

  bind_shared_segment(m);

  m.def("build_info", &build_info, "What this build of the native core contains.");
  m.def("cuda_device_count", &cuda_device_count,
        "CUDA devices visible to the native core (0 without a driver, GPU or CUDA build).");

  m.def("set_cpu_isa", &cpu::set_isa, py::arg("level"),
        "Switch the CPU kernels to an ISA level: 'baseline', 'v3' or 'v4' (for tests and "
        "benchmarks; the default is the best the CPU supports).");

  const auto release = py::call_guard<py::gil_scoped_release>();

  m.def("copy",
        [](const TensorRef& dst, const TensorRef& src, int num_threads) {
          if (dst.nbytes() != src.nbytes() || dst.device_type != "cpu" || src.device_type != "cpu") {
            throw py::value_error("copy takes two CPU buffers of the same size");
          }
          check_call({&dst, &src}, {}, 0, num_threads);
          cpu::copy(reinterpret_cast<void*>(dst.ptr), reinterpret_cast<const void*>(src.ptr),
                    dst.nbytes(), num_threads);
        },
        py::arg("dst"), py::arg("src"), py::arg("num_threads") = 1, release,
        "Multi-threaded memcpy between CPU buffers: the copy ceiling the benchmarks compare with.");

  m.def("count_nonfinite",
        [](const TensorRef& t, int num_threads) {
          if (t.device_type != "cpu") throw py::value_error(t.name + " must be a CPU tensor");
          const DType dtype = float_dtype(t);
          check_call({&t}, {}, 0, num_threads);
          return cpu::count_nonfinite(reinterpret_cast<const void*>(t.ptr), t.numel, dtype, num_threads);
        },
        py::arg("t"), py::arg("num_threads") = 1, release,
        "Number of Inf/NaN elements of a CPU float32/bfloat16/float16 buffer (one pass).");

  m.def("elastic_difference",
        [](const TensorRef& x, const TensorRef& center, const TensorRef& wire, double alpha,
           uintptr_t stream, int num_threads) {
          KernelArgs a;
          a.bufs[0] = buf(x, float_dtype(x));
          a.bufs[1] = buf(center, center_dtype(center));
          a.bufs[2] = buf(wire, float_dtype(wire));
          a.scalar = finite_scalar("alpha", alpha);
          a.numel = x.numel;
          run(Kernel::elastic_difference, a, check_call({&x, &center, &wire}, {}, stream, num_threads));
        },
        py::arg("x"), py::arg("center"), py::arg("wire"), py::arg("alpha"), py::arg("stream") = 0,
        py::arg("num_threads") = 1, release);

  m.def("sync_apply",
        [](const TensorRef& x, const TensorRef& center, const TensorRef& reduced, double alpha,
           uintptr_t stream, int num_threads) {
          KernelArgs a;
          a.bufs[0] = buf(x, float_dtype(x));
          a.bufs[1] = buf(center, center_dtype(center));
          a.bufs[2] = buf(reduced, float_dtype(reduced));
          a.scalar = finite_scalar("alpha", alpha);
          a.numel = x.numel;
          run(Kernel::sync_apply, a, check_call({&x, &center, &reduced}, {}, stream, num_threads));
        },
        py::arg("x"), py::arg("center"), py::arg("reduced"), py::arg("alpha"), py::arg("stream") = 0,
        py::arg("num_threads") = 1, release);

  m.def("async_exchange",
        [](const TensorRef& x, const TensorRef& center, double alpha, uintptr_t stream,
           int num_threads) {
          KernelArgs a;
          a.bufs[0] = buf(x, float_dtype(x));
          a.bufs[1] = buf(center, center_dtype(center));
          a.scalar = finite_scalar("alpha", alpha);
          a.numel = x.numel;
          run(Kernel::async_exchange, a, check_call({&x, &center}, {}, stream, num_threads));
        },
        py::arg("x"), py::arg("center"), py::arg("alpha"), py::arg("stream") = 0,
        py::arg("num_threads") = 1, release);

  m.def("downpour_push",
        [](const TensorRef& x, const TensorRef& x_last, const TensorRef& wire, uintptr_t stream,
           int num_threads) {
          KernelArgs a;
          a.bufs[0] = buf(x, float_dtype(x));
          a.bufs[1] = buf(x_last, same_dtype_as(x_last, x));
          a.bufs[2] = buf(wire, float_dtype(wire));
          a.numel = x.numel;
          run(Kernel::downpour_push, a, check_call({&x, &x_last, &wire}, {}, stream, num_threads));
        },
        py::arg("x"), py::arg("x_last"), py::arg("wire"), py::arg("stream") = 0,
        py::arg("num_threads") = 1, release);

  m.def("downpour_pull",
        [](const TensorRef& center, const TensorRef& reduced, const TensorRef& x,
           const TensorRef& x_last, uintptr_t stream, int num_threads) {
          KernelArgs a;
          a.bufs[0] = buf(center, center_dtype(center));
          a.bufs[1] = buf(reduced, float_dtype(reduced));
          a.bufs[2] = buf(x, float_dtype(x));
          a.bufs[3] = buf(x_last, same_dtype_as(x_last, x));
          a.numel = center.numel;
          run(Kernel::downpour_pull, a,
              check_call({&center, &reduced, &x, &x_last}, {}, stream, num_threads));
        },
        py::arg("center"), py::arg("reduced"), py::arg("x"), py::arg("x_last"),
        py::arg("stream") = 0, py::arg("num_threads") = 1, release);

  m.def("downpour_async_exchange",
        [](const TensorRef& x, const TensorRef& x_last, const TensorRef& center, uintptr_t stream,
           int num_threads) {
          KernelArgs a;
          a.bufs[0] = buf(x, float_dtype(x));
          a.bufs[1] = buf(x_last, same_dtype_as(x_last, x));
          a.bufs[2] = buf(center, center_dtype(center));
          a.numel = x.numel;
          run(Kernel::downpour_async_exchange, a,
              check_call({&x, &x_last, &center}, {}, stream, num_threads));
        },
        py::arg("x"), py::arg("x_last"), py::arg("center"), py::arg("stream") = 0,
        py::arg("num_threads") = 1, release);

  m.def("average_apply",
        [](const TensorRef& x, const TensorRef& reduced, double scale, uintptr_t stream,
           int num_threads) {
          KernelArgs a;
          a.bufs[0] = buf(x, float_dtype(x));
          a.bufs[1] = buf(reduced, float_dtype(reduced));
          a.scalar = finite_scalar("scale", scale);
          a.numel = x.numel;
          run(Kernel::average_apply, a,
              check_call({&x, &reduced}, {{&x, &reduced}}, stream, num_threads));
        },
        py::arg("x"), py::arg("reduced"), py::arg("scale"), py::arg("stream") = 0,
        py::arg("num_threads") = 1, release);
}
