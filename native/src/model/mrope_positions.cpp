#include "model/mrope_positions.h"

#include <algorithm>
#include <string>

#include "core/error.h"

namespace q3n {

MropePositions mrope_positions(const int32_t* tokens, size_t count, const std::vector<GridThw>& images,
                               const std::vector<GridThw>& videos, int32_t image_token_id, int32_t video_token_id,
                               uint32_t spatial_merge_size) {
    require(spatial_merge_size > 0, Q3N_ERR_INVALID_ARGUMENT, "spatial_merge_size must be positive");
    // Videos are positioned slice by slice: the timestamps between slices carry the time, so every
    // slice is an item of its own with t = 1.
    std::vector<GridThw> slices;
    for (const GridThw& v : videos)
        for (uint32_t i = 0; i < v.t; ++i) slices.push_back({1, v.h, v.w});
    size_t next_image = 0, next_slice = 0;

    MropePositions out;
    out.t.reserve(count);
    out.h.reserve(count);
    out.w.reserve(count);
    int64_t current = 0, max_position = -1;
    auto push = [&](int64_t t, int64_t h, int64_t w) {
        out.t.push_back(static_cast<int32_t>(t));
        out.h.push_back(static_cast<int32_t>(h));
        out.w.push_back(static_cast<int32_t>(w));
        max_position = std::max({max_position, t, h, w});
    };
    size_t i = 0;
    while (i < count) {
        const int32_t kind = tokens[i];
        const bool is_image = kind == image_token_id, is_video = kind == video_token_id;
        if (!is_image && !is_video) {
            push(current, current, current);
            ++current;
            ++i;
            continue;
        }
        size_t run = 0;
        while (i + run < count && tokens[i + run] == kind) ++run;
        const char* what = is_image ? "image" : "video slice";
        const std::vector<GridThw>& grids = is_image ? images : slices;
        size_t& next = is_image ? next_image : next_slice;
        if (next >= grids.size())
            fail(Q3N_ERR_INVALID_ARGUMENT, std::string("the prompt has more ") + what + " placeholder runs than grids (" +
                                               std::to_string(grids.size()) + ")");
        const GridThw g = grids[next++];
        if (g.h % spatial_merge_size || g.w % spatial_merge_size || g.t == 0)
            fail(Q3N_ERR_INVALID_ARGUMENT, std::string("a ") + what + " grid is not divisible by the merge size");
        const int64_t hh = g.h / spatial_merge_size, ww = g.w / spatial_merge_size;
        const size_t expected = static_cast<size_t>(g.t * hh * ww);
        if (run != expected)
            fail(Q3N_ERR_INVALID_ARGUMENT, std::string("a run of ") + std::to_string(run) + " " + what +
                                               " placeholders does not match its grid's " + std::to_string(expected) +
                                               " merged tokens");
        for (int64_t t = 0; t < g.t; ++t)
            for (int64_t y = 0; y < hh; ++y)
                for (int64_t x = 0; x < ww; ++x) push(current + t, current + y, current + x);
        // transformers 5.17 advances by the larger spatial side only (t is 1 for every item it sees).
        current += std::max(hh, ww);
        i += run;
    }
    if (next_image != images.size() || next_slice != slices.size())
        fail(Q3N_ERR_INVALID_ARGUMENT, "more image/video grids than placeholder runs in the prompt");
    out.rope_delta = (max_position + 1) - static_cast<int64_t>(count);
    return out;
}

}  // namespace q3n
