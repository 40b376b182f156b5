#include <algorithm>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/numeric.h"
#include "cpu/ops.h"

namespace q3n::cpu {
namespace {

// torch.linspace on the CPU for float32: the first half counts up from start, the second half down
// from end, both with a float32 step; matching it keeps the bilinear weights bit-identical.
std::vector<float> linspace_f32(float start, float end, size_t steps) {
    std::vector<float> v(steps);
    if (steps == 1) {
        v[0] = start;
        return v;
    }
    const float step = (end - start) / static_cast<float>(steps - 1);
    const size_t halfway = steps / 2;
    for (size_t i = 0; i < steps; ++i)
        v[i] = i < halfway ? start + step * static_cast<float>(i) : end - step * static_cast<float>(steps - i - 1);
    return v;
}

void table_row(const Linear& table, size_t row, float* out) {
    const size_t n = table.in;
    if (table.type == WeightType::F32) {
        std::memcpy(out, static_cast<const float*>(table.data) + row * n, n * sizeof(float));
    } else if (table.type == WeightType::BF16) {
        const uint16_t* src = static_cast<const uint16_t*>(table.data) + row * n;
        for (size_t i = 0; i < n; ++i) out[i] = bf16_to_float(src[i]);
    } else {
        fail(Q3N_ERR_UNSUPPORTED, "the vision position table must be BF16 or F32");
    }
}

}  // namespace

void vision_patch_coords(const GridThw* grids, size_t n_grids, uint32_t merge, int32_t* coords) {
    size_t p = 0;
    for (size_t g = 0; g < n_grids; ++g) {
        const GridThw& grid = grids[g];
        for (uint32_t t = 0; t < grid.t; ++t)
            for (uint32_t bh = 0; bh < grid.h / merge; ++bh)
                for (uint32_t bw = 0; bw < grid.w / merge; ++bw)
                    for (uint32_t mh = 0; mh < merge; ++mh)
                        for (uint32_t mw = 0; mw < merge; ++mw, ++p) {
                            coords[2 * p] = static_cast<int32_t>(bh * merge + mh);
                            coords[2 * p + 1] = static_cast<int32_t>(bw * merge + mw);
                        }
    }
}

void pos_embed_interpolate(const Linear& table, size_t side, const GridThw* grids, size_t n_grids, uint32_t merge,
                           float* out) {
    require(table.out == side * side, Q3N_ERR_BAD_CHECKPOINT, "the vision position table is not side x side rows");
    const size_t hidden = table.in;
    std::vector<float> e(4 * hidden);
    size_t p = 0;
    for (size_t g = 0; g < n_grids; ++g) {
        const GridThw& grid = grids[g];
        require(grid.h % merge == 0 && grid.w % merge == 0, Q3N_ERR_INVALID_ARGUMENT,
                "a vision grid is not divisible by spatial_merge_size");
        const auto ys = linspace_f32(0.0f, static_cast<float>(side - 1), grid.h);
        const auto xs = linspace_f32(0.0f, static_cast<float>(side - 1), grid.w);
        // One frame's rows in processor order; the other frames repeat them.
        const size_t frame = static_cast<size_t>(grid.h) * grid.w;
        float* first = out + p * hidden;
        size_t q = 0;
        for (uint32_t bh = 0; bh < grid.h / merge; ++bh)
            for (uint32_t bw = 0; bw < grid.w / merge; ++bw)
                for (uint32_t mh = 0; mh < merge; ++mh)
                    for (uint32_t mw = 0; mw < merge; ++mw, ++q) {
                        const float yy = ys[bh * merge + mh], xx = xs[bw * merge + mw];
                        const size_t y0 = static_cast<size_t>(yy), x0 = static_cast<size_t>(xx);
                        const size_t y1 = std::min(y0 + 1, side - 1), x1 = std::min(x0 + 1, side - 1);
                        const float dy = yy - static_cast<float>(y0), dx = xx - static_cast<float>(x0);
                        const float w[4] = {(1.0f - dy) * (1.0f - dx), (1.0f - dy) * dx, dy * (1.0f - dx), dy * dx};
                        const size_t idx[4] = {y0 * side + x0, y0 * side + x1, y1 * side + x0, y1 * side + x1};
                        for (int c = 0; c < 4; ++c) table_row(table, idx[c], e.data() + c * hidden);
                        float* o = first + q * hidden;
                        for (size_t i = 0; i < hidden; ++i)
                            o[i] = e[i] * w[0] + e[hidden + i] * w[1] + e[2 * hidden + i] * w[2] + e[3 * hidden + i] * w[3];
                    }
        for (uint32_t t = 1; t < grid.t; ++t) std::memcpy(first + t * frame * hidden, first, frame * hidden * sizeof(float));
        p += grid.t * frame;
    }
}

}  // namespace q3n::cpu
