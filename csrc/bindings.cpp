// Python bindings of easgd_ext._C: build information, and the kernels. Each kernel is bound
// once, as a builder in `_C.prepare` that validates its TensorRefs and returns a Launch; `_C.run`
// runs launches on the CPU (GIL released, OpenMP) or enqueues them on the caller's CUDA stream.
// The averagers build their launches once and run them every exchange; easgd_ext.ops builds and
// runs in one call. The torch-facing wrappers that make TensorRefs live in easgd_ext/ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "cpu_isa.h"
#include "kernels.h"
#include "tensor_ref.h"

namespace py = pybind11;
using namespace easgd;

namespace easgd {
void bind_shared_segment(py::module_& m);  // bindings_shared.cpp
}

namespace {

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

OnNonFinite policy_of(int policy) {
  if (policy != int(OnNonFinite::skip) && policy != int(OnNonFinite::reset)) {
    throw py::value_error("policy must be 0 (skip) or 1 (reset), got " + std::to_string(policy));
  }
  return OnNonFinite(policy);
}

// The verdict of a guarded apply kernel: bad_ranks (one element of the reduced buffer's dtype,
// the all-reduced flag) and me_bad (this rank's float32 flag); both or neither.
GuardArgs guard_args(const TensorRef* bad_ranks, const TensorRef* me_bad, int policy, int world,
                     const TensorRef* verdict, const TensorRef& reduced, const Exec& exec,
                     const std::vector<const TensorRef*>& data) {
  GuardArgs g;
  if ((bad_ranks == nullptr) != (me_bad == nullptr)) {
    throw py::value_error("give both bad_ranks and me_bad (a guarded exchange) or neither");
  }
  if (bad_ranks == nullptr) return g;
  g.verdict = static_cast<float*>(flag_pointer(verdict, exec, data));
  g.bad_ranks = flag_pointer(bad_ranks, exec, data, reduced.dtype.c_str());
  g.bad_dtype = float_dtype(reduced);
  g.me_bad = static_cast<const float*>(flag_pointer(me_bad, exec, data));
  g.policy = policy_of(policy);
  if (world < 1) throw py::value_error("world must be >= 1 in a guarded call, got " + std::to_string(world));
  g.world = world;
  return g;
}

float* flag(const TensorRef* t, const Exec& exec, const std::vector<const TensorRef*>& data) {
  return static_cast<float*>(flag_pointer(t, exec, data));
}

Launch make(KernelCall call, int64_t numel, const Exec& exec) {
  return Launch{std::move(call), numel, exec.device};
}

using Ref = const TensorRef&;
using OptRef = const TensorRef*;

void bind_prepare(py::module_& p) {
  p.def("elastic_difference",
        [](Ref x, Ref center, Ref wire, double alpha, OptRef nonfinite) {
          const Exec e = check_call({&x, &center, &wire}, {}, 0, 1);
          return make(ElasticDifferenceArgs{buf(x, float_dtype(x)), buf(center, center_dtype(center)),
                                            buf(wire, float_dtype(wire)), finite_scalar("alpha", alpha),
                                            flag(nonfinite, e, {&x, &center, &wire})},
                      x.numel, e);
        },
        py::arg("x"), py::arg("center"), py::arg("wire"), py::arg("alpha"),
        py::arg("nonfinite") = nullptr,
        "wire = alpha (x - center), rounded to wire's dtype; sets *nonfinite = 1 on an Inf/NaN d.");

  p.def("sync_apply",
        [](Ref x, Ref center, Ref reduced, double alpha, OptRef bad_ranks, OptRef me_bad, int policy,
           int world, OptRef verdict, OptRef nonfinite) {
          const Exec e = check_call({&x, &center, &reduced}, {}, 0, 1);
          const std::vector<const TensorRef*> data{&x, &center, &reduced};
          return make(SyncApplyArgs{buf(x, float_dtype(x)), buf(center, center_dtype(center)),
                                    buf(reduced, float_dtype(reduced)), finite_scalar("alpha", alpha),
                                    guard_args(bad_ranks, me_bad, policy, world, verdict, reduced, e, data),
                                    flag(nonfinite, e, data)},
                      x.numel, e);
        },
        py::arg("x"), py::arg("center"), py::arg("reduced"), py::arg("alpha"),
        py::arg("bad_ranks") = nullptr, py::arg("me_bad") = nullptr, py::arg("policy") = 0,
        py::arg("world") = 0, py::arg("verdict") = nullptr, py::arg("nonfinite") = nullptr,
        "x -= d (recomputed); center += reduced. Guarded: skip or reset by the verdict.");

  p.def("async_exchange",
        [](Ref x, Ref center, double alpha) {
          const Exec e = check_call({&x, &center}, {}, 0, 1);
          AsyncExchangeArgs a{buf(x, float_dtype(x)), buf(center, center_dtype(center)),
                              finite_scalar("alpha", alpha), {}};
          return make(a, x.numel, e);
        },
        py::arg("x"), py::arg("center"), py::arg("alpha"),
        "e = alpha (x - center); x -= e; center += e.");

  p.def("downpour_push",
        [](Ref x, Ref x_last, Ref wire, OptRef nonfinite) {
          const Exec e = check_call({&x, &x_last, &wire}, {}, 0, 1);
          return make(DownpourPushArgs{buf(x, float_dtype(x)), buf(x_last, same_dtype_as(x_last, x)),
                                       buf(wire, float_dtype(wire)), flag(nonfinite, e, {&x, &x_last, &wire})},
                      x.numel, e);
        },
        py::arg("x"), py::arg("x_last"), py::arg("wire"), py::arg("nonfinite") = nullptr,
        "wire = x - x_last.");

  p.def("downpour_pull",
        [](Ref center, Ref reduced, Ref x, Ref x_last, OptRef bad_ranks, OptRef me_bad, int policy,
           int world, OptRef verdict, OptRef nonfinite) {
          const Exec e = check_call({&center, &reduced, &x, &x_last}, {}, 0, 1);
          const std::vector<const TensorRef*> data{&center, &reduced, &x, &x_last};
          return make(DownpourPullArgs{buf(center, center_dtype(center)), buf(reduced, float_dtype(reduced)),
                                       buf(x, float_dtype(x)), buf(x_last, same_dtype_as(x_last, x)),
                                       guard_args(bad_ranks, me_bad, policy, world, verdict, reduced, e, data),
                                       flag(nonfinite, e, data)},
                      center.numel, e);
        },
        py::arg("center"), py::arg("reduced"), py::arg("x"), py::arg("x_last"),
        py::arg("bad_ranks") = nullptr, py::arg("me_bad") = nullptr, py::arg("policy") = 0,
        py::arg("world") = 0, py::arg("verdict") = nullptr, py::arg("nonfinite") = nullptr,
        "center += reduced; x = x_last = center.");

  p.def("downpour_async_exchange",
        [](Ref x, Ref x_last, Ref center) {
          const Exec e = check_call({&x, &x_last, &center}, {}, 0, 1);
          DownpourAsyncExchangeArgs a{buf(x, float_dtype(x)), buf(x_last, same_dtype_as(x_last, x)),
                                      buf(center, center_dtype(center)), {}};
          return make(a, x.numel, e);
        },
        py::arg("x"), py::arg("x_last"), py::arg("center"),
        "center += x - x_last; x = x_last = center.");

  p.def("average_send",
        [](Ref x, Ref wire, OptRef nonfinite) {
          const Exec e = check_call({&x, &wire}, {}, 0, 1);
          return make(AverageSendArgs{buf(x, float_dtype(x)), buf(wire, float_dtype(wire)),
                                      flag(nonfinite, e, {&x, &wire})},
                      x.numel, e);
        },
        py::arg("x"), py::arg("wire"), py::arg("nonfinite") = nullptr, "wire = x (rounded).");

  p.def("average_apply",
        [](Ref x, Ref reduced, double scale, OptRef bad_ranks, OptRef me_bad, int policy, int world,
           OptRef verdict, OptRef nonfinite) {
          const Exec e = check_call({&x, &reduced}, {{&x, &reduced}}, 0, 1);
          const std::vector<const TensorRef*> data{&x, &reduced};
          return make(AverageApplyArgs{buf(x, float_dtype(x)), buf(reduced, float_dtype(reduced)),
                                       finite_scalar("scale", scale),
                                       guard_args(bad_ranks, me_bad, policy, world, verdict, reduced, e, data),
                                       flag(nonfinite, e, data)},
                      x.numel, e);
        },
        py::arg("x"), py::arg("reduced"), py::arg("scale"), py::arg("bad_ranks") = nullptr,
        py::arg("me_bad") = nullptr, py::arg("policy") = 0, py::arg("world") = 0,
        py::arg("verdict") = nullptr, py::arg("nonfinite") = nullptr,
        "x = reduced * scale (guarded: the mean over the healthy ranks).");

  p.def("check_finite",
        [](Ref x, Ref nonfinite) {
          const Exec e = check_call({&x}, {}, 0, 1);
          return make(CheckFiniteArgs{buf(x, float_dtype(x)), flag(&nonfinite, e, {&x})}, x.numel, e);
        },
        py::arg("x"), py::arg("nonfinite"), "*nonfinite = 1 if x holds an Inf or NaN.");

  p.def("copy",
        [](Ref dst, Ref src) {
          const Exec e = check_call({&dst, &src}, {}, 0, 1);
          return make(CopyArgs{buf(dst, float_dtype(dst)), buf(src, same_dtype_as(src, dst))}, dst.numel, e);
        },
        py::arg("dst"), py::arg("src"),
        "dst = src with the kernels' own launch: the copy ceiling of the benchmarks.");

  p.def("publish_flag",
        [](Ref wire, Ref header, Ref me_bad) {
          const Exec e = check_call({&wire}, {}, 0, 1);
          return make(PublishFlagArgs{buf(wire, float_dtype(wire)),
                                      Buf{flag_pointer(&header, e, {&wire}, wire.dtype.c_str()), float_dtype(wire)},
                                      flag(&me_bad, e, {&wire})},
                      wire.numel, e);
        },
        py::arg("wire"), py::arg("header"), py::arg("me_bad"),
        "header[0] = me_bad[0]; if set, wire = 0 (a diverged rank sends nothing).");

  p.def("zero",
        [](Ref t) {
          const Exec e = check_call({&t}, {}, 0, 1);
          return make(ZeroArgs{reinterpret_cast<void*>(t.ptr), t.nbytes()}, t.numel, e);
        },
        py::arg("t"), "t = 0, in stream order (the exchange's status flags).");
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

  py::class_<Launch>(m, "Launch", "A validated kernel call: run it with run().")
      .def_readonly("numel", &Launch::numel)
      .def_readonly("device", &Launch::device);

  py::module_ prepare = m.def_submodule("prepare", "Kernel builders: validate the buffers once, return a Launch.");
  bind_prepare(prepare);

  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("run",
        [](const std::vector<const Launch*>& launches, uintptr_t stream, int num_threads) {
          for (const Launch* l : launches) easgd::run(*l, stream, num_threads);
        },
        py::arg("launches"), py::arg("stream") = 0, py::arg("num_threads") = 1, release,
        "Runs launches in order: on the CPU with num_threads threads, or enqueued on `stream` of "
        "their CUDA device (a cudaStream_t as an integer; no synchronization).");

  bind_shared_segment(m);

  m.def("build_info", &build_info, "What this build of the native core contains.");
  m.def("cuda_device_count", &cuda_device_count,
        "CUDA devices visible to the native core (0 without a driver, GPU or CUDA build).");
  m.def("set_cpu_isa", &cpu::set_isa, py::arg("level"),
        "Switch the CPU kernels to an ISA level: 'baseline', 'v3' or 'v4' (for tests and "
        "benchmarks; the default is the best the CPU supports).");

  m.def("memcpy",
        [](const TensorRef& dst, const TensorRef& src, int num_threads) {
          if (dst.nbytes() != src.nbytes() || dst.device_type != "cpu" || src.device_type != "cpu") {
            throw py::value_error("memcpy takes two CPU buffers of the same size");
          }
          check_call({&dst, &src}, {}, 0, num_threads);
          cpu::copy(reinterpret_cast<void*>(dst.ptr), reinterpret_cast<const void*>(src.ptr),
                    dst.nbytes(), num_threads);
        },
        py::arg("dst"), py::arg("src"), py::arg("num_threads") = 1, release,
        "Multi-threaded memcpy between CPU buffers: the CPU copy ceiling of the benchmarks.");

  m.def("count_nonfinite",
        [](const TensorRef& t, int num_threads) {
          if (t.device_type != "cpu") throw py::value_error(t.name + " must be a CPU tensor");
          const DType dtype = float_dtype(t);
          check_call({&t}, {}, 0, num_threads);
          return cpu::count_nonfinite(reinterpret_cast<const void*>(t.ptr), t.numel, dtype, num_threads);
        },
        py::arg("t"), py::arg("num_threads") = 1, release,
        "Number of Inf/NaN elements of a CPU float32/bfloat16/float16 buffer (one pass).");
}
