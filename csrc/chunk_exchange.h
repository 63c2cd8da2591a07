// The chunked exchange of one worker with a shared center: the update rule an algorithm hands
// over (its fused kernel, applied one chunk at a time), the order the chunks are visited in, and
// the exchange itself: CPU parameters in place, CUDA parameters through a copy pipeline
// (chunk_pipeline_cuda.cu). Every chunk goes through Segment's lock protocol.
#pragma once

#include <cstdint>
#include <memory>
#include <variant>
#include <vector>

#include "kernels.h"

namespace easgd {
namespace shm {

class Segment;

// One piece of an exchange: chunk `chunk`, covering [begin, end) of the caller's buffer.
struct ChunkSpan {
  int64_t chunk, begin, end;
};

// The chunks of center[offset, offset + n) in the order worker `worker` of `workers` visits
// them: it starts worker/workers of the way round (so concurrent workers rarely queue on one
// lock) and wraps around once.
std::vector<ChunkSpan> chunk_plan(int64_t offset, int64_t n, int64_t chunk_numel, int worker,
                                  int workers);

// An algorithm's asynchronous update: its kernel's arguments with the worker's buffers (x,
// x_last) over the whole flat group and the center left empty; `at` cuts out one chunk.
struct ChunkRule {
  std::variant<AsyncExchangeArgs, DownpourAsyncExchangeArgs> proto;

  // The call for elements [begin, begin + n) of the worker's buffers against `center` (that
  // chunk of the center, wherever it is: shared memory, or a device staging copy).
  KernelCall at(int64_t begin, float* center, const float* me_bad, OnNonFinite policy) const;
  Buf x() const;
  Buf x_last() const;  // null for rules without one
};

struct ExchangeOptions {
  int num_threads = 1;
  double lock_timeout_s = 0.0;
  OnNonFinite policy = OnNonFinite::skip;
  // CUDA parameters only: the caller's stream, a device float32 staging ring of
  // `staging_slots` x chunk_numel elements, and a device float32 scalar for the verdict.
  uintptr_t stream = 0;
  float* staging = nullptr;
  int staging_slots = 0;
  float* me_bad_device = nullptr;
  // The copy streams and events of this one prepared exchange (cuda::CopyQueues): never shared
  // with another exchange, so two centers on one GPU cannot release each other's chunks early.
  void* copy_queues = nullptr;
};

struct ExchangeResult {
  int recovered_locks = 0;   // locks taken over from holders that died
  bool nonfinite = false;    // x held Inf/NaN: the center was left alone (and x reset or kept)
};

// One exchange of the worker's flat group (on the CPU, device < 0, or a CUDA device) with
// center[offset, offset + numel).
ExchangeResult exchange(Segment& segment, int worker, const ChunkRule& rule, int device,
                        int64_t offset, int64_t numel, const ExchangeOptions& options);

}  // namespace shm

#if defined(EASGD_EXT_WITH_CUDA)
namespace cuda {
// The copy streams (one per direction) and per-slot events of one prepared CUDA exchange,
// created on its device; an opaque owner for ExchangeOptions::copy_queues.
std::shared_ptr<void> make_copy_queues(int device, int slots);

// Called by the pipeline around each chunk: the segment's lock protocol.
class ChunkLocks {
 public:
  virtual ~ChunkLocks() = default;
  virtual void acquire(int64_t chunk) = 0;
  virtual void release(int64_t chunk, bool updated) = 0;
};

// The CUDA exchange: per chunk, lock; copy the center chunk into a staging slot (copy-in
// stream); the rule's kernel on the caller's stream; copy it back (copy-out stream); unlock once
// the copy back is done. Up to `staging_slots` chunks are in flight, so both copy directions
// overlap each other and the kernels. Locks are taken in increasing chunk order (the window is
// drained at the wrap-around), so two workers can never deadlock. Returns whether x held a
// non-finite value (checked on the device first; the kernels then leave the center alone).
bool pipeline_exchange(const shm::ChunkRule& rule, int device, float* host_center,
                       const std::vector<shm::ChunkSpan>& plan,
                       const shm::ExchangeOptions& options, int64_t chunk_numel, ChunkLocks& locks);
}  // namespace cuda
#endif

}  // namespace easgd
