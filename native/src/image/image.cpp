#include "image/image.h"

#include <string>

#include "core/checked_math.h"
#include "core/error.h"
#include "image/decoders.h"
#include "image/exif_orientation.h"
#include "image/image_format.h"

namespace q3n::image {

namespace {

Format require_known_format(std::span<const uint8_t> bytes) {
    if (bytes.empty()) fail(Q3N_ERR_INVALID_ARGUMENT, "the image is empty (0 bytes)");
    const Format format = sniff_format(bytes);
    if (format != Format::Unknown) return format;
    const std::string known = describe_unsupported(bytes);
    if (!known.empty())
        fail(Q3N_ERR_UNSUPPORTED, known + " images are not supported; supported formats: JPEG, PNG, WebP");
    fail(Q3N_ERR_UNSUPPORTED, "the data is not a JPEG, PNG or WebP image (unrecognised leading bytes)");
}

}  // namespace

size_t checked_rgb_size(const char* format, uint64_t width, uint64_t height, uint64_t max_pixels) {
    if (width == 0 || height == 0)
        fail(Q3N_ERR_INVALID_ARGUMENT, std::string("the ") + format + " header declares an empty image");
    const auto pixels = checked_mul(width, height);
    if (!pixels || *pixels > max_pixels)
        fail(Q3N_ERR_INVALID_ARGUMENT, std::string("the ") + format + " image is " + std::to_string(width) + "x" +
                                           std::to_string(height) + " pixels, more than the limit of " +
                                           std::to_string(max_pixels) + " pixels");
    const auto bytes = checked_mul(*pixels, 3);
    if (!bytes || *bytes > SIZE_MAX) fail(Q3N_ERR_INVALID_ARGUMENT, "the image is too large for this platform");
    return static_cast<size_t>(*bytes);
}

Header read_header(std::span<const uint8_t> bytes) {
    switch (require_known_format(bytes)) {
        case Format::Jpeg: return read_jpeg_header(bytes);
        case Format::Png: return read_png_header(bytes);
        case Format::Webp: return read_webp_header(bytes);
        case Format::Unknown: break;
    }
    fail(Q3N_ERR_INTERNAL, "unreachable image format");
}

Rgb8Image decode(std::span<const uint8_t> bytes, const DecodeOptions& options) {
    Rgb8Image image;
    uint32_t orientation = 1;
    switch (require_known_format(bytes)) {
        case Format::Jpeg:
            orientation = read_jpeg_header(bytes).orientation;
            image = decode_jpeg(bytes, options.max_pixels);
            break;
        case Format::Png:
            orientation = read_png_header(bytes).orientation;
            image = decode_png(bytes, options.max_pixels);
            break;
        case Format::Webp:
            image = decode_webp(bytes, options.max_pixels);
            break;
        case Format::Unknown: fail(Q3N_ERR_INTERNAL, "unreachable image format");
    }
    return options.apply_orientation ? apply_orientation(std::move(image), orientation) : image;
}

}  // namespace q3n::image
