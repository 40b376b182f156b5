// The engine's one error type. Everything below the C boundary throws q3n::Error; api/c_api.cpp
// turns it into a q3n_status and the thread-local message, so no exception crosses the ABI.
#pragma once

#include <stdexcept>
#include <string>

#include "qwen3native.h"

namespace q3n {

class Error : public std::runtime_error {
public:
    Error(q3n_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    q3n_status status() const noexcept { return status_; }

private:
    q3n_status status_;
};

[[noreturn]] inline void fail(q3n_status status, const std::string& message) { throw Error(status, message); }

inline void require(bool condition, q3n_status status, const std::string& message) {
    if (!condition) fail(status, message);
}

}  // namespace q3n
