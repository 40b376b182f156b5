// A kernel tracer to LD_PRELOAD into any program on a GPU machine: every kernel's start, end and
// (mangled) name, graph nodes included, as CSV to $Q3N_TRACE_OUT (default /tmp/trace.csv) at exit.
// Built by decode_timeline.sh, which passes the CUPTI kernel record of the installed toolkit as KREC.
#include <cupti.h>

#include <cstdio>
#include <cstdlib>

static FILE* out = nullptr;

static void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
    *size = 16 << 20;
    *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, *size));
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
    CUpti_Activity* record = nullptr;
    while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS)
        if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && out) {
            const auto* k = reinterpret_cast<const KREC*>(record);
            std::fprintf(out, "%llu,%llu,\"%s\"\n", static_cast<unsigned long long>(k->start),
                         static_cast<unsigned long long>(k->end), k->name);
        }
    std::free(buffer);
}

__attribute__((constructor)) static void start_tracing() {
    const char* path = std::getenv("Q3N_TRACE_OUT");
    out = std::fopen(path ? path : "/tmp/trace.csv", "w");
    if (!out) return;
    std::fprintf(out, "Start (ns),End (ns),Name\n");
    cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
}

__attribute__((destructor)) static void stop_tracing() {
    cuptiActivityFlushAll(1);
    if (out) std::fclose(out);
    out = nullptr;
}
