// Decoded still images for the vision models: the RGB8 pixel type and the one entry point that
// sniffs the format, checks the size against the caller's limit and hands off to a decoder.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace q3n::image {

enum class Format { Unknown, Jpeg, Png, Webp };

// Interleaved R, G, B bytes, row-major, no row padding: width * height * 3 bytes.
struct Rgb8Image {
    uint32_t width = 0;
    uint32_t height = 0;
    std::vector<uint8_t> pixels;
};

// What a file says about itself, read without decoding any pixel.
struct Header {
    Format format = Format::Unknown;
    uint32_t width = 0;          // as stored
    uint32_t height = 0;
    uint32_t orientation = 1;    // EXIF 1..8; 1 when absent or unreadable
    uint32_t channels = 0;       // 1 gray, 2 gray+alpha, 3 colour, 4 colour+alpha or CMYK
    uint32_t bit_depth = 8;
};

struct DecodeOptions {
    uint64_t max_pixels = 0;        // width * height above this is refused before decoding
    bool apply_orientation = true;  // as PIL.ImageOps.exif_transpose, which transformers' load_image applies
};

// Throws q3n::Error: Q3N_ERR_UNSUPPORTED for an unrecognised or unsupported format,
// Q3N_ERR_INVALID_ARGUMENT for empty, corrupt or truncated data.
Header read_header(std::span<const uint8_t> bytes);

// As read_header, then Q3N_ERR_INVALID_ARGUMENT when width * height exceeds options.max_pixels,
// decided from the header alone so that a decompression bomb never reaches an allocation.
Rgb8Image decode(std::span<const uint8_t> bytes, const DecodeOptions& options);

}  // namespace q3n::image
