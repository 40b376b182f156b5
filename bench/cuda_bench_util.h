// What the GPU benchmarks share: the same-run bandwidth and tensor-core peaks that every figure is
// divided by, and timing of device work without host launch gaps.
#pragma once

#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <string_view>
#include <vector>

namespace q3n_bench {

// DRAM traffic per second of a large device-to-device copy (bytes read + bytes written): the
// figure a pure read stream of the same number of bytes can reach at best.
inline double measure_d2d_bandwidth() {
    const size_t bytes = size_t{2} << 30;
    void *a = nullptr, *b = nullptr;
    if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) return 0;
    cudaMemset(a, 1, bytes);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    std::vector<float> ms;
    for (int i = 0; i < 12; ++i) {
        cudaEventRecord(e0);
        cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float t;
        cudaEventElapsedTime(&t, e0, e1);
        if (i >= 2) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    cudaFree(a);
    cudaFree(b);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return 2.0 * bytes / (ms[ms.size() / 2] / 1e3);
}

// `rounds` event-timed runs of `round` (which enqueues `reps` calls on `stream`), the first `warm`
// discarded: the median of the others' milliseconds per call.
inline double median_round_ms(cudaStream_t stream, int rounds, int warm, int reps, const std::function<void()>& round) {
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    std::vector<float> ms;
    for (int i = 0; i < rounds; ++i) {
        cudaEventRecord(e0, stream);
        round();
        cudaEventRecord(e1, stream);
        cudaEventSynchronize(e1);
        float t = 0;
        cudaEventElapsedTime(&t, e0, e1);
        if (i >= warm) ms.push_back(t / reps);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

// Milliseconds per call of `enqueue`, which puts work on `stream`: `reps` calls are captured into
// one graph so host launch latency stays out of the figure (a decode step replays a graph too);
// the median of several replays is returned. enqueue(i) gets the call's index so callers can
// rotate through buffers larger than L2.
inline double time_on_stream(cudaStream_t stream, int reps, const std::function<void(int)>& enqueue) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    // One eager call first, as the engine's prefill precedes its captured decode steps: first calls
    // make plans and workspaces, which cannot be allocated while a stream is being captured.
    enqueue(0);
    if (cudaStreamSynchronize(stream) != cudaSuccess) return -1;
    if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return -1;
    for (int i = 0; i < reps; ++i) enqueue(i);
    if (cudaStreamEndCapture(stream, &graph) != cudaSuccess || cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess)
        return -1;
    const double ms = median_round_ms(stream, 7, 2, reps, [&] { cudaGraphLaunch(exec, stream); });
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    return ms;
}

// Milliseconds per call of `enqueue` run eagerly, as the engine runs work it does not capture (the
// vision tower: its shapes change from item to item): `reps` calls between two events, the median of
// five rounds after one to warm up. Host launch latency is in the figure wherever the host falls
// behind the device.
inline double time_eager(cudaStream_t stream, int reps, const std::function<void(int)>& enqueue) {
    return median_round_ms(stream, 6, 1, reps, [&] {
        for (int i = 0; i < reps; ++i) enqueue(i);
    });
}

// With Q3N_BENCH_PROFILE set, the work `enqueue` puts on `stream` runs once between cudaProfilerStart and
// cudaProfilerStop, so `ncu --profile-from-start off` sees one call's kernels and not the set-up's
// (random weights of a full-size config are thousands of fill kernels).
inline bool profiling_requested() { return std::getenv("Q3N_BENCH_PROFILE") != nullptr; }
// bench_cuda_decode profiles its decode steps unless Q3N_BENCH_PROFILE=prefill asks for the timed prefill.
inline bool profiling_prefill() {
    const char* v = std::getenv("Q3N_BENCH_PROFILE");
    return v && std::string_view(v) == "prefill";
}
inline bool profiling_decode() { return profiling_requested() && !profiling_prefill(); }

inline void profile_once(cudaStream_t stream, const std::function<void()>& enqueue) {
    if (!profiling_requested()) return;
    cudaStreamSynchronize(stream);
    cudaProfilerStart();
    enqueue();
    cudaStreamSynchronize(stream);
    cudaProfilerStop();
}

}  // namespace q3n_bench
