#include "process_liveness.h"

#include <errno.h>
#include <signal.h>

#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>

namespace easgd {
namespace shm {
namespace {

// "/proc/<pid>/stat": "pid (comm) S ppid ..."; the state is the field after the last ')', and
// the start time is the 20th field after it.
bool read_proc_stat(int64_t pid, char* state, uint64_t* start_ticks) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!in || !std::getline(in, line)) return false;
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return false;
  std::istringstream rest(line.substr(close + 1));
  std::string field;
  for (int i = 1; i <= 20 && rest >> field; ++i) {
    if (i == 1) *state = field.empty() ? '?' : field[0];
    if (i == 20) { *start_ticks = std::strtoull(field.c_str(), nullptr, 10); return true; }
  }
  return false;
}

}  // namespace

uint64_t process_start_ticks(int64_t pid) {
  char state = '?';
  uint64_t ticks = 0;
  return read_proc_stat(pid, &state, &ticks) ? ticks : 0;
}

bool process_alive(int64_t pid, uint64_t start_ticks) {
  // A pid read from shared memory may be anything: one past pid_t would wrap in kill() (to -1:
  // every process) and name someone else.
  if (pid <= 0 || pid > std::numeric_limits<pid_t>::max()) return false;
  if (kill(pid_t(pid), 0) != 0 && errno == ESRCH) return false;
  char state = '?';
  uint64_t ticks = 0;
  if (!read_proc_stat(pid, &state, &ticks)) return true;  // no /proc: kill() said it exists
  if (state == 'Z' || state == 'X') return false;           // exited, not yet reaped
  return start_ticks == 0 || ticks == start_ticks;          // a reused PID is someone else
}

}  // namespace shm
}  // namespace easgd
