// A float32 center variable in a named POSIX shared-memory segment, for asynchronous EASGD
// between processes of one machine: its layout, and the Segment that creates, attaches and
// validates one (segment.cpp), locks its chunks and keeps its worker registry (chunk_locks.cpp).
// Layout (all offsets 64-byte aligned, data page aligned):
//
//   SegmentHeader | ChunkSlot[num_chunks] | WorkerSlot[max_workers] | float data[numel]
//
// Each chunk of the data has a robust process-shared mutex: if its holder dies, the next
// locker gets EOWNERDEAD, marks it consistent and goes on. A `dirty` flag set around every
// write tells a clean recovery (the holder died between writes) from a partial one (it died
// inside a chunk update: every element is then either its old or its new value, both finite).
#pragma once

#include <pthread.h>
#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>


namespace easgd {
namespace shm {

constexpr char kMagic[8] = {'E', 'A', 'S', 'G', 'D', 'C', 'T', 'R'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kDtypeFloat32 = 0;
constexpr uint32_t kPersistent = 1;  // SegmentHeader::flags
constexpr uint32_t kMaxWorkers = 65536;

// Errors the bindings turn into specific Python exceptions.
struct NotFound : std::runtime_error { using std::runtime_error::runtime_error; };      // FileNotFoundError
struct Exists : std::runtime_error { using std::runtime_error::runtime_error; };        // FileExistsError
struct Stale : std::runtime_error { using std::runtime_error::runtime_error; };         // StaleSegmentError
struct Incompatible : std::runtime_error { using std::runtime_error::runtime_error; };  // ValueError
struct LockTimeout : std::runtime_error { using std::runtime_error::runtime_error; };   // TimeoutError
struct Denied : std::runtime_error { using std::runtime_error::runtime_error; };        // PermissionError
struct IsDirectory : std::runtime_error { using std::runtime_error::runtime_error; };   // IsADirectoryError

struct SegmentHeader {
  char magic[8];
  uint32_t version;
  uint32_t header_bytes;  // sizeof(SegmentHeader) of the writer: catches layout drift
  uint64_t total_bytes;
  uint32_t dtype;
  uint32_t max_workers;
  int64_t numel;
  int64_t chunk_numel;
  int64_t num_chunks;
  uint64_t chunks_offset, workers_offset, data_offset;
  int64_t creator_pid;
  uint64_t creator_start_ticks;  // the creator's start time: a reused PID is not the creator
  int64_t created_unix_ns;
  uint32_t creator_uid;
  uint32_t flags;  // kPersistent: outlives its creator (restarted jobs re-attach)
  char creator_host[64];
  char layout_digest[80];  // given by the creator (the Python layer hashes the parameter layout)
  std::atomic<uint32_t> ready;  // set last, with release order, once everything above is written
  std::atomic<uint32_t> next_worker;
  std::atomic<uint64_t> clean_recoveries;
  std::atomic<uint64_t> partial_recoveries;
};

struct alignas(64) ChunkSlot {
  pthread_mutex_t mutex;
  std::atomic<int64_t> holder_pid;  // who holds the lock now (0: nobody), for error messages
  std::atomic<uint32_t> dirty;      // non-zero while the holder is writing the chunk
  std::atomic<uint64_t> updates;    // completed exchanges on this chunk
};

enum WorkerState : uint32_t { kFree = 0, kActive = 1, kFinished = 2 };

struct alignas(64) WorkerSlot {
  std::atomic<uint32_t> state;
  std::atomic<int64_t> pid;
  std::atomic<uint64_t> start_ticks;
  std::atomic<uint64_t> clock;       // the worker's local step count at its last exchange
  std::atomic<uint64_t> exchanges;   // completed exchanges
  std::atomic<int64_t> last_unix_ns;
  std::atomic<uint64_t> lock_wait_ns;  // time spent waiting for chunk locks (contention)
};

struct WorkerInfo {
  int id;
  std::string state;
  int64_t pid;
  bool alive;
  uint64_t clock, exchanges;
  int64_t last_unix_ns;
  uint64_t lock_wait_ns;
};

// Wall-clock time in nanoseconds since the epoch (creation and exchange times).
int64_t now_unix_ns();

enum class LockResult { acquired = 0, recovered_clean = 1, recovered_partial = 2 };

class Segment {
 public:
  // O_EXCL create with mode 0600; a name already taken raises Exists, saying whether the
  // holder is alive or the segment was left by a crashed run.
  // A persistent segment is never refused as stale: its creator's death is expected (a job
  // restarted by its launcher re-attaches to it); it is removed explicitly.
  static Segment* create(const std::string& name, int64_t numel, int64_t chunk_numel,
                         int max_workers, const std::string& layout_digest, bool persistent);
  // Opens (never blocking, never following a link) and validates: a regular file of this user
  // (Denied otherwise), every header field in range and consistent with the file's size (one
  // validator, also behind create's description of a taken name), ready, creator alive unless
  // persistent.
  static Segment* attach(const std::string& name, bool allow_stale);
  // shm_unlink; false if the name did not exist, Denied if it is another user's.
  static bool unlink(const std::string& name);

  ~Segment();
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  const std::string& name() const { return name_; }
  const SegmentHeader& header() const { return *header_; }
  float* data() const { return data_; }
  int64_t numel() const { return numel_; }
  bool creator_alive() const;
  bool persistent() const { return (header_->flags & kPersistent) != 0; }

  // ---- chunk locks (chunk_locks.cpp) ----
  // Blocks up to timeout_s (0: no limit) for chunk k; recovers a lock whose holder died.
  LockResult lock(int64_t chunk, double timeout_s);
  void unlock(int64_t chunk);
  void set_dirty(int64_t chunk, bool dirty);
  // The protocol of every exchange, CPU or CUDA, for each chunk it updates: lock (recovering a
  // dead holder's lock), add the wait to the worker's account, mark the chunk dirty; then,
  // once the chunk's new values are in place, clear dirty, count the update and unlock.
  LockResult acquire_for_update(int worker, int64_t chunk, double timeout_s);
  void release_after_update(int64_t chunk, bool updated);

  // ---- worker registry (chunk_locks.cpp) ----
  int register_worker();
  void finish_worker(int worker);
  void record_exchange(int worker, uint64_t clock);
  std::vector<WorkerInfo> workers() const;
  std::vector<uint64_t> chunk_updates() const;
  // Range-checked slot access (std::out_of_range otherwise).
  ChunkSlot& chunk(int64_t k) const;
  WorkerSlot& worker(int id) const;

  // cudaHostRegister of the whole mapping (a no-op returning false without CUDA in the build).
  bool pin_for_cuda(int device);

 private:
  Segment(std::string name, int fd, void* base, size_t bytes);

  std::string name_;
  int fd_ = -1;
  void* base_ = nullptr;
  size_t bytes_ = 0;
  SegmentHeader* header_ = nullptr;
  float* data_ = nullptr;
  bool pinned_ = false;
  // The layout as validated when the segment was opened. Range checks and slot addresses use
  // these private copies, never the shared header again: a header overwritten later (by any
  // process of this user) cannot widen them past the mapping.
  int64_t numel_ = 0;
  int64_t num_chunks_ = 0;
  uint32_t max_workers_ = 0;
  ChunkSlot* chunks_ = nullptr;
  WorkerSlot* workers_ = nullptr;
};

}  // namespace shm
}  // namespace easgd
