// Qwen3-VL's three-axis (t, h, w) rotary positions of a prompt (shared/spec 4.4), with the semantics of
// transformers 5.17's Qwen3VLModel.get_rope_index: the prompt is cut into runs of equal token type
// (text, <|image_pad|>, <|video_pad|>); a text run counts on from the current position on all three
// axes; each pad run is one vision item (an image, or one 2-frame slice of a video) whose merged
// token (t, y, x) gets (p + t, p + y, p + x), after which the position advances by max(H', W').
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace q3n {

// An image's or video's patch grid as the processor reports it (image_grid_thw / video_grid_thw).
struct GridThw {
    uint32_t t = 1;
    uint32_t h = 0;
    uint32_t w = 0;
};

struct MropePositions {
    std::vector<int32_t> t, h, w;  // one entry per prompt token
    // Decode positions are cache_index + rope_delta on all three axes (spec 4.4).
    int64_t rope_delta = 0;
};

// Throws q3n::Error(Q3N_ERR_INVALID_ARGUMENT) when the pads do not match the grids: a run whose length
// is not its item's merged token count, more runs than grids, or grids left over.
MropePositions mrope_positions(const int32_t* tokens, size_t count, const std::vector<GridThw>& images,
                               const std::vector<GridThw>& videos, int32_t image_token_id, int32_t video_token_id,
                               uint32_t spatial_merge_size);

inline int64_t mrope_decode_position(size_t cache_index, int64_t rope_delta) {
    return static_cast<int64_t>(cache_index) + rope_delta;
}

}  // namespace q3n
