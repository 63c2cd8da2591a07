// Python bindings of the shared-memory center (easgd_ext._C.SharedSegment). The segment exports
// its float32 data through the buffer protocol, so torch.frombuffer(segment) is a zero-copy view
// that keeps the mapping alive for as long as the view exists.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "chunk_exchange.h"
#include "segment.h"
#include "tensor_ref.h"

namespace py = pybind11;

namespace easgd {
namespace {

using shm::Segment;

py::dict header_dict(const Segment& s) {
  const shm::SegmentHeader& h = s.header();
  py::dict d;
  d["name"] = s.name();
  d["version"] = h.version;
  d["numel"] = h.numel;
  d["chunk_numel"] = h.chunk_numel;
  d["num_chunks"] = h.num_chunks;
  d["max_workers"] = h.max_workers;
  d["total_bytes"] = h.total_bytes;
  d["creator_pid"] = h.creator_pid;
  d["creator_host"] = std::string(h.creator_host, strnlen(h.creator_host, sizeof h.creator_host));
  d["created_unix_ns"] = h.created_unix_ns;
  d["creator_alive"] = s.creator_alive();
  d["persistent"] = s.persistent();
  d["layout_digest"] = std::string(h.layout_digest, strnlen(h.layout_digest, sizeof h.layout_digest));
  d["clean_recoveries"] = h.clean_recoveries.load();
  d["partial_recoveries"] = h.partial_recoveries.load();
  return d;
}

// An algorithm's asynchronous rule over a worker's whole flat group, validated once: its kernel's
// arguments (x, x_last) with the center left empty, cut into chunks by each exchange.
struct PreparedRule {
  shm::ChunkRule rule;
  int64_t numel = 0;
  int device = -1;  // -1: CPU
  std::string device_str;
};

PreparedRule elastic_rule(const TensorRef& x, double alpha) {
  const Exec e = check_call({&x}, {}, 0, 1);
  AsyncExchangeArgs a;
  a.x = Buf{reinterpret_cast<void*>(x.ptr), float_dtype(x)};
  a.alpha = finite_scalar("alpha", alpha);
  return PreparedRule{shm::ChunkRule{a}, x.numel, e.device, x.device_str()};
}

PreparedRule downpour_rule(const TensorRef& x, const TensorRef& x_last) {
  const Exec e = check_call({&x, &x_last}, {}, 0, 1);
  DownpourAsyncExchangeArgs a;
  a.x = Buf{reinterpret_cast<void*>(x.ptr), float_dtype(x)};
  a.x_last = Buf{reinterpret_cast<void*>(x_last.ptr), same_dtype_as(x_last, x)};
  return PreparedRule{shm::ChunkRule{a}, x.numel, e.device, x.device_str()};
}

// One worker's exchange of one flat group with its slice of the center, checked once (the slice
// fits the center, does not overlap the worker's buffers, the CUDA staging ring fits a chunk)
// and run every exchange: the asynchronous counterpart of a prepared Launch.
struct PreparedExchange {
  std::shared_ptr<Segment> segment;
  int worker = 0;
  PreparedRule rule;
  int64_t offset = 0;
  shm::ExchangeOptions options;
  std::shared_ptr<void> copy_queues;  // CUDA: this exchange's own copy streams and events
};

PreparedExchange prepare_exchange(const std::shared_ptr<Segment>& s, int worker, const PreparedRule& rule,
                                  int64_t offset, int policy, const TensorRef* staging,
                                  const TensorRef* me_bad) {
  s->worker(worker);  // range check
  if (offset < 0 || offset + rule.numel > s->numel()) {
    throw py::value_error("a flat group of " + std::to_string(rule.numel) + " elements at offset " +
                          std::to_string(offset) + " does not fit the shared center of " +
                          std::to_string(s->numel()) + " elements");
  }
  if (policy != 0 && policy != 1) throw py::value_error("policy must be 0 (skip) or 1 (reset)");
  PreparedExchange p{s, worker, rule, offset, {}, nullptr};
  p.options.policy = OnNonFinite(policy);
  const Buf x = rule.rule.x();
  const TensorRef x_ref{"x", uintptr_t(x.ptr), rule.numel, dtype_name(x.dtype), rule.device < 0 ? "cpu" : "cuda",
                        rule.device};
  if (rule.device < 0) {
    // The center slice as a TensorRef, so the usual checks catch an overlap with the worker's buffers.
    const TensorRef center{"center", uintptr_t(s->data() + offset), rule.numel, "float32", "cpu", -1};
    const Buf last = rule.rule.x_last();
    if (last.ptr != nullptr) {
      const TensorRef last_ref{"x_last", uintptr_t(last.ptr), rule.numel, dtype_name(last.dtype), "cpu", -1};
      check_call({&x_ref, &last_ref, &center}, {}, 0, 1);
    } else {
      check_call({&x_ref, &center}, {}, 0, 1);
    }
    return p;
  }
  if (staging == nullptr || me_bad == nullptr) {
    throw py::value_error("CUDA parameters need staging= and me_bad= device buffers");
  }
  const Exec e = check_call({staging}, {}, 0, 1);
  const int64_t chunk = s->header().chunk_numel;
  if (staging->dtype != "float32" || staging->device_str() != rule.device_str || staging->numel < chunk) {
    throw py::value_error("staging must be float32 on " + rule.device_str + " with at least one chunk (" +
                          std::to_string(chunk) + " elements)");
  }
  p.options.staging = reinterpret_cast<float*>(staging->ptr);
  p.options.staging_slots = int(staging->numel / chunk);
  p.options.me_bad_device = static_cast<float*>(flag_pointer(me_bad, e, {&x_ref, staging}));
#if defined(EASGD_EXT_WITH_CUDA)
  p.copy_queues = cuda::make_copy_queues(rule.device, p.options.staging_slots);
  p.options.copy_queues = p.copy_queues.get();
#endif
  return p;
}

}  // namespace

void bind_shared_segment(py::module_& m) {
  py::register_exception<shm::Stale>(m, "StaleSegmentError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const shm::NotFound& e) {
      PyErr_SetString(PyExc_FileNotFoundError, e.what());
    } catch (const shm::Exists& e) {
      PyErr_SetString(PyExc_FileExistsError, e.what());
    } catch (const shm::Incompatible& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const shm::LockTimeout& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    } catch (const shm::Denied& e) {
      PyErr_SetString(PyExc_PermissionError, e.what());
    } catch (const shm::IsDirectory& e) {
      PyErr_SetString(PyExc_IsADirectoryError, e.what());
    }
  });

  const auto release = py::call_guard<py::gil_scoped_release>();
  py::class_<Segment, std::shared_ptr<Segment>>(m, "SharedSegment", py::buffer_protocol(),
      "A float32 center in named shared memory with per-chunk robust locks (see SharedCenter).")
      .def_static("create",
                  [](const std::string& name, int64_t numel, int64_t chunk_numel, int workers,
                     const std::string& digest, bool persistent) {
                    return std::shared_ptr<Segment>(
                        Segment::create(name, numel, chunk_numel, workers, digest, persistent));
                  },
                  py::arg("name"), py::arg("numel"), py::arg("chunk_numel"), py::arg("workers"),
                  py::arg("layout_digest"), py::arg("persistent") = false)
      .def_static("attach",
                  [](const std::string& name, bool allow_stale) {
                    return std::shared_ptr<Segment>(Segment::attach(name, allow_stale));
                  },
                  py::arg("name"), py::arg("allow_stale") = false)
      .def_static("unlink", &Segment::unlink, py::arg("name"))
      .def_property_readonly("name", &Segment::name)
      .def_property_readonly("numel", &Segment::numel)
      .def("info", &header_dict)
      .def("lock", [](Segment& s, int64_t k, double timeout) { return int(s.lock(k, timeout)); },
           py::arg("chunk"), py::arg("timeout") = 0.0, release,
           "Locks a chunk; returns 0, or 1/2 when it recovered the lock of a dead holder that "
           "was between/inside updates.")
      .def("unlock", &Segment::unlock, py::arg("chunk"), release)
      .def("set_dirty", &Segment::set_dirty, py::arg("chunk"), py::arg("dirty"))
      .def("register_worker", &Segment::register_worker)
      .def("finish_worker", &Segment::finish_worker, py::arg("worker"))
      .def("record_exchange", &Segment::record_exchange, py::arg("worker"), py::arg("clock"))
      .def("chunk_updates", &Segment::chunk_updates)
      .def("workers",
           [](const Segment& s) {
             py::list out;
             for (const auto& w : s.workers()) {
               py::dict d;
               d["id"] = w.id; d["state"] = w.state; d["pid"] = w.pid; d["alive"] = w.alive;
               d["clock"] = w.clock; d["exchanges"] = w.exchanges; d["last_unix_ns"] = w.last_unix_ns;
               d["lock_wait_s"] = double(w.lock_wait_ns) * 1e-9;
               out.append(d);
             }
             return out;
           })
      .def("pin_for_cuda", &Segment::pin_for_cuda, py::arg("device") = 0, release)
      .def("prepare_exchange", &prepare_exchange, py::arg("worker"), py::arg("rule"), py::arg("offset"),
           py::arg("policy") = 0, py::arg("staging") = static_cast<const TensorRef*>(nullptr),
           py::arg("me_bad") = static_cast<const TensorRef*>(nullptr),
           "Checks once that `rule` (a worker's flat group) can exchange with center[offset:offset+numel] "
           "(CUDA parameters: through the device staging ring `staging` with the verdict in `me_bad`) and "
           "returns the PreparedExchange to run at every exchange.")
      .def_buffer([](Segment& s) {
        return py::buffer_info(s.data(), sizeof(float), py::format_descriptor<float>::format(), 1,
                               {s.numel()}, {int64_t(sizeof(float))});
      });

  py::class_<PreparedRule>(m, "ChunkRule",
                           "An algorithm's asynchronous update rule over a worker's flat group.")
      .def_static("elastic", &elastic_rule, py::arg("x"), py::arg("alpha"),
                  "EASGD: e = alpha (x - c); x -= e; c += e.")
      .def_static("downpour", &downpour_rule, py::arg("x"), py::arg("x_last"),
                  "DOWNPOUR: c += x - x_last; x = x_last = c.");

  py::class_<PreparedExchange>(m, "PreparedExchange",
                               "One worker's exchange of a flat group with a shared center, checked once.")
      .def("run",
           [](PreparedExchange& p, int num_threads, double timeout, uintptr_t stream) {
             shm::ExchangeOptions o = p.options;
             o.num_threads = num_threads;
             o.lock_timeout_s = timeout;
             o.stream = stream;
             shm::ExchangeResult got;
             {
               py::gil_scoped_release no_gil;
               got = shm::exchange(*p.segment, p.worker, p.rule.rule, p.rule.device, p.offset, p.rule.numel, o);
             }
             return py::make_tuple(got.recovered_locks, got.nonfinite);
           },
           py::arg("num_threads") = 1, py::arg("timeout") = 0.0, py::arg("stream") = 0,
           "One exchange, chunk by chunk under the chunks' locks (CUDA parameters: through the staging "
           "ring on `stream`). Returns (locks recovered from dead holders, whether x held Inf/NaN). "
           "Record the whole exchange with record_exchange afterwards.");

  m.def("chunk_plan",
        [](int64_t offset, int64_t n, int64_t chunk_numel, int worker, int workers) {
          py::list out;
          for (const auto& s : shm::chunk_plan(offset, n, chunk_numel, worker, workers)) {
            out.append(py::make_tuple(s.chunk, s.begin, s.end));
          }
          return out;
        },
        py::arg("offset"), py::arg("n"), py::arg("chunk_numel"), py::arg("worker"), py::arg("workers"),
        "The (chunk, begin, end) pieces of center[offset:offset+n] in the order a worker visits "
        "them (what every shared-center exchange follows).");

}

}  // namespace easgd
