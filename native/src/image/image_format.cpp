#include "image/image_format.h"

#include <cstring>

namespace q3n::image {

namespace {

bool starts_with(std::span<const uint8_t> bytes, const char* magic, size_t n, size_t at = 0) {
    return bytes.size() >= at + n && std::memcmp(bytes.data() + at, magic, n) == 0;
}

}  // namespace

Format sniff_format(std::span<const uint8_t> bytes) {
    // SOI followed by the first byte of a marker: FF D8 alone also starts some non-JPEG data.
    if (starts_with(bytes, "\xFF\xD8\xFF", 3)) return Format::Jpeg;
    if (starts_with(bytes, "\x89PNG\r\n\x1A\n", 8)) return Format::Png;
    if (starts_with(bytes, "RIFF", 4) && starts_with(bytes, "WEBP", 4, 8)) return Format::Webp;
    return Format::Unknown;
}

std::string describe_unsupported(std::span<const uint8_t> bytes) {
    if (starts_with(bytes, "GIF87a", 6) || starts_with(bytes, "GIF89a", 6)) return "GIF";
    if (starts_with(bytes, "BM", 2)) return "BMP";
    if (starts_with(bytes, "II*\0", 4) || starts_with(bytes, "MM\0*", 4)) return "TIFF";
    if (starts_with(bytes, "ftyp", 4, 4)) return "HEIF/AVIF";
    if (starts_with(bytes, "\xFF\x0A", 2) || starts_with(bytes, "\0\0\0\x0CJXL ", 8)) return "JPEG XL";
    return "";
}

}  // namespace q3n::image
