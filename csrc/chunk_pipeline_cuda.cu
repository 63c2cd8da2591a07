// The CUDA side of the asynchronous exchange (see chunk_exchange.h): chunks of the pinned
// shared center are staged through device memory on two copy streams (one per direction, so
// PCIe runs full duplex) while the rule's kernel runs on the caller's stream.
#include <cuda_runtime.h>

#include <deque>
#include <memory>
#include <vector>

#include "chunk_exchange.h"
#include "cuda_check.h"

namespace easgd {
namespace cuda {
namespace {

// One prepared exchange's copy streams and events (made once: creating them per exchange would
// cost more than a small exchange). Owned by that exchange alone.
struct CopyQueues {
  int device = 0;
  cudaStream_t copy_in = nullptr, copy_out = nullptr;
  std::vector<cudaEvent_t> arrived, updated, done;  // one per staging slot
  cudaEvent_t start = nullptr;

  CopyQueues(int device_, int slots) : device(device_) {
    DeviceGuard guard(device);
    cuda_check(cudaStreamCreateWithFlags(&copy_in, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cudaStreamCreateWithFlags(&copy_out, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cudaEventCreateWithFlags(&start, cudaEventDisableTiming), "cudaEventCreate");
    for (auto* v : {&arrived, &updated, &done}) {
      for (int s = 0; s < slots; ++s) {
        cudaEvent_t e;
        cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
        v->push_back(e);
      }
    }
  }
  ~CopyQueues() {  // errors ignored: at exit the context may be gone already
    for (auto* v : {&arrived, &updated, &done}) {
      for (cudaEvent_t e : *v) cudaEventDestroy(e);
    }
    if (start != nullptr) cudaEventDestroy(start);
    if (copy_in != nullptr) cudaStreamDestroy(copy_in);
    if (copy_out != nullptr) cudaStreamDestroy(copy_out);
    cudaGetLastError();
  }
  CopyQueues(const CopyQueues&) = delete;
  CopyQueues& operator=(const CopyQueues&) = delete;
};

}  // namespace

std::shared_ptr<void> make_copy_queues(int device, int slots) {
  return std::make_shared<CopyQueues>(device, slots);
}

bool pipeline_exchange(const shm::ChunkRule& rule, int device, float* host_center,
                       const std::vector<shm::ChunkSpan>& plan, const shm::ExchangeOptions& o,
                       int64_t chunk_numel, ChunkLocks& locks) {
  DeviceGuard guard(device);
  CopyQueues& q = *static_cast<CopyQueues*>(o.copy_queues);
  if (q.device != device || int(q.done.size()) < o.staging_slots) {
    throw std::invalid_argument("copy queues made for another device or fewer staging slots");
  }
  const auto compute = reinterpret_cast<cudaStream_t>(o.stream);
  // The first copy into a staging slot must follow whatever the caller's stream has pending
  // (the staging memory, from the caching allocator, may have been in use on it).
  cuda_check(cudaEventRecord(q.start, compute), "cudaEventRecord");
  cuda_check(cudaStreamWaitEvent(q.copy_in, q.start, 0), "cudaStreamWaitEvent");
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
    // Every copy already enqueued completes before any lock is given back (a slot's events may
    // not all have been recorded when the failure came, so wait for the streams themselves);
    // the chunks keep old or new values, marked dirty until released.
    cudaStreamSynchronize(q.copy_in);
    cudaStreamSynchronize(compute);
    cudaStreamSynchronize(q.copy_out);
    cudaGetLastError();
    for (const InFlight& f : in_flight) locks.release(f.chunk, false);
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
