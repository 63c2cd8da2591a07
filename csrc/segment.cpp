// Creating, attaching and validating a shared center (see segment.h).
#include "segment.h"

#if defined(EASGD_EXT_WITH_CUDA)
#include "kernels.h"  // cuda::host_register
#endif

#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <limits>
#include <thread>

#include "process_liveness.h"
#include "shm_names.h"

namespace easgd {
namespace shm {
namespace {

static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<int64_t>::is_always_lock_free,
              "shared-memory counters must be lock-free atomics");

// Sizes and offsets in unsigned 64-bit arithmetic: false instead of a wrapped value.
bool round_up(uint64_t n, uint64_t to, uint64_t* out) {
  uint64_t bumped;
  if (__builtin_add_overflow(n, to - 1, &bumped)) return false;
  *out = bumped / to * to;
  return true;
}

struct Plan {
  uint64_t num_chunks = 0;
  uint64_t chunks_offset = 0, workers_offset = 0, data_offset = 0, total_bytes = 0;
};

// Where everything lies in a segment of these sizes; false when a size would not fit 64 bits
// (or an off_t), which only a corrupt header (or an absurd request) asks for.
bool plan(uint64_t numel, uint64_t chunk_numel, uint64_t max_workers, Plan* p) {
  if (numel == 0 || chunk_numel == 0) return false;
  p->num_chunks = (numel - 1) / chunk_numel + 1;  // no numel + chunk_numel - 1 to overflow
  uint64_t chunk_bytes, worker_bytes, data_bytes, end_of_workers, end_of_data;
  return round_up(sizeof(SegmentHeader), 64, &p->chunks_offset) &&
         !__builtin_mul_overflow(p->num_chunks, uint64_t(sizeof(ChunkSlot)), &chunk_bytes) &&
         !__builtin_add_overflow(p->chunks_offset, chunk_bytes, &p->workers_offset) &&
         !__builtin_mul_overflow(max_workers, uint64_t(sizeof(WorkerSlot)), &worker_bytes) &&
         !__builtin_add_overflow(p->workers_offset, worker_bytes, &end_of_workers) &&
         round_up(end_of_workers, 4096, &p->data_offset) &&
         !__builtin_mul_overflow(numel, uint64_t(sizeof(float)), &data_bytes) &&
         !__builtin_add_overflow(p->data_offset, data_bytes, &end_of_data) &&
         round_up(end_of_data, 4096, &p->total_bytes) &&
         p->total_bytes <= uint64_t(std::numeric_limits<off_t>::max());
}

std::string errno_text(int err) { return std::strerror(err); }

std::string format_time(int64_t unix_ns) {
  const time_t secs = time_t(unix_ns / 1000000000);
  tm parts;
  if (localtime_r(&secs, &parts) == nullptr) return "an unknown time";  // a corrupt timestamp
  char out[64];
  if (strftime(out, sizeof out, "%Y-%m-%d %H:%M:%S", &parts) == 0) return "an unknown time";
  return out;
}

std::string describe_creator(const SegmentHeader& h, bool alive) {
  std::string host(h.creator_host, strnlen(h.creator_host, sizeof h.creator_host));
  return "created by pid " + std::to_string(h.creator_pid) + " on " + host + " at " +
         format_time(h.created_unix_ns) + (alive ? ", still running" : ", which is gone");
}

std::string owner_text(uid_t uid) {
  std::string out = "uid " + std::to_string(uid);
  passwd entry;
  passwd* found = nullptr;
  char buf[1024];
  if (getpwuid_r(uid, &entry, buf, sizeof buf, &found) == 0 && found != nullptr) {
    out += std::string(" (") + found->pw_name + ")";
  }
  return out;
}

std::string not_ours(uid_t owner) {
  return "belongs to " + owner_text(owner) + ", not to this user, " + owner_text(geteuid()) +
         " (shared centers are private to the user who created them)";
}

// ---- opening an existing name -------------------------------------------------------------------

std::string file_kind(mode_t mode) {
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISLNK(mode)) return "a symbolic link";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "a special file";
}

enum class Found { regular, missing, denied, directory, special, error };

struct Opened {
  Found found = Found::error;
  int fd = -1;       // set for Found::regular only
  struct stat st {};
  std::string why;   // what is wrong, to follow "<the name> " in a sentence
};

// A name that is not a regular file: said what it is, never read.
Opened not_a_file(const struct stat& st) {
  Opened o;
  o.st = st;
  o.found = S_ISDIR(st.st_mode) ? Found::directory : Found::special;
  o.why = "is " + file_kind(st.st_mode) + ", not an easgd_ext center";
  if (st.st_uid != geteuid()) o.why += " (it belongs to " + owner_text(st.st_uid) + ")";
  return o;
}

// Opens an existing name without ever blocking or following a link: anyone can put a FIFO (a
// blocking open waits for a writer forever), a directory or a symlink at /dev/shm/<name>.
// Only a regular file of this user comes back open.
Opened open_existing(const std::string& posix, int access) {
  struct stat st;
  // Look first: a FIFO or a device is described without being opened at all.
  if (lstat(shm_path(posix).c_str(), &st) == 0 && !S_ISREG(st.st_mode)) return not_a_file(st);
  const int fd = shm_open(posix.c_str(), access | O_NONBLOCK | O_NOFOLLOW | O_NOCTTY, 0);
  const int err = errno;
  // What is there now (it may have been swapped since the look): the opened file itself, or,
  // when the open was refused, the name, not followed.
  const bool seen = fd >= 0 ? fstat(fd, &st) == 0 : lstat(shm_path(posix).c_str(), &st) == 0;
  Opened o;
  o.st = st;
  if (!seen) {
    o.found = fd < 0 && err == ENOENT ? Found::missing : Found::error;
    o.why = errno_text(fd < 0 ? err : errno);
  } else if (!S_ISREG(st.st_mode)) {
    o = not_a_file(st);
  } else if (fd < 0 && err != EACCES && err != EPERM) {
    o.why = errno_text(err);
  } else if (st.st_uid != geteuid()) {
    o.found = Found::denied;
    o.why = not_ours(st.st_uid);
  } else if (fd < 0) {  // ours, but its mode refuses us
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", unsigned(st.st_mode & 07777));
    o.found = Found::denied;
    o.why = std::string("has mode ") + mode + ": " + errno_text(err);
  } else {
    o.found = Found::regular;
    o.fd = fd;
    return o;
  }
  if (fd >= 0) close(fd);
  return o;
}

// ---- the header validator -------------------------------------------------------------------------

// Whether a fixed-size text field is NUL-terminated printable ASCII (what Python decodes, and
// what create writes).
bool is_text(const char* field, size_t cap) {
  const size_t n = strnlen(field, cap);
  if (n == cap) return false;
  return std::all_of(field, field + n, [](char c) { return c >= 0x20 && c < 0x7f; });
}

void make_text(char* field, size_t cap) {
  field[cap - 1] = '\0';
  for (char* c = field; *c != '\0'; ++c) {
    if (*c < 0x20 || *c >= 0x7f) *c = '?';
  }
}

struct Problem {
  bool foreign = false;  // not an easgd_ext center at all (else: one this build cannot use)
  std::string why;
  explicit operator bool() const { return !why.empty(); }
};

// Whether this is an easgd_ext center of this build's layout: the fields that say where the
// others are.
Problem identity_problem(const SegmentHeader& h) {
  if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) return {true, "it is not an easgd_ext shared center"};
  if (h.version != kVersion) {
    return {false, "it has layout version " + std::to_string(h.version) + ", this build reads version " +
                       std::to_string(kVersion) + " (was it created by another easgd_ext version?)"};
  }
  if (h.header_bytes != sizeof(SegmentHeader)) {
    return {false, "its header is " + std::to_string(h.header_bytes) + " bytes, this build expects " +
                       std::to_string(sizeof(SegmentHeader))};
  }
  return {};
}

Problem corrupt(const std::string& field, const std::string& value, const std::string& rule) {
  return {false, "its header is corrupt: " + field + " is " + value + ", " + rule};
}

// Every field checked against what the segment's own sizes give, before any of them is used to
// compute an address.
Problem layout_problem(const SegmentHeader& h, uint64_t file_size) {
  if (h.max_workers < 1 || h.max_workers > kMaxWorkers) {
    return corrupt("max_workers", std::to_string(h.max_workers), "outside 1.." + std::to_string(kMaxWorkers));
  }
  const uint64_t room = file_size / sizeof(float);  // no numel above this fits the file
  if (h.numel < 1 || uint64_t(h.numel) > room) {
    return corrupt("numel", std::to_string(h.numel),
                   "outside 1.." + std::to_string(room) + " (what its " + std::to_string(file_size) +
                       " bytes could hold)");
  }
  if (h.chunk_numel < 1) return corrupt("chunk_numel", std::to_string(h.chunk_numel), "below 1");
  Plan p;
  if (!plan(uint64_t(h.numel), uint64_t(h.chunk_numel), h.max_workers, &p)) {
    return corrupt("numel", std::to_string(h.numel), "too large: its sizes overflow 64 bits");
  }
  const struct { const char* field; int64_t value; uint64_t expected; } sizes[] = {
      {"num_chunks", h.num_chunks, p.num_chunks},
      {"chunks_offset", int64_t(h.chunks_offset), p.chunks_offset},
      {"workers_offset", int64_t(h.workers_offset), p.workers_offset},
      {"data_offset", int64_t(h.data_offset), p.data_offset},
      {"total_bytes", int64_t(h.total_bytes), p.total_bytes},
  };
  for (const auto& s : sizes) {
    if (uint64_t(s.value) != s.expected) {
      return corrupt(s.field, std::to_string(uint64_t(s.value)),
                     "but numel, chunk_numel and max_workers give " + std::to_string(s.expected));
    }
  }
  return {};
}

// The one validator of a header read from shared memory (attach, create's description of a
// taken name, and through attach list and sweep): every field in range, in unsigned arithmetic,
// and consistent with a file of file_size bytes.
Problem header_problem(const SegmentHeader& h, uint64_t file_size) {
  if (Problem p = identity_problem(h)) return p;
  if (h.dtype != kDtypeFloat32) {
    return corrupt("dtype", std::to_string(h.dtype), "but only float32 (0) exists");
  }
  if ((h.flags & ~kPersistent) != 0) {
    return corrupt("flags", std::to_string(h.flags), "but only bit 0 (persistent) is defined");
  }
  if (h.total_bytes != file_size) {
    return {false, "it is " + std::to_string(file_size) + " bytes but its header says " +
                       std::to_string(h.total_bytes) + " (truncated, or total_bytes is corrupt)"};
  }
  if (Problem p = layout_problem(h, file_size)) return p;
  if (h.creator_pid < 1 || h.creator_pid > std::numeric_limits<pid_t>::max()) {
    return corrupt("creator_pid", std::to_string(h.creator_pid), "not a process id");
  }
  if (!is_text(h.creator_host, sizeof h.creator_host)) {
    return corrupt("creator_host", "not NUL-terminated printable text", "as create writes it");
  }
  if (!is_text(h.layout_digest, sizeof h.layout_digest)) {
    return corrupt("layout_digest", "not NUL-terminated printable text", "as create writes it");
  }
  if (h.ready.load(std::memory_order_acquire) > 1) {
    return corrupt("ready", std::to_string(h.ready.load()), "but it is a 0/1 flag");
  }
  return {};
}

// The creator marks the segment ready last; give a racing create a moment to finish.
bool wait_until_ready(const SegmentHeader& h) {
  for (int i = 0; i < 500 && h.ready.load(std::memory_order_acquire) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return h.ready.load(std::memory_order_acquire) != 0;
}

std::string unlink_hint(const std::string& posix) {
  return "remove it with SharedCenter.remove('" + posix.substr(1) + "') (or rm " + shm_path(posix) + ")";
}

// ---- why a name is taken, for the create error --------------------------------------------------

// A regular file of this user (o.fd open): a live center, a stale or corrupt one, or not ours.
std::string describe_file(const std::string& name, const std::string& posix, const Opened& o) {
  const std::string taken = "shared memory '" + name + "' already exists and ";
  const uint64_t size = uint64_t(o.st.st_size);
  if (size < sizeof(SegmentHeader)) return taken + "is not an easgd_ext center; pick another name";
  void* base = mmap(nullptr, sizeof(SegmentHeader), PROT_READ, MAP_SHARED, o.fd, 0);
  if (base == MAP_FAILED) return "shared memory '" + name + "' already exists (" + errno_text(errno) + ")";
  const auto& h = *static_cast<const SegmentHeader*>(base);
  std::string what;
  const Problem problem = header_problem(h, size);
  if (problem.foreign) {
    what = taken + "is not an easgd_ext center; pick another name";
  } else if (!identity_problem(h) && h.ready.load(std::memory_order_acquire) == 0) {
    what = "shared center '" + name + "' already exists but was never finished (it is being created right "
           "now, or its creator died doing so); if nothing is creating it, " + unlink_hint(posix) +
           ", then create it again";
  } else if (problem) {
    what = "shared center '" + name + "' already exists but cannot be used: " + problem.why + ". If nothing "
           "uses it, " + unlink_hint(posix) + ", then create it again";
  } else if (process_alive(h.creator_pid, h.creator_start_ticks)) {
    what = "shared center '" + name + "' already exists and is in use (" + describe_creator(h, true) +
           "); pick another name, or attach to it";
  } else {
    what = "shared center '" + name + "' is stale: it was left by a run that crashed or was killed (" +
           describe_creator(h, false) + "). It is not reused silently: " + unlink_hint(posix) +
           ", then create it again";
  }
  munmap(base, sizeof(SegmentHeader));
  return what;
}

std::string describe_existing(const std::string& name, const std::string& posix) {
  Opened o = open_existing(posix, O_RDONLY);
  switch (o.found) {
    case Found::regular: {
      const std::string what = describe_file(name, posix, o);
      close(o.fd);
      return what;
    }
    case Found::missing:
      return "shared memory '" + name + "' existed a moment ago and is gone now; try again";
    case Found::denied:
      return "shared memory '" + name + "' already exists and " + o.why + "; pick another name";
    case Found::directory:
    case Found::special:
      return "shared memory '" + name + "' already exists: " + shm_path(posix) + " " + o.why +
             "; pick another name";
    case Found::error:
      break;
  }
  return "shared memory '" + name + "' already exists (" + o.why + ")";
}

}  // namespace

Segment::Segment(std::string name, int fd, void* base, size_t bytes)
    : name_(std::move(name)), fd_(fd), base_(base), bytes_(bytes) {
  // Called only on a header that create wrote or header_problem passed.
  header_ = static_cast<SegmentHeader*>(base_);
  char* const bytes_at = static_cast<char*>(base_);
  numel_ = header_->numel;
  num_chunks_ = header_->num_chunks;
  max_workers_ = header_->max_workers;
  chunks_ = reinterpret_cast<ChunkSlot*>(bytes_at + header_->chunks_offset);
  workers_ = reinterpret_cast<WorkerSlot*>(bytes_at + header_->workers_offset);
  data_ = reinterpret_cast<float*>(bytes_at + header_->data_offset);
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
  if (max_workers < 1 || uint32_t(max_workers) > kMaxWorkers) {
    throw std::invalid_argument("workers must be between 1 and " + std::to_string(kMaxWorkers) + ", got " +
                                std::to_string(max_workers));
  }
  if (layout_digest.size() >= sizeof(SegmentHeader::layout_digest)) {
    throw std::invalid_argument("layout digest is too long");
  }
  if (!is_text(layout_digest.c_str(), layout_digest.size() + 1)) {
    throw std::invalid_argument("layout digest must be printable ASCII");  // what attach accepts
  }
  const std::string posix = posix_name(name);
  Plan p;
  if (!plan(uint64_t(numel), uint64_t(chunk_numel), uint64_t(max_workers), &p)) {
    throw std::invalid_argument("a center of " + std::to_string(numel) + " elements is too large to map");
  }

  const int fd = shm_open(posix.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) {
    if (errno == EEXIST) throw Exists(describe_existing(name, posix));
    const std::string why = "cannot create shared memory '" + name + "': " + errno_text(errno);
    if (errno == EACCES || errno == EPERM) throw Denied(why);
    throw std::runtime_error(why);
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
  h->num_chunks = int64_t(p.num_chunks);
  h->chunks_offset = p.chunks_offset;
  h->workers_offset = p.workers_offset;
  h->data_offset = p.data_offset;
  h->creator_pid = getpid();
  h->creator_start_ticks = process_start_ticks(getpid());
  h->created_unix_ns = now_unix_ns();
  h->creator_uid = uint32_t(geteuid());
  h->flags = persistent ? kPersistent : 0;
  gethostname(h->creator_host, sizeof h->creator_host - 1);
  make_text(h->creator_host, sizeof h->creator_host);  // printable, as the validator wants it
  std::snprintf(h->layout_digest, sizeof h->layout_digest, "%s", layout_digest.c_str());

  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
  auto* chunks = reinterpret_cast<ChunkSlot*>(static_cast<char*>(base) + p.chunks_offset);
  for (uint64_t k = 0; k < p.num_chunks; ++k) {
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
  const std::string refused = "shared memory '" + name + "' cannot be attached: ";
  const Opened o = open_existing(posix, O_RDWR);
  switch (o.found) {
    case Found::regular:
      break;
    case Found::missing:
      throw NotFound("no shared center named '" + name + "' (looked for " + shm_path(posix) +
                     "); create it first with SharedCenter.create(name, like=params)");
    case Found::denied:
      throw Denied(refused + "it " + o.why);
    case Found::directory:
      throw IsDirectory(refused + shm_path(posix) + " " + o.why);
    case Found::special:
      throw Incompatible(refused + shm_path(posix) + " " + o.why);
    case Found::error:
      throw std::runtime_error("cannot open shared center '" + name + "': " + o.why);
  }
  const int fd = o.fd;
  auto reject = [&](const std::string& why) {
    close(fd);
    throw Incompatible(refused + why);
  };
  const size_t size = size_t(o.st.st_size);
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
  if (!identity_problem(h) && !wait_until_ready(h)) {
    reject_mapped("it was never finished (its creator died while creating it?); " + unlink_hint(posix));
  }
  if (const Problem problem = header_problem(h, size)) {
    reject_mapped(problem.why + (problem.foreign ? "" : ". If nothing uses it, " + unlink_hint(posix)));
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
  const int err = errno;
  if (err == ENOENT) return false;
  struct stat st;
  if ((err == EACCES || err == EPERM) && lstat(shm_path(posix).c_str(), &st) == 0 && st.st_uid != geteuid()) {
    throw Denied("cannot remove shared memory '" + name + "': it " + not_ours(st.st_uid));
  }
  const std::string why = "cannot unlink shared center '" + name + "': " + errno_text(err);
  if (err == EACCES || err == EPERM) throw Denied(why);
  throw std::runtime_error(why);
}

bool Segment::creator_alive() const {
  return process_alive(header_->creator_pid, header_->creator_start_ticks);
}

bool Segment::pin_for_cuda(int device) {
#if defined(EASGD_EXT_WITH_CUDA)
  if (!pinned_) pinned_ = cuda::host_register(base_, bytes_, device);
  return pinned_;
#else
  (void)device;
  return false;
#endif
}

}  // namespace shm
}  // namespace easgd
