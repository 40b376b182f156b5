// The switch for programmatic dependent launch (common.cuh's launch_pdl).
#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"

namespace q3n::cuda {

bool pdl_enabled() {
    // Read once: a graph captured with PDL edges must not be mixed with launches without them
    // because the variable changed mid-run.
    static const bool enabled = [] {
        const char* v = std::getenv("Q3N_PDL");
        return !(v && std::strcmp(v, "0") == 0);
    }();
    return enabled;
}

}  // namespace q3n::cuda
