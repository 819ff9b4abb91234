// The one error type of the host. Every message says what was expected and what was found, so main()
// can print it on one line and exit non-zero (the C++ counterpart of mindhier_rt.errors.MindhierError).
#pragma once

#include <stdexcept>
#include <string>

namespace mh {

class HostError : public std::runtime_error {
 public:
  explicit HostError(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace mh
