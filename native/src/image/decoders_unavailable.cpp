// Compiled instead of the three decoders when the build found no libjpeg/libpng/libwebp
// (QWEN3_IMAGES=AUTO on a machine without them, e.g. a GPU machine that only runs the text
// models): every image call then fails with a clear status instead of the build failing.
#include <string>

#include "core/error.h"
#include "image/decoders.h"

namespace q3n::image {
namespace {

[[noreturn]] void unavailable(const char* format) {
    fail(Q3N_ERR_UNSUPPORTED, std::string(format) +
                                  " decoding is not in this build: libjpeg-turbo, libpng and libwebp were not found "
                                  "when it was compiled (QWEN3_IMAGES)");
}

}  // namespace

Header read_jpeg_header(std::span<const uint8_t>) { unavailable("JPEG"); }
Rgb8Image decode_jpeg(std::span<const uint8_t>, uint64_t) { unavailable("JPEG"); }
Header read_png_header(std::span<const uint8_t>) { unavailable("PNG"); }
Rgb8Image decode_png(std::span<const uint8_t>, uint64_t) { unavailable("PNG"); }
Header read_webp_header(std::span<const uint8_t>) { unavailable("WebP"); }
Rgb8Image decode_webp(std::span<const uint8_t>, uint64_t) { unavailable("WebP"); }

}  // namespace q3n::image
