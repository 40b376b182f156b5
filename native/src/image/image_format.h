// Recognising an image format from its leading bytes (never from a file name).
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "image/image.h"

namespace q3n::image {

Format sniff_format(std::span<const uint8_t> bytes);

// For the error message when sniff_format says Unknown: names formats we recognise but do not
// decode (GIF, BMP, TIFF...), or "" when the bytes look like nothing known.
std::string describe_unsupported(std::span<const uint8_t> bytes);

}  // namespace q3n::image
