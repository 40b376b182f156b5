// Sticky device errors for the CUDA runners: after a CUDA failure the context is unusable (an
// illegal address poisons it), so every later call reports the first failure instead of running on.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "core/error.h"
#include "cuda/cuda_check.h"

namespace q3n::cuda {

class DeviceGuard {
public:
    explicit DeviceGuard(int device) : device_(device) {}

    template <typename F>
    void operator()(F&& body) {
        if (!error_.empty()) fail(Q3N_ERR_DEVICE, "the GPU failed earlier (" + error_ + "); restart the process");
        try {
            Q3N_CUDA(cudaSetDevice(device_));
            std::forward<F>(body)();
        } catch (const Error& e) {
            if (e.status() == Q3N_ERR_DEVICE) error_ = e.what();
            throw;
        }
    }

private:
    int device_;
    std::string error_;
};

}  // namespace q3n::cuda
