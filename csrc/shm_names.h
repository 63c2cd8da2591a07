// Names of shared centers: what is allowed, and how a name is quoted back in error messages.
#pragma once

#include <string>

namespace easgd {
namespace shm {

// "name" (a leading "/" is tolerated) -> "/name", or std::invalid_argument saying what is wrong.
std::string posix_name(const std::string& name);

// Where a POSIX name ("/name") lives as a file (glibc's shm_open: /dev/shm/name), to lstat it
// and to name it in messages.
std::string shm_path(const std::string& posix);

// A name as error messages show it: printable characters only (others escaped as \xNN) and at
// most ~60 characters, so a 10,000-character or binary name cannot flood or cut a message.
std::string quoted(const std::string& name);

}  // namespace shm
}  // namespace easgd
