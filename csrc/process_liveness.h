// Whether a process that created a segment or holds a worker slot still runs, from /proc.
#pragma once

#include <cstdint>

namespace easgd {
namespace shm {

// Whether `pid` (started at `start_ticks`, 0 = unknown) is a live, non-zombie process; a
// reused pid with another start time is someone else.
bool process_alive(int64_t pid, uint64_t start_ticks);
// The process's start time in clock ticks since boot (0 where /proc cannot tell).
uint64_t process_start_ticks(int64_t pid);

}  // namespace shm
}  // namespace easgd
