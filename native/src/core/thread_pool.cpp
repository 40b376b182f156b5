// The pool sits on the decode hot path (hundreds of parallel_for calls per token, many of them
// only a few microseconds of work each), so dispatch is built to cost as little as possible:
// persistent workers, one atomic word that both publishes a job and hands out its ranges (no
// queue, no allocation), a short spin before a worker sleeps, and a mutex/condition variable
// touched only when some worker actually went to sleep.
//
// Ranges are claimed, not assigned: whoever is running (the caller included) takes the next
// unclaimed range. A worker that is asleep, or preempted because the machine is oversubscribed,
// then delays nobody: the caller runs its range instead of waiting for it to be scheduled.
#include "core/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#include <immintrin.h>
#define Q3N_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define Q3N_CPU_RELAX() __asm__ __volatile__("yield")
#else
#define Q3N_CPU_RELAX() std::this_thread::yield()
#endif

#include "core/error.h"

namespace q3n {
namespace {

// Long enough to bridge the serial gap between two back-to-back kernels of one decode step
// (norms, residual adds, the caller's own bookkeeping), short enough that an idle pool stops
// burning cores almost at once. A futex wake costs tens of microseconds, which is why spinning
// at all pays off.
constexpr auto kWorkerSpin = std::chrono::microseconds(30);
// Pauses between clock reads while spinning: steady_clock::now() costs ~20 ns, a pause 10-140
// cycles, so this keeps the clock out of the way without overshooting the budget much.
constexpr int kPausesPerClockRead = 32;
// The caller yields its time slice after this many pauses waiting for stragglers, so that an
// oversubscribed machine (more pool threads than free cores) still makes progress.
constexpr int kCallerPausesBeforeYield = 4096;

// The job word: sequence (32 bits) | range count k (16) | next range to claim (16). Publishing
// a job is one store; claiming a range is one fetch_add, whose result names the job the range
// belongs to. So a worker that saw an older job and claims late still runs a range of the job it
// actually claimed from, whose fields are stable until all its ranges finish; and a claim past k
// is a no-op. The claim field cannot overflow: each thread overshoots k at most once per job.
constexpr unsigned kClaimBits = 16;
constexpr unsigned kKeyShift = kClaimBits;       // word >> kKeyShift: (sequence, k), the job's key
constexpr unsigned kSeqShift = 2 * kClaimBits;
constexpr uint64_t kFieldMask = (uint64_t{1} << kClaimBits) - 1;
constexpr unsigned kMaxThreads = 1024;  // k <= threads, and k + threads claims fit the claim field

inline size_t ranges_of(uint64_t word) { return static_cast<size_t>((word >> kKeyShift) & kFieldMask); }
inline size_t claim_of(uint64_t word) { return static_cast<size_t>(word & kFieldMask); }

// Range i of k over [0, n): the first n % k ranges are one longer, so every range is at least
// floor(n / k) >= grain long.
inline void range_of(size_t i, size_t n, size_t k, size_t& begin, size_t& end) {
    const size_t base = n / k, rem = n % k;
    begin = i * base + std::min(i, rem);
    end = begin + base + (i < rem ? 1 : 0);
}

}  // namespace

struct ThreadPool::Impl {
    explicit Impl(unsigned threads) : size(threads), errors(threads) {}

    ~Impl() {
        stop.store(true, std::memory_order_seq_cst);
        job.fetch_add(uint64_t{1} << kSeqShift, std::memory_order_seq_cst);
        { std::lock_guard<std::mutex> lock(mutex); }
        wake.notify_all();
        for (std::thread& t : workers) t.join();
    }

    // Claims and runs ranges of the current job until none is left; returns the key of the job
    // last claimed from. The acq_rel claim pairs with the caller's publishing store, so the job's
    // fields are visible; the release on `done` publishes fn's effects and errors to the caller.
    uint64_t run_ranges() noexcept {
        for (;;) {
            const uint64_t word = job.fetch_add(1, std::memory_order_acq_rel);
            const size_t index = claim_of(word), k = ranges_of(word);
            if (index >= k) return word >> kKeyShift;
            size_t begin, end;
            range_of(index, n, k, begin, end);
            try {
                (*fn)(begin, end);
            } catch (...) {
                errors[index] = std::current_exception();
            }
            done.fetch_add(1, std::memory_order_release);
        }
    }

    // Returns once the job's key differs from `seen`, or on stop: spins for kWorkerSpin, then sleeps.
    // Stop must count by itself: a worker that woke for the last job just before the destructor ran
    // can claim from the destructor's word (run_ranges returns its key), and then waits for a key
    // change that never comes. Waiting on the key alone hung ~1 run in 15 on a 16-core machine.
    void wait_for_job(uint64_t seen) {
        const auto changed = [&](std::memory_order order) {
            return (job.load(order) >> kKeyShift) != seen || stop.load(order);
        };
        const auto deadline = std::chrono::steady_clock::now() + kWorkerSpin;
        for (;;) {
            for (int i = 0; i < kPausesPerClockRead; ++i) {
                // Acquire, so that seeing the destructor's key change also shows its `stop`.
                if (changed(std::memory_order_acquire)) return;
                Q3N_CPU_RELAX();
            }
            if (std::chrono::steady_clock::now() >= deadline) break;
        }
        std::unique_lock<std::mutex> lock(mutex);
        // Announce the sleep before the final check of `job`; the caller stores `job` before it
        // reads `sleepers`. Both are seq_cst, so either the caller sees this sleeper and notifies
        // under the mutex, or this check sees the new job: no wake-up is lost.
        sleepers.fetch_add(1, std::memory_order_seq_cst);
        wake.wait(lock, [&] { return changed(std::memory_order_seq_cst); });
        sleepers.fetch_sub(1, std::memory_order_relaxed);
    }

    void worker_main() {
        uint64_t seen = 0;  // the key of the initial, empty job
        for (;;) {
            wait_for_job(seen);
            if (stop.load(std::memory_order_acquire)) return;
            // Skipping a job entirely (asleep, or merely slow) is harmless: its ranges get claimed
            // by whoever runs. A key that wrapped back to `seen` is therefore harmless too.
            seen = run_ranges();
        }
    }

    const unsigned size;
    std::vector<std::thread> workers;

    alignas(64) std::atomic<uint64_t> job{0};
    alignas(64) std::atomic<unsigned> done{0};  // ranges of the current job finished
    alignas(64) std::atomic<unsigned> sleepers{0};
    std::atomic<bool> busy{false};
    std::atomic<bool> stop{false};

    // The current job. Written by the caller before `job` is published; stable until it finishes.
    const std::function<void(size_t, size_t)>* fn = nullptr;
    size_t n = 0;
    uint64_t sequence = 0;
    std::vector<std::exception_ptr> errors;  // one slot per range, so no lock and no allocation

    std::mutex mutex;
    std::condition_variable wake;
};

ThreadPool::ThreadPool(unsigned threads) {
    if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
    threads = std::min(threads, kMaxThreads);
    impl_ = std::make_unique<Impl>(threads);
    // If a thread fails to start, ~Impl (run as impl_ unwinds) stops and joins those that did.
    impl_->workers.reserve(threads - 1);
    Impl* im = impl_.get();
    for (unsigned i = 1; i < threads; ++i) im->workers.emplace_back([im] { im->worker_main(); });
}

ThreadPool::~ThreadPool() = default;

unsigned ThreadPool::size() const { return impl_->size; }

void ThreadPool::parallel_for(size_t n, const std::function<void(size_t, size_t)>& fn, size_t grain) {
    if (n == 0) return;
    if (grain == 0) grain = 1;
    Impl& im = *impl_;
    const size_t ranges = std::min<size_t>(im.size, std::max<size_t>(1, n / grain));
    if (ranges == 1) {  // nothing to share: no atomics, no wake-ups, exceptions propagate directly
        fn(0, n);
        return;
    }

    // Reentry would deadlock (the inner call waits for workers that are busy in the outer one),
    // and so would two threads sharing a pool; fail loudly instead.
    if (im.busy.exchange(true, std::memory_order_acquire))
        fail(Q3N_ERR_INTERNAL, "ThreadPool::parallel_for called reentrantly or from two threads at once");
    struct BusyReset {
        std::atomic<bool>& flag;
        ~BusyReset() { flag.store(false, std::memory_order_release); }
    } busy_reset{im.busy};

    im.fn = &fn;
    im.n = n;
    im.done.store(0, std::memory_order_relaxed);
    im.sequence = (im.sequence + 1) & 0xFFFFFFFFu;
    im.job.store((im.sequence << kSeqShift) | (static_cast<uint64_t>(ranges) << kKeyShift), std::memory_order_seq_cst);
    if (im.sleepers.load(std::memory_order_seq_cst) != 0) {
        // Taking the mutex orders this notify after any sleeper's final check of `job`.
        { std::lock_guard<std::mutex> lock(im.mutex); }
        im.wake.notify_all();
    }

    im.run_ranges();

    // Every range is claimed by now; wait for those still running on workers.
    for (int spins = 0; im.done.load(std::memory_order_acquire) != ranges;) {
        if (spins < kCallerPausesBeforeYield) {
            Q3N_CPU_RELAX();
            ++spins;
        } else {
            std::this_thread::yield();
        }
    }

    std::exception_ptr first;
    for (size_t i = 0; i < ranges; ++i) {
        if (im.errors[i]) {
            if (!first) first = std::move(im.errors[i]);
            im.errors[i] = nullptr;
        }
    }
    if (first) std::rethrow_exception(first);
}

}  // namespace q3n
