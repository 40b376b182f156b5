// What every benchmark program records beside its figures: when, where, and which commit.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "qwen3native.h"

namespace q3n_bench {

// The first line a shell command prints, without its newline ("" when it fails).
inline std::string shell_line(const char* cmd) {
    std::string out;
    if (FILE* p = popen(cmd, "r")) {
        char buf[256];
        if (fgets(buf, sizeof buf, p)) out = buf;
        pclose(p);
    }
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    return out;
}

inline std::string utc_now() { return shell_line("date -u +%Y-%m-%dT%H:%M:%SZ"); }

// The GPU machines get a copy of the tree without .git: the caller passes Q3N_COMMIT there.
inline std::string commit_id() {
    if (const char* c = std::getenv("Q3N_COMMIT"); c && *c) return c;
    return shell_line("git rev-parse --short HEAD 2>/dev/null");
}

// shared/spec 4.6 smart_resize with factor 32 and the released min/max pixels.
inline std::pair<uint32_t, uint32_t> smart_resize(double h, double w) {
    const double factor = 32, min_pixels = 65536, max_pixels = 16777216;
    double hb = std::max(factor, std::nearbyint(h / factor) * factor), wb = std::max(factor, std::nearbyint(w / factor) * factor);
    if (hb * wb > max_pixels) {
        const double beta = std::sqrt(h * w / max_pixels);
        hb = std::max(factor, std::floor(h / beta / factor) * factor);
        wb = std::max(factor, std::floor(w / beta / factor) * factor);
    } else if (hb * wb < min_pixels) {
        const double beta = std::sqrt(min_pixels / (h * w));
        hb = std::ceil(h * beta / factor) * factor;
        wb = std::ceil(w * beta / factor) * factor;
    }
    return {uint32_t(hb), uint32_t(wb)};
}

inline int die(const char* what) {
    std::fprintf(stderr, "%s: %s\n", what, q3n_last_error());
    return 1;
}

}  // namespace q3n_bench
