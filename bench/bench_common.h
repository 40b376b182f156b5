// What every benchmark program records beside its figures: when, where, and which commit.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

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

inline int die(const char* what) {
    std::fprintf(stderr, "%s: %s\n", what, q3n_last_error());
    return 1;
}

}  // namespace q3n_bench
