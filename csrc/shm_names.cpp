#include "shm_names.h"

#include <cstdio>
#include <stdexcept>

namespace easgd {
namespace shm {

namespace {
constexpr size_t kMaxName = 200;   // well under NAME_MAX (255) of /dev/shm
constexpr size_t kMaxQuoted = 60;

bool allowed(char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
         ch == '-' || ch == '_' || ch == '.';
}
}  // namespace

std::string quoted(const std::string& name) {
  std::string out = "'";
  size_t shown = 0;
  for (char ch : name) {
    if (shown == kMaxQuoted) {
      out += "...' (" + std::to_string(name.size()) + " characters)";
      return out;
    }
    const auto byte = static_cast<unsigned char>(ch);
    if (byte >= 0x20 && byte < 0x7f && ch != '\'' && ch != '\\') {
      out += ch;
    } else {
      char esc[8];
      std::snprintf(esc, sizeof esc, "\\x%02x", byte);
      out += esc;
    }
    ++shown;
  }
  return out + "'";
}

std::string posix_name(const std::string& name) {
  const std::string bare = !name.empty() && name[0] == '/' ? name.substr(1) : name;
  if (bare.empty() || bare.size() > kMaxName) {
    throw std::invalid_argument("name must be 1 to " + std::to_string(kMaxName) +
                                " characters, got " + std::to_string(bare.size()) + ": " +
                                quoted(name));
  }
  for (size_t i = 0; i < bare.size(); ++i) {
    if (!allowed(bare[i])) {
      throw std::invalid_argument("name " + quoted(name) + " may only contain letters, digits, "
                                  "'-', '_' and '.' (character " + std::to_string(i) + " is not)");
    }
  }
  if (bare == "." || bare == "..") throw std::invalid_argument("name " + quoted(name) + " is not allowed");
  return "/" + bare;
}

std::string shm_path(const std::string& posix) { return "/dev/shm" + posix; }

}  // namespace shm
}  // namespace easgd
