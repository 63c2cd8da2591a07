// The CUDA side of the asynchronous exchange (see chunk_exchange.h): chunks of the pinned
// shared center are staged through device memory on two copy streams (one per direction, so
// PCIe runs full duplex) while the rule's kernel runs on the caller's stream.
#include <cuda_runtime.h>

#include <deque>
#include <map>
#include <mutex>
#include <vector>

#include "chunk_exchange.h"
#include "cuda_check.h"

namespace easgd {
namespace cuda {
namespace {

// Per device: the two copy streams and a pool of events, made once (creating them per exchange
// would cost more than a small exchange).
struct DeviceQueues {
  cudaStream_t copy_in = nullptr, copy_out = nullptr;
  std::vector<cudaEvent_t> arrived, updated, done;  // one per staging slot
  cudaEvent_t start = nullptr;

  void ensure_slots(int slots) {
    auto grow = [&](std::vector<cudaEvent_t>& v) {
      while (int(v.size()) < slots) {
        cudaEvent_t e;
        cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
        v.push_back(e);
      }
    };
    grow(arrived);
    grow(updated);
    grow(done);
  }
};

DeviceQueues& queues(int device) {
  static std::mutex mu;
  static std::map<int, DeviceQueues> all;
  std::lock_guard<std::mutex> lock(mu);
  DeviceQueues& q = all[device];
  if (q.copy_in == nullptr) {
    cuda_check(cudaStreamCreateWithFlags(&q.copy_in, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cudaStreamCreateWithFlags(&q.copy_out, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cudaEventCreateWithFlags(&q.start, cudaEventDisableTiming), "cudaEventCreate");
  }
  return q;
}

}  // namespace

bool pipeline_exchange(const shm::ChunkRule& rule, int device, float* host_center,
                       const std::vector<shm::ChunkSpan>& plan, const shm::ExchangeOptions& o,
                       int64_t chunk_numel, ChunkLocks& locks) {
  DeviceGuard guard(device);
  DeviceQueues& q = queues(device);
  q.ensure_slots(o.staging_slots);
  const auto compute = reinterpret_cast<cudaStream_t>(o.stream);
  Exec exec;
  exec.device = device;
  exec.stream = o.stream;

  // The verdict first, on the device: the chunk kernels read it and leave the center alone
  // when x is not finite. Only the host copy at the end waits for it.
  cuda_check(cudaMemsetAsync(o.me_bad_device, 0, sizeof(float), compute), "cudaMemsetAsync");
  int64_t total = 0;
  for (const auto& span : plan) total += span.end - span.begin;
  launch(CheckFiniteArgs{rule.x(), o.me_bad_device}, total, exec);

  struct InFlight { int64_t chunk; int slot; };
  std::deque<InFlight> in_flight;
  auto retire = [&](size_t keep) {
    while (in_flight.size() > keep) {
      const InFlight f = in_flight.front();
      cuda_check(cudaEventSynchronize(q.done[f.slot]), "cudaEventSynchronize");
      in_flight.pop_front();
      locks.release(f.chunk, true);
    }
  };
  const size_t window = size_t(o.staging_slots);
  try {
    int64_t previous = -1;
    int next_slot = 0;
    for (const auto& span : plan) {
      if (span.chunk < previous) retire(0);  // wrap-around: locks only in increasing order
      previous = span.chunk;
      retire(window - 1);  // a free slot: the oldest copy back is done
      const int slot = next_slot;
      next_slot = (next_slot + 1) % o.staging_slots;
      const int64_t n = span.end - span.begin;
      const size_t bytes = size_t(n) * sizeof(float);
      float* staged = o.staging + int64_t(slot) * chunk_numel;
      locks.acquire(span.chunk);
      in_flight.push_back({span.chunk, slot});
      cuda_check(cudaMemcpyAsync(staged, host_center + span.begin, bytes, cudaMemcpyHostToDevice,
                                 q.copy_in), "cudaMemcpyAsync (center chunk in)");
      cuda_check(cudaEventRecord(q.arrived[slot], q.copy_in), "cudaEventRecord");
      cuda_check(cudaStreamWaitEvent(compute, q.arrived[slot], 0), "cudaStreamWaitEvent");
      launch(rule.at(span.begin, staged, o.me_bad_device, o.policy), n, exec);
      cuda_check(cudaEventRecord(q.updated[slot], compute), "cudaEventRecord");
      cuda_check(cudaStreamWaitEvent(q.copy_out, q.updated[slot], 0), "cudaStreamWaitEvent");
      cuda_check(cudaMemcpyAsync(host_center + span.begin, staged, bytes, cudaMemcpyDeviceToHost,
                                 q.copy_out), "cudaMemcpyAsync (center chunk out)");
      cuda_check(cudaEventRecord(q.done[slot], q.copy_out), "cudaEventRecord");
    }
    retire(0);
  } catch (...) {
    // Whatever is in flight completes before its lock is given back (a CUDA error here leaves
    // the chunks as they are: old or new values, marked dirty until released).
    for (const InFlight& f : in_flight) {
      cudaEventSynchronize(q.done[f.slot]);
      locks.release(f.chunk, false);
    }
    throw;
  }
  float me_bad = 0.f;
  cuda_check(cudaMemcpyAsync(&me_bad, o.me_bad_device, sizeof(float), cudaMemcpyDeviceToHost, compute),
             "cudaMemcpyAsync (verdict)");
  cuda_check(cudaStreamSynchronize(compute), "cudaStreamSynchronize");
  return me_bad != 0.f;
}

}  // namespace cuda
}  // namespace easgd
