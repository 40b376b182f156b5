// Properties of the current device that launch shapes depend on, asked once per device.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "cuda/cuda_check.h"

namespace q3n::cuda {

// The current device's SM count.
inline int sm_count() {
    static std::atomic<int> known[16];  // per device ordinal; 0 = not asked yet
    int dev = 0;
    Q3N_CUDA(cudaGetDevice(&dev));
    if (dev < 16)
        if (const int v = known[dev].load(std::memory_order_relaxed)) return v;
    int n = 0;
    Q3N_CUDA(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    if (dev < 16) known[dev].store(n, std::memory_order_relaxed);
    return n;
}

}  // namespace q3n::cuda
