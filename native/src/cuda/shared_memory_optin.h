// Dynamic shared memory past the default 48 KB: a kernel must ask for it once per device.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda/cuda_check.h"

namespace q3n::cuda {

// The dynamic shared memory one block of `kernel` can have on the current device once allowed
// (static and dynamic shared memory share the opt-in limit).
inline size_t shared_memory_optin_cap(const void* kernel) {
    int dev = 0, optin = 0;
    Q3N_CUDA(cudaGetDevice(&dev));
    Q3N_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    cudaFuncAttributes attributes{};
    Q3N_CUDA(cudaFuncGetAttributes(&attributes, kernel));
    return static_cast<size_t>(optin - static_cast<int>(attributes.sharedSizeBytes));
}

// Raises `kernel`'s dynamic shared memory limit to the device's cap, once per kernel and device, when
// `bytes` needs more than the default (a cap, not a reservation: occupancy follows the bytes each
// launch asks for). Safe while a stream is being captured: it enqueues nothing.
inline void allow_shared_memory(const void* kernel, size_t bytes) {
    if (bytes <= 48 * 1024) return;
    static std::mutex mu;
    static std::vector<std::pair<const void*, int>> done;
    int dev = 0;
    Q3N_CUDA(cudaGetDevice(&dev));
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& d : done)
        if (d.first == kernel && d.second == dev) return;
    const size_t cap = shared_memory_optin_cap(kernel);
    if (bytes > cap) fail(Q3N_ERR_INTERNAL, "a kernel needs more shared memory than the device has");
    Q3N_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(cap)));
    done.emplace_back(kernel, dev);
}

}  // namespace q3n::cuda
