#include "image/exif_orientation.h"

#include <cstring>

namespace q3n::image {

namespace {

constexpr uint16_t kOrientationTag = 0x0112;
constexpr uint16_t kTypeShort = 3;
constexpr uint16_t kTypeLong = 4;

// Byte-order-aware reads; callers check bounds first.
struct TiffReader {
    std::span<const uint8_t> data;
    bool little_endian;

    uint16_t u16(size_t at) const {
        const uint8_t* p = data.data() + at;
        return little_endian ? uint16_t(p[0] | (p[1] << 8)) : uint16_t((p[0] << 8) | p[1]);
    }
    uint32_t u32(size_t at) const {
        const uint8_t* p = data.data() + at;
        return little_endian ? uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24
                             : uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
    }
};

}  // namespace

uint32_t parse_exif_orientation(std::span<const uint8_t> app1_payload) {
    static const char kExif[6] = {'E', 'x', 'i', 'f', 0, 0};
    if (app1_payload.size() < sizeof kExif || std::memcmp(app1_payload.data(), kExif, sizeof kExif) != 0) return 1;
    return parse_tiff_orientation(app1_payload.subspan(sizeof kExif));
}

uint32_t parse_tiff_orientation(std::span<const uint8_t> tiff) {
    // Header: byte order mark, 42, offset of IFD0 (relative to the TIFF start).
    if (tiff.size() < 8) return 1;
    TiffReader r{tiff, false};
    if (tiff[0] == 'I' && tiff[1] == 'I') r.little_endian = true;
    else if (tiff[0] == 'M' && tiff[1] == 'M') r.little_endian = false;
    else return 1;
    if (r.u16(2) != 42) return 1;
    // Sizes stay in 64 bits so that no offset from the file can wrap a comparison.
    const uint64_t size = tiff.size();
    const uint64_t ifd0 = r.u32(4);
    if (ifd0 + 2 > size) return 1;
    const uint64_t count = r.u16(ifd0);
    for (uint64_t i = 0; i < count; ++i) {
        const uint64_t entry = ifd0 + 2 + 12 * i;
        if (entry + 12 > size) return 1;  // the directory runs past the segment
        if (r.u16(entry) != kOrientationTag) continue;
        const uint16_t type = r.u16(entry + 2);
        if (r.u32(entry + 4) < 1) return 1;
        // A value that fits in four bytes is stored in the entry itself, left-justified.
        uint32_t value = 0;
        if (type == kTypeShort) value = r.u16(entry + 8);
        else if (type == kTypeLong) value = r.u32(entry + 8);
        else return 1;
        return value >= 1 && value <= 8 ? value : 1;  // PIL ignores values it has no transpose for
    }
    return 1;
}

Rgb8Image apply_orientation(Rgb8Image image, uint32_t orientation) {
    if (orientation < 2 || orientation > 8) return image;
    const size_t w = image.width, h = image.height;
    Rgb8Image out;
    out.width = orientation_swaps_axes(orientation) ? image.height : image.width;
    out.height = orientation_swaps_axes(orientation) ? image.width : image.height;
    out.pixels.resize(image.pixels.size());
    const size_t ow = out.width, oh = out.height;
    // For each output pixel, the stored pixel it shows (PIL's transpose methods per orientation:
    // 2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE, 6 ROTATE_270,
    // 7 TRANSVERSE, 8 ROTATE_90; PIL's rotations are counter-clockwise).
    for (size_t y = 0; y < oh; ++y) {
        for (size_t x = 0; x < ow; ++x) {
            size_t sx = x, sy = y;
            switch (orientation) {
                case 2: sx = w - 1 - x; sy = y; break;
                case 3: sx = w - 1 - x; sy = h - 1 - y; break;
                case 4: sx = x; sy = h - 1 - y; break;
                case 5: sx = y; sy = x; break;
                case 6: sx = y; sy = h - 1 - x; break;
                case 7: sx = w - 1 - y; sy = h - 1 - x; break;
                case 8: sx = w - 1 - y; sy = x; break;
            }
            std::memcpy(&out.pixels[(y * ow + x) * 3], &image.pixels[(sy * w + sx) * 3], 3);
        }
    }
    return out;
}

}  // namespace q3n::image
