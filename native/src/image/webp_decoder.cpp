// WebP through libwebp's simple decoding API (still images; animations are refused).
// Alpha is dropped rather than composited, as PIL's convert("RGB") does (see png_decoder.cpp).
#include <string>

#include <webp/decode.h>

#include "core/error.h"
#include "image/decoders.h"

namespace q3n::image {

namespace {

WebPBitstreamFeatures features_of(std::span<const uint8_t> bytes) {
    WebPBitstreamFeatures f;
    const VP8StatusCode status = WebPGetFeatures(bytes.data(), bytes.size(), &f);
    if (status == VP8_STATUS_NOT_ENOUGH_DATA) fail(Q3N_ERR_INVALID_ARGUMENT, "the WebP data is truncated");
    if (status != VP8_STATUS_OK) fail(Q3N_ERR_INVALID_ARGUMENT, "the WebP data is corrupt");
    if (f.has_animation)
        fail(Q3N_ERR_UNSUPPORTED, "animated WebP images are not supported; pass a single frame");
    return f;
}

}  // namespace

Header read_webp_header(std::span<const uint8_t> bytes) {
    const WebPBitstreamFeatures f = features_of(bytes);
    Header h;
    h.format = Format::Webp;
    h.width = static_cast<uint32_t>(f.width);
    h.height = static_cast<uint32_t>(f.height);
    h.channels = f.has_alpha ? 4 : 3;
    return h;
}

Rgb8Image decode_webp(std::span<const uint8_t> bytes, uint64_t max_pixels) {
    const WebPBitstreamFeatures f = features_of(bytes);
    const size_t size = checked_rgb_size("WebP", static_cast<uint32_t>(f.width), static_cast<uint32_t>(f.height), max_pixels);
    Rgb8Image image;
    image.width = static_cast<uint32_t>(f.width);
    image.height = static_cast<uint32_t>(f.height);
    image.pixels.resize(size);
    const int stride = f.width * 3;  // at most 16383 * 3 for lossy and 2^24 * 3 for VP8X canvases
    if (!WebPDecodeRGBInto(bytes.data(), bytes.size(), image.pixels.data(), image.pixels.size(), stride)) {
        // The header was whole, so a failure here is missing or damaged image data.
        fail(Q3N_ERR_INVALID_ARGUMENT, "the WebP data is corrupt or truncated");
    }
    return image;
}

}  // namespace q3n::image
