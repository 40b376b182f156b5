// Every CUDA call is checked; a failure becomes q3n::Error(Q3N_ERR_DEVICE) naming the call.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "core/error.h"

namespace q3n::cuda {

inline void check(cudaError_t e, const char* what, const char* file, int line) {
    if (e != cudaSuccess)
        fail(Q3N_ERR_DEVICE, std::string("CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                                 ") in " + what + " at " + file + ":" + std::to_string(line));
}

}  // namespace q3n::cuda

#define Q3N_CUDA(call) ::q3n::cuda::check((call), #call, __FILE__, __LINE__)
#define Q3N_CUDA_LAUNCHED(name) ::q3n::cuda::check(cudaGetLastError(), name, __FILE__, __LINE__)
