// Python bindings of easgd_ext._C: build information, and the kernels. Each kernel is bound
// once, as a builder in `_C.prepare` that validates its TensorRefs and returns a Launch; `_C.run`
// runs launches on the CPU (GIL released, OpenMP) or enqueues them on the caller's CUDA stream.
// The averagers build their launches once and run them every exchange; easgd_ext.ops builds and
// runs in one call. The torch-facing wrappers that make TensorRefs live in easgd_ext/ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <utility>
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

// A quantized wire's layout; the width checked (8, 4 or 2 bits a value).
QuantLayout layout_of(int64_t n, int world, int bits) {
  if (!valid_quant_bits(bits)) {
    throw py::value_error("bits must be 8, 4 or 2 (got " + std::to_string(bits) + ")");
  }
  return QuantLayout::make(n, world, bits);
}

OnNonFinite policy_of(int policy) {
  if (policy != int(OnNonFinite::skip) && policy != int(OnNonFinite::reset)) {
    throw py::value_error("policy must be 0 (skip) or 1 (reset), got " + std::to_string(policy));
  }
  return OnNonFinite(policy);
}

// The verdict of a guarded apply kernel, as Python hands it over once (`_C.Guard`): bad_ranks
// (one element of the reduced buffer's dtype: the all-reduced flag), me_bad (this rank's
// float32 flag), the policy, the ranks in the all-reduce and where to record the verdict.
struct GuardRefs {
  TensorRef bad_ranks, me_bad;
  int policy = 0;
  int world = 0;
  std::optional<TensorRef> verdict;
};

using Ref = const TensorRef&;
using OptRef = const TensorRef*;

// One kernel call being built: its tensors checked together once (element count, device, no
// overlap but the allowed pairs), then each argument checked for its role.
class Call {
 public:
  Call(std::vector<const TensorRef*> data,
       std::vector<std::pair<const TensorRef*, const TensorRef*>> may_alias = {})
      : exec_(check_call(data, may_alias, 0, 1)), data_(std::move(data)) {}

  Buf param(Ref t) const { return buf(t, float_dtype(t)); }       // float32/bfloat16/float16
  Buf center(Ref t) const { return buf(t, center_dtype(t)); }      // float32 only
  Buf like(Ref t, Ref other) const { return buf(t, same_dtype_as(t, other)); }
  float* flag(OptRef t) const { return static_cast<float*>(flag_pointer(t, exec_, data_)); }

  Guard guard(const GuardRefs* g, Ref reduced) const {
    Guard out;
    if (g == nullptr) return out;
    out.bad_ranks = flag_pointer(&g->bad_ranks, exec_, data_, reduced.dtype.c_str());
    out.me_bad = flag(&g->me_bad);
    out.verdict = g->verdict ? flag(&*g->verdict) : nullptr;
    out.policy = policy_of(g->policy);
    if (g->world < 1) throw py::value_error("world must be >= 1 in a guarded call, got " + std::to_string(g->world));
    out.world = g->world;
    return out;
  }

  Launch launch(KernelCall call, int64_t numel) const { return Launch{std::move(call), numel, exec_.device}; }
  const Exec& exec() const { return exec_; }

 private:
  Exec exec_;
  std::vector<const TensorRef*> data_;
};

// Optional trailing arguments (made when bound: a default is a Python object).
py::arg_v guard_arg() { return py::arg("guard") = static_cast<const GuardRefs*>(nullptr); }
py::arg_v nonfinite_arg() { return py::arg("nonfinite") = static_cast<OptRef>(nullptr); }

void bind_prepare(py::module_& p) {
  py::class_<GuardRefs>(p, "Guard", "The verdict a guarded apply kernel reads on the device.")
      .def(py::init([](Ref bad_ranks, Ref me_bad, int policy, int world, OptRef verdict) {
             policy_of(policy);
             return GuardRefs{bad_ranks, me_bad, policy, world,
                              verdict ? std::optional<TensorRef>(*verdict) : std::nullopt};
           }),
           py::arg("bad_ranks"), py::arg("me_bad"), py::arg("policy"), py::arg("world"),
           py::arg("verdict") = static_cast<OptRef>(nullptr));

  p.def("elastic_difference", [](Ref x, Ref center, Ref wire, double alpha, OptRef nonfinite, OptRef keep) {
    const Call c = keep ? Call({&x, &center, &wire, keep}) : Call({&x, &center, &wire});
    return c.launch(ElasticDifferenceArgs{c.param(x), c.center(center), c.param(wire),
                                          finite_scalar("alpha", alpha), c.flag(nonfinite),
                                          keep ? c.like(*keep, wire) : Buf{}}, x.numel);
  }, py::arg("x"), py::arg("center"), py::arg("wire"), py::arg("alpha"), nonfinite_arg(),
  py::arg("keep") = static_cast<OptRef>(nullptr),
  "wire = alpha (x - center), rounded to wire's dtype (and into keep, if given); sets "
  "*nonfinite = 1 on an Inf/NaN d.");

  p.def("sync_apply", [](Ref x, Ref center, Ref reduced, double alpha, const GuardRefs* guard, OptRef nonfinite,
                         OptRef keep) {
    const Call c = keep ? Call({&x, &center, &reduced, keep}) : Call({&x, &center, &reduced});
    return c.launch(SyncApplyArgs{c.param(x), c.center(center), c.param(reduced), finite_scalar("alpha", alpha),
                                  c.guard(guard, reduced), c.flag(nonfinite),
                                  keep ? c.like(*keep, reduced) : Buf{}}, x.numel);
  }, py::arg("x"), py::arg("center"), py::arg("reduced"), py::arg("alpha"), guard_arg(), nonfinite_arg(),
  py::arg("keep") = static_cast<OptRef>(nullptr),
  "x -= d (recomputed, or read from keep); center += reduced. Guarded: skip or reset by the verdict.");

  p.def("outer_apply", [](Ref x, Ref center, Ref momentum, Ref reduced, double alpha, double lr, double mu,
                          double nesterov, double pull_to_new, double normalize, const GuardRefs* guard,
                          OptRef nonfinite, OptRef keep, std::optional<double> pull) {
    const Call c = keep ? Call({&x, &center, &momentum, &reduced, keep}) : Call({&x, &center, &momentum, &reduced});
    const int flags = (nesterov != 0 ? kNesterov : 0) | (pull_to_new != 0 ? kPullNew : 0) |
                      (normalize != 0 ? kNormalize : 0);
    return c.launch(OuterApplyArgs{c.param(x), c.center(center), c.center(momentum), c.param(reduced),
                                   finite_scalar("alpha", alpha), finite_scalar("lr", lr), finite_scalar("mu", mu),
                                   flags, c.guard(guard, reduced), c.flag(nonfinite),
                                   keep ? c.like(*keep, reduced) : Buf{},
                                   finite_scalar("pull", pull.value_or(alpha))}, x.numel);
  }, py::arg("x"), py::arg("center"), py::arg("momentum"), py::arg("reduced"), py::arg("alpha"), py::arg("lr"),
  py::arg("mu"), py::arg("nesterov"), py::arg("pull_to_new"), py::arg("normalize") = 0.0, guard_arg(),
  nonfinite_arg(), py::arg("keep") = static_cast<OptRef>(nullptr), py::arg("pull") = py::none(),
  "An outer (Nesterov) momentum step on the center from the all-reduced elastic differences; x "
  "pulled towards the old center, or by `pull` (default alpha) towards the new one.");

  p.def("async_exchange", [](Ref x, Ref center, double alpha) {
    const Call c({&x, &center});
    return c.launch(AsyncExchangeArgs{c.param(x), c.center(center), finite_scalar("alpha", alpha), {}}, x.numel);
  }, py::arg("x"), py::arg("center"), py::arg("alpha"), "e = alpha (x - center); x -= e; center += e.");

  p.def("downpour_push", [](Ref x, Ref x_last, Ref wire, OptRef nonfinite) {
    const Call c({&x, &x_last, &wire});
    return c.launch(DownpourPushArgs{c.param(x), c.like(x_last, x), c.param(wire), c.flag(nonfinite)}, x.numel);
  }, py::arg("x"), py::arg("x_last"), py::arg("wire"), nonfinite_arg(), "wire = x - x_last.");

  // reduced, x and x_last may all be one buffer: a sharded center's server adds a worker's
  // change and answers with the new center in the same buffer.
  p.def("downpour_pull", [](Ref center, Ref reduced, Ref x, Ref x_last, const GuardRefs* guard, OptRef nonfinite) {
    const Call c({&center, &reduced, &x, &x_last}, {{&reduced, &x}, {&reduced, &x_last}, {&x, &x_last}});
    return c.launch(DownpourPullArgs{c.center(center), c.param(reduced), c.param(x), c.like(x_last, x),
                                     c.guard(guard, reduced), c.flag(nonfinite)}, center.numel);
  }, py::arg("center"), py::arg("reduced"), py::arg("x"), py::arg("x_last"), guard_arg(), nonfinite_arg(),
  "center += reduced; x = x_last = center.");

  p.def("downpour_async_exchange", [](Ref x, Ref x_last, Ref center) {
    const Call c({&x, &x_last, &center});
    return c.launch(DownpourAsyncExchangeArgs{c.param(x), c.like(x_last, x), c.center(center), {}}, x.numel);
  }, py::arg("x"), py::arg("x_last"), py::arg("center"), "center += x - x_last; x = x_last = center.");

  p.def("average_send", [](Ref x, Ref wire, OptRef nonfinite) {
    const Call c({&x, &wire});
    return c.launch(AverageSendArgs{c.param(x), c.param(wire), c.flag(nonfinite)}, x.numel);
  }, py::arg("x"), py::arg("wire"), nonfinite_arg(), "wire = x (rounded).");

  p.def("average_apply", [](Ref x, Ref reduced, double scale, const GuardRefs* guard, OptRef nonfinite) {
    const Call c({&x, &reduced}, {{&x, &reduced}});
    return c.launch(AverageApplyArgs{c.param(x), c.param(reduced), finite_scalar("scale", scale),
                                     c.guard(guard, reduced), c.flag(nonfinite)}, x.numel);
  }, py::arg("x"), py::arg("reduced"), py::arg("scale"), guard_arg(), nonfinite_arg(),
  "x = reduced * scale (guarded: the mean over the healthy ranks).");

  p.def("copy", [](Ref dst, Ref src) {
    const Call c({&dst, &src});
    return c.launch(CopyArgs{c.param(dst), c.like(src, dst)}, dst.numel);
  }, py::arg("dst"), py::arg("src"), "dst = src with the kernels' own launch: the copy ceiling of the benchmarks.");

  p.def("publish_flag", [](Ref wire, Ref header, Ref me_bad) {
    const Call c({&wire});
    return c.launch(PublishFlagArgs{c.param(wire),
                                    Buf{flag_pointer(&header, c.exec(), {&wire}, wire.dtype.c_str()), float_dtype(wire)},
                                    c.flag(&me_bad)}, wire.numel);
  }, py::arg("wire"), py::arg("header"), py::arg("me_bad"),
  "header[0] = me_bad[0]; if set, wire = 0 (a diverged rank sends nothing).");

  // ---- the quantized wires (8, 4 or 2 bits a value) ---------------------------------------------
  p.def("quant_layout", [](int64_t n, int world, int bits) {
    if (n < 0 || world < 1) throw py::value_error("quant_layout needs n >= 0 and world >= 1");
    const QuantLayout l = layout_of(n, world, bits);
    return py::make_tuple(l.chunk, l.record);
  }, py::arg("n"), py::arg("world"), py::arg("bits") = 8,
  "(chunk elements per owner, bytes per record) of an n-element piece's quantized wire (8, 4 or 2 "
  "bits a value) among world ranks.");

  p.def("quantized_send", [](Ref x, OptRef center, OptRef x_last, Ref residual, Ref records, int world, double alpha,
                             OptRef nonfinite, OptRef keep, int bits) {
    if (center != nullptr && x_last != nullptr) {
      throw py::value_error("give center (EASGD), x_last (DOWNPOUR) or neither (x is the contribution)");
    }
    const bool given = center == nullptr && x_last == nullptr;
    if (given && x.dtype != "float32") throw py::type_error("x, the contribution, must be float32, got " + x.dtype);
    std::vector<const TensorRef*> data{&x, &residual};
    if (center) data.push_back(center);
    if (x_last) data.push_back(x_last);
    if (keep) data.push_back(keep);
    const Call c(data);
    const QuantLayout l = layout_of(x.numel, world, bits);
    QuantizedSendArgs a;
    a.x = c.param(x).ptr; a.x_dtype = float_dtype(x);
    if (center) a.center = c.center(*center).as<float>();
    if (x_last) a.x_last = c.like(*x_last, x).ptr;
    a.residual = c.center(residual).as<float>();
    if (keep) a.keep = c.center(*keep).as<float>();
    a.records = bytes_pointer(records, world * l.record, c.exec(), data);
    a.layout = l;
    a.rule = center ? QuantRule::elastic : x_last ? QuantRule::downpour : QuantRule::given;
    a.alpha = finite_scalar("alpha", alpha);
    a.nonfinite = c.flag(nonfinite);
    return c.launch(a, x.numel);
  }, py::arg("x"), py::arg("center"), py::arg("x_last"), py::arg("residual"), py::arg("records"), py::arg("world"),
  py::arg("alpha") = 1.0, nonfinite_arg(), py::arg("keep") = static_cast<OptRef>(nullptr), py::arg("bits") = 8,
  "v = d + residual (d = alpha (x - center), x - x_last, or x itself with neither), block-quantized into "
  "the world records.");

  p.def("publish_records", [](Ref records, int64_t n, int world, Ref me_bad, int bits) {
    const QuantLayout l = layout_of(n, world, bits);
    const Call c({&me_bad});
    PublishRecordsArgs a{bytes_pointer(records, world * l.record, c.exec(), {&me_bad}), l,
                         static_cast<const float*>(flag_pointer(&me_bad, c.exec(), {}))};
    return c.launch(a, n);
  }, py::arg("records"), py::arg("n"), py::arg("world"), py::arg("me_bad"), py::arg("bits") = 8,
  "Every record's header = me_bad; if set, every scale and q = 0.");

  p.def("quantized_reduce", [](Ref received, Ref own, Ref server_residual, int64_t n, int world, int policy,
                               int bits) {
    const QuantLayout l = layout_of(n, world, bits);
    if (server_residual.numel != l.chunk) {
      throw py::value_error("server_residual must hold " + std::to_string(l.chunk) + " elements (one chunk)");
    }
    const Call c({&server_residual});
    QuantizedReduceArgs a;
    a.received = bytes_pointer(received, world * l.record, c.exec(), {&server_residual});
    a.own = bytes_pointer(own, l.record, c.exec(), {&server_residual, &received});
    a.server_residual = c.center(server_residual).as<float>();
    a.layout = l;
    a.policy = policy_of(policy);
    return c.launch(a, l.chunk);
  }, py::arg("received"), py::arg("own"), py::arg("server_residual"), py::arg("n"), py::arg("world"),
  py::arg("policy") = 0, py::arg("bits") = 8,
  "The owner's chunk: sum of the received records + its residual, re-quantized into own.");

  p.def("quantized_apply", [](Ref x, OptRef center, OptRef x_last, Ref residual, Ref sent, Ref gathered, int world,
                              double alpha, const GuardRefs* guard, OptRef keep, int bits) {
    const bool given = center == nullptr;  // x receives the de-quantized sum; d is keep
    if (given && (x_last != nullptr || keep == nullptr)) {
      throw py::value_error("without a center, give keep (the contribution as sent) and no x_last");
    }
    if (given && x.dtype != "float32") throw py::type_error("x, the sum's buffer, must be float32, got " + x.dtype);
    std::vector<const TensorRef*> data{&x, &residual};
    if (center) data.push_back(center);
    if (x_last) data.push_back(x_last);
    if (keep) data.push_back(keep);
    const Call c(data);
    const QuantLayout l = layout_of(x.numel, world, bits);
    QuantizedApplyArgs a;
    a.x = c.param(x).ptr; a.x_dtype = float_dtype(x);
    if (center) a.center = c.center(*center).as<float>();
    if (x_last) a.x_last = c.like(*x_last, x).ptr;
    a.residual = c.center(residual).as<float>();
    if (keep) a.keep = c.center(*keep).as<float>();
    a.sent = bytes_pointer(sent, world * l.record, c.exec(), data);
    a.gathered = bytes_pointer(gathered, world * l.record, c.exec(), data);
    a.layout = l;
    a.rule = given ? QuantRule::given : x_last ? QuantRule::downpour : QuantRule::elastic;
    a.alpha = finite_scalar("alpha", alpha);
    if (guard != nullptr) {
      a.me_bad = c.flag(&guard->me_bad);
      a.policy = policy_of(guard->policy);
      a.verdict = guard->verdict ? c.flag(&*guard->verdict) : nullptr;
    }
    return c.launch(a, x.numel);
  }, py::arg("x"), py::arg("center"), py::arg("x_last"), py::arg("residual"), py::arg("sent"), py::arg("gathered"),
  py::arg("world"), py::arg("alpha") = 1.0, guard_arg(), py::arg("keep") = static_cast<OptRef>(nullptr),
  py::arg("bits") = 8,
  "S = deq(gathered); residual += d - deq(sent); EASGD: x -= d, center += S; DOWNPOUR: center += S, "
  "x = x_last = center; no center: x = S (d = keep). Guarded by the count in the gathered header.");

  p.def("zero", [](Ref t) {
    const Call c({&t});
    return c.launch(ZeroArgs{reinterpret_cast<void*>(t.ptr), t.nbytes()}, t.numel);
  }, py::arg("t"), "t = 0, in stream order (the exchange's status flags).");
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
