// A fixed pool of worker threads for the CPU backend. The calling thread takes part in every
// parallel_for, so a pool of size 1 runs everything inline with no thread at all.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

namespace q3n {

class ThreadPool {
public:
    // `threads` counts the caller; 0 means std::thread::hardware_concurrency().
    explicit ThreadPool(unsigned threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    unsigned size() const;

    // Calls fn(begin, end) on disjoint contiguous ranges covering [0, n), in parallel, and returns
    // when all are done. Ranges are at least `grain` long (except the last). An exception thrown by
    // fn on any thread is rethrown here after every range has finished. Not reentrant: fn must not
    // call parallel_for on the same pool.
    void parallel_for(size_t n, const std::function<void(size_t, size_t)>& fn, size_t grain = 1);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace q3n
