// Creating, attaching and validating a shared center (see segment.h).
#include "segment.h"

#if defined(EASGD_EXT_WITH_CUDA)
#include "kernels.h"  // cuda::host_register
#endif

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "process_liveness.h"
#include "shm_names.h"

namespace easgd {
namespace shm {
namespace {

static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<int64_t>::is_always_lock_free,
              "shared-memory counters must be lock-free atomics");

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

struct Plan {
  int64_t num_chunks;
  size_t chunks_offset, workers_offset, data_offset, total_bytes;
};

Plan plan(int64_t numel, int64_t chunk_numel, int max_workers) {
  Plan p;
  p.num_chunks = (numel + chunk_numel - 1) / chunk_numel;
  p.chunks_offset = round_up(sizeof(SegmentHeader), 64);
  p.workers_offset = p.chunks_offset + size_t(p.num_chunks) * sizeof(ChunkSlot);
  p.data_offset = round_up(p.workers_offset + size_t(max_workers) * sizeof(WorkerSlot), 4096);
  p.total_bytes = round_up(p.data_offset + size_t(numel) * sizeof(float), 4096);
  return p;
}

std::string errno_text(int err) { return std::strerror(err); }

std::string format_time(int64_t unix_ns) {
  const time_t secs = time_t(unix_ns / 1000000000);
  tm parts;
  localtime_r(&secs, &parts);
  char out[64];
  strftime(out, sizeof out, "%Y-%m-%d %H:%M:%S", &parts);
  return out;
}

std::string describe_creator(const SegmentHeader& h, bool alive) {
  std::string host(h.creator_host, strnlen(h.creator_host, sizeof h.creator_host));
  return "created by pid " + std::to_string(h.creator_pid) + " on " + host + " at " +
         format_time(h.created_unix_ns) + (alive ? ", still running" : ", which is gone");
}

// Why a name is taken, for the create error: live, left by a crashed run, or not ours.
std::string describe_existing(const std::string& name, const std::string& posix) {
  const std::string unlink_hint = "remove it with SharedCenter.remove('" + posix.substr(1) +
                                  "') (or rm /dev/shm" + posix + ")";
  const int fd = shm_open(posix.c_str(), O_RDONLY, 0);
  if (fd < 0) return "shared memory '" + name + "' already exists (" + errno_text(errno) + ")";
  struct stat st;
  std::string what;
  if (fstat(fd, &st) != 0 || size_t(st.st_size) < sizeof(SegmentHeader)) {
    what = "shared memory '" + name + "' already exists and is not an easgd_ext center; pick another name";
  } else {
    void* base = mmap(nullptr, sizeof(SegmentHeader), PROT_READ, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
      what = "shared memory '" + name + "' already exists (" + errno_text(errno) + ")";
    } else {
      const auto& h = *static_cast<const SegmentHeader*>(base);
      if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) {
        what = "shared memory '" + name + "' already exists and is not an easgd_ext center; pick another name";
      } else if (process_alive(h.creator_pid, h.creator_start_ticks)) {
        what = "shared center '" + name + "' already exists and is in use (" + describe_creator(h, true) +
               "); pick another name, or attach to it";
      } else {
        what = "shared center '" + name + "' is stale: it was left by a run that crashed or was killed (" +
               describe_creator(h, false) + "). It is not reused silently: " + unlink_hint +
               ", then create it again";
      }
      munmap(base, sizeof(SegmentHeader));
    }
  }
  close(fd);
  return what;
}

}  // namespace

Segment::Segment(std::string name, int fd, void* base, size_t bytes)
    : name_(std::move(name)), fd_(fd), base_(base), bytes_(bytes) {
  header_ = static_cast<SegmentHeader*>(base_);
  data_ = reinterpret_cast<float*>(static_cast<char*>(base_) + header_->data_offset);
}

Segment::~Segment() {
#if defined(EASGD_EXT_WITH_CUDA)
  if (pinned_) cuda::host_unregister(base_);
#endif
  if (base_ != nullptr) munmap(base_, bytes_);
  if (fd_ >= 0) close(fd_);
}

Segment* Segment::create(const std::string& name, int64_t numel, int64_t chunk_numel,
                         int max_workers, const std::string& layout_digest, bool persistent) {
  if (numel < 1) throw std::invalid_argument("the center needs at least one element, got " + std::to_string(numel));
  if (chunk_numel < 1) throw std::invalid_argument("chunk_numel must be >= 1, got " + std::to_string(chunk_numel));
  if (max_workers < 1 || max_workers > 65536) {
    throw std::invalid_argument("workers must be between 1 and 65536, got " + std::to_string(max_workers));
  }
  if (layout_digest.size() >= sizeof(SegmentHeader::layout_digest)) {
    throw std::invalid_argument("layout digest is too long");
  }
  const std::string posix = posix_name(name);
  const Plan p = plan(numel, chunk_numel, max_workers);

  const int fd = shm_open(posix.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) {
    if (errno == EEXIST) throw Exists(describe_existing(name, posix));
    throw std::runtime_error("cannot create shared memory '" + name + "': " + errno_text(errno));
  }
  auto fail = [&](const std::string& what) {
    const int err = errno;
    shm_unlink(posix.c_str());
    close(fd);
    throw std::runtime_error("cannot create shared center '" + name + "' (" + std::to_string(p.total_bytes) +
                             " bytes): " + what + ": " + errno_text(err));
  };
  if (fchmod(fd, 0600) != 0) fail("fchmod");
  if (ftruncate(fd, off_t(p.total_bytes)) != 0) fail("ftruncate");
  void* base = mmap(nullptr, p.total_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) fail("mmap");
  // Touch every page now (ftruncate gave zeros, lazily): a /dev/shm too small for the center
  // fails here with a clear error instead of SIGBUS in the middle of training.
  if (posix_fallocate(fd, 0, off_t(p.total_bytes)) != 0) {
    munmap(base, p.total_bytes);
    errno = ENOSPC;
    fail("not enough room in /dev/shm");
  }

  auto* h = static_cast<SegmentHeader*>(base);
  std::memcpy(h->magic, kMagic, sizeof kMagic);
  h->version = kVersion;
  h->header_bytes = uint32_t(sizeof(SegmentHeader));
  h->total_bytes = p.total_bytes;
  h->dtype = kDtypeFloat32;
  h->max_workers = uint32_t(max_workers);
  h->numel = numel;
  h->chunk_numel = chunk_numel;
  h->num_chunks = p.num_chunks;
  h->chunks_offset = p.chunks_offset;
  h->workers_offset = p.workers_offset;
  h->data_offset = p.data_offset;
  h->creator_pid = getpid();
  h->creator_start_ticks = process_start_ticks(getpid());
  h->created_unix_ns = now_unix_ns();
  h->creator_uid = uint32_t(geteuid());
  h->flags = persistent ? kPersistent : 0;
  gethostname(h->creator_host, sizeof h->creator_host - 1);
  std::snprintf(h->layout_digest, sizeof h->layout_digest, "%s", layout_digest.c_str());

  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
  auto* chunks = reinterpret_cast<ChunkSlot*>(static_cast<char*>(base) + p.chunks_offset);
  for (int64_t k = 0; k < p.num_chunks; ++k) {
    new (&chunks[k]) ChunkSlot();
    pthread_mutex_init(&chunks[k].mutex, &attr);
  }
  pthread_mutexattr_destroy(&attr);
  auto* workers = reinterpret_cast<WorkerSlot*>(static_cast<char*>(base) + p.workers_offset);
  for (int w = 0; w < max_workers; ++w) new (&workers[w]) WorkerSlot();
  h->ready.store(1, std::memory_order_release);
  return new Segment(posix.substr(1), fd, base, p.total_bytes);
}

Segment* Segment::attach(const std::string& name, bool allow_stale) {
  const std::string posix = posix_name(name);
  const int fd = shm_open(posix.c_str(), O_RDWR, 0);
  if (fd < 0) {
    if (errno == ENOENT) {
      throw NotFound("no shared center named '" + name + "' (looked for /dev/shm" + posix +
                     "); create it first with SharedCenter.create(name, like=params)");
    }
    throw std::runtime_error("cannot open shared center '" + name + "': " + errno_text(errno));
  }
  auto reject = [&](const std::string& why) {
    close(fd);
    throw Incompatible("shared memory '" + name + "' cannot be attached: " + why);
  };
  struct stat st;
  if (fstat(fd, &st) != 0) reject(errno_text(errno));
  if (st.st_uid != geteuid()) {
    reject("it belongs to uid " + std::to_string(st.st_uid) + ", not to this user (uid " +
           std::to_string(geteuid()) + ")");
  }
  const size_t size = size_t(st.st_size);
  if (size < sizeof(SegmentHeader)) {
    reject("it is " + std::to_string(size) + " bytes, too small to hold even the header (" +
           std::to_string(sizeof(SegmentHeader)) + " bytes)");
  }
  void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (base == MAP_FAILED) reject("mmap: " + errno_text(errno));
  const auto& h = *static_cast<const SegmentHeader*>(base);
  auto reject_mapped = [&](const std::string& why) {
    munmap(base, size);
    reject(why);
  };
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) reject_mapped("it is not an easgd_ext shared center");
  if (h.version != kVersion) {
    reject_mapped("it has layout version " + std::to_string(h.version) + ", this build reads version " +
                  std::to_string(kVersion) + " (was it created by another easgd_ext version?)");
  }
  if (h.header_bytes != sizeof(SegmentHeader)) {
    reject_mapped("its header is " + std::to_string(h.header_bytes) + " bytes, this build expects " +
                  std::to_string(sizeof(SegmentHeader)));
  }
  if (h.dtype != kDtypeFloat32) reject_mapped("its center is not float32");
  if (h.numel < 1 || h.chunk_numel < 1 || h.max_workers < 1) reject_mapped("its header is corrupt");
  const Plan p = plan(h.numel, h.chunk_numel, int(h.max_workers));
  if (h.total_bytes != p.total_bytes || h.num_chunks != p.num_chunks || h.data_offset != p.data_offset ||
      h.chunks_offset != p.chunks_offset || h.workers_offset != p.workers_offset) {
    reject_mapped("its header is inconsistent with its own sizes (corrupt?)");
  }
  if (size != p.total_bytes) {
    reject_mapped("it is " + std::to_string(size) + " bytes but its header says " +
                  std::to_string(p.total_bytes) + " (truncated?)");
  }
  // The creator marks the segment ready last; give a racing create a moment to finish.
  for (int i = 0; i < 500 && h.ready.load(std::memory_order_acquire) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (h.ready.load(std::memory_order_acquire) == 0) {
    reject_mapped("it was never finished (its creator died while creating it?); remove it with "
                  "SharedCenter.remove('" + posix.substr(1) + "')");
  }
  if (!allow_stale && (h.flags & kPersistent) == 0 && !process_alive(h.creator_pid, h.creator_start_ticks)) {
    const std::string why = describe_creator(h, false);
    munmap(base, size);
    close(fd);
    throw Stale("shared center '" + name + "' is stale: " + why +
                ". A center left by a crashed run is not reused silently: remove it with "
                "SharedCenter.remove('" + posix.substr(1) + "'), or pass allow_stale=True to "
                "attach to it anyway");
  }
  return new Segment(posix.substr(1), fd, base, size);
}

bool Segment::unlink(const std::string& name) {
  const std::string posix = posix_name(name);
  if (shm_unlink(posix.c_str()) == 0) return true;
  if (errno == ENOENT) return false;
  throw std::runtime_error("cannot unlink shared center '" + name + "': " + errno_text(errno));
}

bool Segment::creator_alive() const {
  return process_alive(header_->creator_pid, header_->creator_start_ticks);
}

bool Segment::pin_for_cuda() {
#if defined(EASGD_EXT_WITH_CUDA)
  if (!pinned_) pinned_ = cuda::host_register(base_, bytes_);
  return pinned_;
#else
  return false;
#endif
}

}  // namespace shm
}  // namespace easgd
