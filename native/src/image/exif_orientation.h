// The EXIF Orientation tag: read from an APP1 payload, and applied to decoded pixels the way
// PIL.ImageOps.exif_transpose applies it (transformers' load_image calls that on every image).
#pragma once

#include <cstdint>
#include <span>

#include "image/image.h"

namespace q3n::image {

// The orientation (1..8) in an APP1 segment's payload ("Exif\0\0" then a TIFF structure), or 1 when
// the payload is not EXIF, is malformed, or holds no valid Orientation in IFD0. Never reads out of
// the span, whatever its offsets say.
uint32_t parse_exif_orientation(std::span<const uint8_t> app1_payload);

// The same for a bare TIFF structure, as PNG's eXIf chunk carries it.
uint32_t parse_tiff_orientation(std::span<const uint8_t> tiff);

// Orientations 5..8 turn the image a quarter, so the decoded width and height trade places.
inline bool orientation_swaps_axes(uint32_t orientation) { return orientation >= 5 && orientation <= 8; }

// Returns the image as it should be displayed. 1 (or any value outside 2..8) leaves it unchanged.
Rgb8Image apply_orientation(Rgb8Image image, uint32_t orientation);

}  // namespace q3n::image
