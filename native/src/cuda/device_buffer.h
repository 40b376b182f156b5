// Owning device allocations. Grow-only scratch buffers keep the step path free of allocation once
// the largest batch has been seen.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "cuda/cuda_check.h"

namespace q3n::cuda {

class DeviceBuffer {
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes) { resize(bytes); }
    ~DeviceBuffer() { release(); }
    DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
        if (this != &o) {
            release();
            ptr_ = std::exchange(o.ptr_, nullptr);
            bytes_ = std::exchange(o.bytes_, 0);
        }
        return *this;
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;

    // Grows to at least `bytes` (contents are not kept).
    void reserve(size_t bytes) {
        if (bytes > bytes_) resize(bytes);
    }
    void resize(size_t bytes) {
        release();
        if (bytes == 0) return;
        const cudaError_t e = cudaMalloc(&ptr_, bytes);
        if (e == cudaErrorMemoryAllocation) {
            cudaGetLastError();
            fail(Q3N_ERR_OUT_OF_MEMORY, "GPU out of memory allocating " + std::to_string(bytes >> 20) + " MiB");
        }
        Q3N_CUDA(e);
        bytes_ = bytes;
    }
    template <typename T>
    T* as() const { return static_cast<T*>(ptr_); }
    void* get() const { return ptr_; }
    size_t bytes() const { return bytes_; }

private:
    void release() {
        if (ptr_) cudaFree(ptr_);
        ptr_ = nullptr;
        bytes_ = 0;
    }
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
};

}  // namespace q3n::cuda
