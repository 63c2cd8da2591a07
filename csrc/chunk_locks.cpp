// Chunk locks and the worker registry of a shared center (see segment.h): the lock protocol
// every exchange follows, CPU and CUDA alike, exists here once.
#include <errno.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include "process_liveness.h"
#include "segment.h"

namespace easgd {
namespace shm {
namespace {

timespec deadline_after(double seconds) {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  const double whole = double(int64_t(seconds));
  ts.tv_sec += time_t(whole);
  ts.tv_nsec += long((seconds - whole) * 1e9);
  if (ts.tv_nsec >= 1000000000L) { ts.tv_sec += 1; ts.tv_nsec -= 1000000000L; }
  return ts;
}

std::string errno_text(int err) { return std::strerror(err); }

}  // namespace

int64_t now_unix_ns() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Slots are found from the layout validated at attach (segment.h), not from the shared header.
ChunkSlot& Segment::chunk(int64_t k) const {
  if (k < 0 || k >= num_chunks_) {
    throw std::out_of_range("chunk " + std::to_string(k) + " is out of range [0, " +
                            std::to_string(num_chunks_) + ")");
  }
  return chunks_[k];
}

WorkerSlot& Segment::worker(int id) const {
  if (id < 0 || uint32_t(id) >= max_workers_) {
    throw std::out_of_range("worker " + std::to_string(id) + " is out of range [0, " +
                            std::to_string(max_workers_) + ")");
  }
  return workers_[id];
}

LockResult Segment::lock(int64_t k, double timeout_s) {
  ChunkSlot& s = chunk(k);
  int rc;
  if (timeout_s > 0 && timeout_s < 1e9) {
    const timespec deadline = deadline_after(timeout_s);
    rc = pthread_mutex_timedlock(&s.mutex, &deadline);
  } else {
    rc = pthread_mutex_lock(&s.mutex);
  }
  if (rc == EOWNERDEAD) {
    // The holder died with the lock. Its writes, if any, are whole floats (an element is its
    // old or its new value), so the chunk stays finite; `dirty` says whether it was mid-update.
    pthread_mutex_consistent(&s.mutex);
    const bool partial = s.dirty.exchange(0) != 0;
    (partial ? header_->partial_recoveries : header_->clean_recoveries).fetch_add(1);
    s.holder_pid.store(getpid());
    return partial ? LockResult::recovered_partial : LockResult::recovered_clean;
  }
  if (rc == ETIMEDOUT) {
    const int64_t holder = s.holder_pid.load();
    throw LockTimeout("chunk " + std::to_string(k) + " of shared center '" + name_ +
                      "' is still locked after " + std::to_string(timeout_s) + " s by pid " +
                      std::to_string(holder) +
                      (process_alive(holder, 0) ? " (alive: stuck?)" : " (not running)"));
  }
  if (rc == EDEADLK) {
    throw std::runtime_error("chunk " + std::to_string(k) + " of shared center '" + name_ +
                             "' is already locked by this thread");
  }
  if (rc != 0) {
    throw std::runtime_error("locking chunk " + std::to_string(k) + " of shared center '" + name_ +
                             "' failed: " + errno_text(rc));
  }
  s.holder_pid.store(getpid());
  return LockResult::acquired;
}

void Segment::unlock(int64_t k) {
  ChunkSlot& s = chunk(k);
  const int64_t holder = s.holder_pid.exchange(0);
  const int rc = pthread_mutex_unlock(&s.mutex);
  if (rc != 0) {
    s.holder_pid.store(holder);
    throw std::runtime_error("chunk " + std::to_string(k) + " of shared center '" + name_ +
                             "' is not locked by this thread (" + errno_text(rc) + ")");
  }
}

void Segment::set_dirty(int64_t k, bool dirty) {
  chunk(k).dirty.store(dirty ? 1 : 0, std::memory_order_release);
}

int Segment::register_worker() {
  const int64_t me = getpid();
  const uint64_t ticks = process_start_ticks(me);
  // First a free slot; else one whose worker is done (finished, or died without finishing: a
  // restarted job's workers take over the slots of the attempt before).
  for (int pass = 0; pass < 2; ++pass) {
    for (uint32_t id = 0; id < max_workers_; ++id) {
      WorkerSlot& w = worker(int(id));
      uint32_t state = kFree;
      bool claimed = w.state.compare_exchange_strong(state, kActive);
      if (!claimed && pass == 1 && state == kFinished) {
        claimed = w.state.compare_exchange_strong(state, kActive);
      } else if (!claimed && pass == 1 && state == kActive) {
        int64_t holder = w.pid.load();
        claimed = holder > 0 && !process_alive(holder, w.start_ticks.load()) &&
                  w.pid.compare_exchange_strong(holder, -1);
      }
      if (!claimed) continue;
      w.start_ticks.store(ticks);
      w.clock.store(0);
      w.exchanges.store(0);
      w.last_unix_ns.store(0);
      w.lock_wait_ns.store(0);
      w.pid.store(me);
      return int(id);
    }
  }
  throw Incompatible("all " + std::to_string(max_workers_) + " worker slots of shared center '" +
                     name_ + "' are taken by running workers; create it with more workers");
}

void Segment::finish_worker(int id) { worker(id).state.store(kFinished); }

void Segment::record_exchange(int id, uint64_t clock) {
  WorkerSlot& w = worker(id);
  w.clock.store(clock, std::memory_order_relaxed);
  w.last_unix_ns.store(now_unix_ns(), std::memory_order_relaxed);
  w.exchanges.fetch_add(1, std::memory_order_release);
}

std::vector<WorkerInfo> Segment::workers() const {
  std::vector<WorkerInfo> out;
  for (uint32_t id = 0; id < max_workers_; ++id) {
    const WorkerSlot& w = worker(int(id));
    const uint32_t state = w.state.load();
    if (state == kFree) continue;
    const int64_t pid = w.pid.load();
    out.push_back({int(id), state == kActive ? "active" : "finished", pid,
                   process_alive(pid, w.start_ticks.load()), w.clock.load(), w.exchanges.load(),
                   w.last_unix_ns.load(), w.lock_wait_ns.load()});
  }
  return out;
}

std::vector<uint64_t> Segment::chunk_updates() const {
  std::vector<uint64_t> out(static_cast<size_t>(num_chunks_));
  for (int64_t k = 0; k < num_chunks_; ++k) out[size_t(k)] = chunk(k).updates.load();
  return out;
}

LockResult Segment::acquire_for_update(int worker_id, int64_t k, double timeout_s) {
  WorkerSlot& me = worker(worker_id);  // range-checked before anything is locked
  const auto asked = std::chrono::steady_clock::now();
  const LockResult got = lock(k, timeout_s);
  me.lock_wait_ns.fetch_add(uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                std::chrono::steady_clock::now() - asked).count()),
                            std::memory_order_relaxed);
  chunk(k).dirty.store(1, std::memory_order_release);
  return got;
}

void Segment::release_after_update(int64_t k, bool updated) {
  ChunkSlot& s = chunk(k);
  s.dirty.store(0, std::memory_order_release);
  if (updated) s.updates.fetch_add(1, std::memory_order_relaxed);
  unlock(k);
}

}  // namespace shm
}  // namespace easgd
