#include "core/thread_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

namespace {

using q3n::ThreadPool;

struct Recorded {
    std::vector<std::pair<size_t, size_t>> ranges;
    std::vector<int> hits;
};

// Runs one parallel_for and records every range and how often each index was visited.
Recorded record(ThreadPool& pool, size_t n, size_t grain) {
    Recorded r;
    r.hits.assign(n, 0);
    std::mutex m;
    pool.parallel_for(
        n,
        [&](size_t begin, size_t end) {
            std::lock_guard<std::mutex> lock(m);
            r.ranges.emplace_back(begin, end);
            for (size_t i = begin; i < end; ++i) ++r.hits[i];
        },
        grain);
    std::sort(r.ranges.begin(), r.ranges.end());
    return r;
}

TEST(ThreadPool, SizeCountsTheCaller) {
    EXPECT_EQ(ThreadPool(1).size(), 1u);
    EXPECT_EQ(ThreadPool(3).size(), 3u);
    EXPECT_GE(ThreadPool(0).size(), 1u);
}

TEST(ThreadPool, CoversEveryIndexExactlyOnce) {
    for (unsigned threads : {1u, 2u, 3u, 4u, 8u}) {
        ThreadPool pool(threads);
        for (size_t n : {size_t{0}, size_t{1}, size_t{7}, size_t{1000}}) {
            for (size_t grain : {size_t{0}, size_t{1}, size_t{3}, size_t{64}, size_t{2000}}) {
                SCOPED_TRACE("threads=" + std::to_string(threads) + " n=" + std::to_string(n) +
                             " grain=" + std::to_string(grain));
                const Recorded r = record(pool, n, grain);
                for (size_t i = 0; i < n; ++i) ASSERT_EQ(r.hits[i], 1) << "index " << i;
                if (n == 0) {
                    EXPECT_TRUE(r.ranges.empty());
                    continue;
                }
                // Contiguous, non-empty, in order, no more than size() of them.
                ASSERT_FALSE(r.ranges.empty());
                EXPECT_LE(r.ranges.size(), threads);
                EXPECT_EQ(r.ranges.front().first, 0u);
                EXPECT_EQ(r.ranges.back().second, n);
                for (size_t k = 0; k + 1 < r.ranges.size(); ++k) EXPECT_EQ(r.ranges[k].second, r.ranges[k + 1].first);
                // Every range honours the grain (a lone range may be shorter when n < grain).
                const size_t g = std::max<size_t>(grain, 1);
                for (auto [b, e] : r.ranges) {
                    EXPECT_LT(b, e);
                    if (r.ranges.size() > 1) {
                        EXPECT_GE(e - b, g);
                    }
                }
                if (n < g) {
                    EXPECT_EQ(r.ranges.size(), 1u);
                }
                // With enough work it is split into one range per thread.
                if (n / g >= threads) {
                    EXPECT_EQ(r.ranges.size(), threads);
                }
            }
        }
    }
}

TEST(ThreadPool, SizeOneRunsInlineInOneRange) {
    ThreadPool pool(1);
    const auto caller = std::this_thread::get_id();
    int calls = 0;
    pool.parallel_for(1000, [&](size_t b, size_t e) {
        ++calls;  // unsynchronised on purpose: inline execution makes this safe
        EXPECT_EQ(std::this_thread::get_id(), caller);
        EXPECT_EQ(b, 0u);
        EXPECT_EQ(e, 1000u);
    });
    EXPECT_EQ(calls, 1);
}

TEST(ThreadPool, CallerTakesPartAndWorkersHelp) {
    ThreadPool pool(4);
    std::mutex m;
    std::vector<std::thread::id> ids;
    pool.parallel_for(4, [&](size_t, size_t) {
        // Long ranges, so that sleeping workers have long woken before the caller could claim
        // them all. (Ranges are claimed, so a thread may run two when another is descheduled.)
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        std::lock_guard<std::mutex> lock(m);
        ids.push_back(std::this_thread::get_id());
    });
    ASSERT_EQ(ids.size(), 4u);
    EXPECT_NE(std::find(ids.begin(), ids.end(), std::this_thread::get_id()), ids.end());
    std::sort(ids.begin(), ids.end());
    EXPECT_GT(std::unique(ids.begin(), ids.end()) - ids.begin(), 1) << "no worker took part";
}

TEST(ThreadPool, ExceptionIsRethrownAfterAllRangesFinish) {
    ThreadPool pool(4);
    for (size_t thrower : {size_t{0}, size_t{500}, size_t{999}}) {  // caller's range, a worker's, the last
        std::atomic<size_t> done{0};
        std::atomic<size_t> still_running{0};
        try {
            pool.parallel_for(1000, [&](size_t b, size_t e) {
                if (thrower >= b && thrower < e) throw std::runtime_error("boom at " + std::to_string(thrower));
                ++still_running;
                std::this_thread::sleep_for(std::chrono::milliseconds(20));
                done += e - b;
                --still_running;
            });
            FAIL() << "no exception";
        } catch (const std::runtime_error& ex) {
            EXPECT_EQ(std::string(ex.what()), "boom at " + std::to_string(thrower));
        }
        EXPECT_EQ(still_running.load(), 0u) << "rethrown before the other ranges finished";
        EXPECT_EQ(done.load(), 750u);  // 4 ranges of 250; the thrower's is missing
    }
    // The pool still works afterwards, and a stale error does not resurface.
    std::atomic<size_t> sum{0};
    pool.parallel_for(1000, [&](size_t b, size_t e) { sum += e - b; });
    EXPECT_EQ(sum.load(), 1000u);
}

TEST(ThreadPool, EveryThrowingRangeYieldsOneException) {
    ThreadPool pool(3);
    EXPECT_THROW(pool.parallel_for(300, [](size_t, size_t) { throw std::logic_error("all"); }), std::logic_error);
    std::atomic<size_t> sum{0};
    pool.parallel_for(300, [&](size_t b, size_t e) { sum += e - b; });
    EXPECT_EQ(sum.load(), 300u);
}

TEST(ThreadPool, ExceptionInInlinePathPropagates) {
    ThreadPool pool(4);
    EXPECT_THROW(pool.parallel_for(3, [](size_t, size_t) { throw std::runtime_error("x"); }, 100),
                 std::runtime_error);
}

TEST(ThreadPool, NestedCallFailsInsteadOfDeadlocking) {
    ThreadPool pool(2);
    EXPECT_ANY_THROW(pool.parallel_for(2, [&](size_t, size_t) { pool.parallel_for(2, [](size_t, size_t) {}); }));
    std::atomic<size_t> sum{0};
    pool.parallel_for(10, [&](size_t b, size_t e) { sum += e - b; });
    EXPECT_EQ(sum.load(), 10u);
}

TEST(ThreadPool, ManyBackToBackCalls) {
    ThreadPool pool(0);
    constexpr int kCalls = 10000;
    std::vector<std::atomic<uint32_t>> hits(64);
    const auto start = std::chrono::steady_clock::now();
    for (int c = 0; c < kCalls; ++c) {
        pool.parallel_for(hits.size(), [&](size_t b, size_t e) {
            for (size_t i = b; i < e; ++i) hits[i].fetch_add(1, std::memory_order_relaxed);
        });
    }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    for (auto& h : hits) EXPECT_EQ(h.load(), static_cast<uint32_t>(kCalls));
    std::printf("[          ] ThreadPool(%u): %.2f us per parallel_for over %d calls\n", pool.size(),
                us / kCalls, kCalls);
}

TEST(ThreadPool, RandomisedStress) {
    // Random sizes, grains and amounts of work per index, some calls separated by sleeps so that
    // both the spinning and the sleeping hand-off are exercised; every index counted exactly once.
    ThreadPool pool(6);
    std::mt19937 rng(99);
    std::vector<std::atomic<uint32_t>> hits(5000);
    std::vector<uint32_t> expect(hits.size(), 0);
    for (int call = 0; call < 3000; ++call) {
        const size_t n = rng() % hits.size();
        const size_t grain = 1 + rng() % 300;
        const unsigned work = rng() % 4 == 0 ? 200 : 0;
        if (rng() % 200 == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));
        pool.parallel_for(
            n,
            [&](size_t b, size_t e) {
                for (size_t i = b; i < e; ++i) {
                    volatile unsigned spin = 0;
                    for (unsigned w = 0; w < work; ++w) spin = spin + w;
                    hits[i].fetch_add(1, std::memory_order_relaxed);
                }
            },
            grain);
        for (size_t i = 0; i < n; ++i) ++expect[i];
    }
    for (size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i].load(), expect[i]) << "index " << i;
}

TEST(ThreadPool, OverheadWithRealWork) {
    // Each range does a few microseconds of work, so workers do take part (not asserted).
    ThreadPool pool(0);
    constexpr int kCalls = 5000;
    std::vector<double> out(4096, 0.0);
    const auto start = std::chrono::steady_clock::now();
    for (int c = 0; c < kCalls; ++c) {
        pool.parallel_for(out.size(), [&](size_t b, size_t e) {
            for (size_t i = b; i < e; ++i) out[i] += std::sqrt(static_cast<double>(i + c));
        });
    }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    double serial_check = 0.0;
    for (size_t i = 0; i < out.size(); i += 512) {
        double v = 0.0;
        for (int c = 0; c < kCalls; ++c) v += std::sqrt(static_cast<double>(i + c));
        serial_check += std::fabs(out[i] - v);
    }
    EXPECT_EQ(serial_check, 0.0);
    std::printf("[          ] ThreadPool(%u): %.2f us per parallel_for of 4096 sqrt-adds\n", pool.size(), us / kCalls);
}

TEST(ThreadPool, WakesWorkersThatWentToSleep) {
    ThreadPool pool(3);
    for (int round = 0; round < 30; ++round) {
        std::this_thread::sleep_for(std::chrono::milliseconds(2));  // far past the spin: workers sleep
        std::atomic<size_t> sum{0};
        pool.parallel_for(90, [&](size_t b, size_t e) { sum += e - b; });
        ASSERT_EQ(sum.load(), 90u);
    }
}

// A worker that wakes for the last job just as the pool is destroyed must still see the stop: the
// destructor used to hang now and then (1 run in 15 on a 16-core machine) when such a worker went
// back to waiting for a new job. Many short-lived pools make that window likely on many cores.
TEST(ThreadPool, DestroyedRightAfterAJobNeverHangs) {
    for (int round = 0; round < 300; ++round) {
        ThreadPool pool(8);
        std::atomic<size_t> sum{0};
        pool.parallel_for(8, [&](size_t b, size_t e) { sum += e - b; });
        ASSERT_EQ(sum.load(), 8u);
    }
}

TEST(ThreadPool, PoolLargerThanTheWorkUsesOnlyWhatItNeeds) {
    ThreadPool pool(8);
    for (int round = 0; round < 200; ++round) {
        const size_t n = static_cast<size_t>(round % 11);  // 0..10 ranges requested, often < size()
        std::atomic<size_t> sum{0};
        std::atomic<size_t> ranges{0};
        pool.parallel_for(n, [&](size_t b, size_t e) {
            sum += e - b;
            ++ranges;
        });
        ASSERT_EQ(sum.load(), n);
        ASSERT_EQ(ranges.load(), std::min<size_t>(n, 8));
    }
}

}  // namespace
