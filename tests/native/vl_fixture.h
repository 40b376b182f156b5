// The Qwen3-VL fixtures' inputs (tests/fixtures/qwen3_vl/*, made by make_vl_fixtures.py): pixels are
// never shipped but rebuilt from the formula recorded in each reference.json.
#pragma once

#include <cmath>
#include <string>
#include <vector>

namespace q3n_test {

inline std::string vl_fixture_dir(const std::string& name) { return std::string(Q3N_FIXTURE_DIR) + "/qwen3_vl/" + name; }

// Rows [0, rows) of vision input k, [rows, cols] row-major:
// pixel(k, r, c) = float32(sin(0.1 r + 0.3 c + 1.3 k)), computed in double.
inline std::vector<float> fixture_pixels(int k, size_t rows, size_t cols) {
    std::vector<float> v(rows * cols);
    for (size_t r = 0; r < rows; ++r)
        for (size_t c = 0; c < cols; ++c) v[r * cols + c] = static_cast<float>(std::sin(0.1 * r + 0.3 * c + 1.3 * k));
    return v;
}

}  // namespace q3n_test
