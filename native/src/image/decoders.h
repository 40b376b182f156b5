// The per-format decoders behind image::decode. Each reads its own header first and refuses an
// image over max_pixels before it allocates the pixels; each returns the image as stored (the
// caller applies the EXIF orientation).
#pragma once

#include <cstdint>
#include <span>

#include "image/image.h"

namespace q3n::image {

Header read_jpeg_header(std::span<const uint8_t> bytes);
Rgb8Image decode_jpeg(std::span<const uint8_t> bytes, uint64_t max_pixels);

Header read_png_header(std::span<const uint8_t> bytes);
Rgb8Image decode_png(std::span<const uint8_t> bytes, uint64_t max_pixels);

Header read_webp_header(std::span<const uint8_t> bytes);
Rgb8Image decode_webp(std::span<const uint8_t> bytes, uint64_t max_pixels);

// Throws Q3N_ERR_INVALID_ARGUMENT when width * height > max_pixels; otherwise returns the byte
// size of the RGB8 buffer (overflow-checked).
size_t checked_rgb_size(const char* format, uint64_t width, uint64_t height, uint64_t max_pixels);

}  // namespace q3n::image
