// The library's one error channel for entry points outside c_api.cpp: the thread-local message
// that q3n_last_error returns lives there, and guard() is the same boundary as c_api.cpp's.
#pragma once

#include <exception>
#include <new>

#include "core/error.h"
#include "qwen3native.h"

namespace q3n::api {

void clear_last_error() noexcept;
q3n_status set_last_error(q3n_status status, const char* message) noexcept;

// Runs an entry point's body; any exception becomes a status plus the thread's message.
template <typename F>
q3n_status guard(F&& body) noexcept {
    try {
        clear_last_error();
        body();
        return Q3N_OK;
    } catch (const q3n::Error& e) {
        return set_last_error(e.status(), e.what());
    } catch (const std::bad_alloc&) {
        return set_last_error(Q3N_ERR_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception& e) {
        return set_last_error(Q3N_ERR_INTERNAL, e.what());
    } catch (...) {
        return set_last_error(Q3N_ERR_INTERNAL, "unknown internal error");
    }
}

}  // namespace q3n::api
