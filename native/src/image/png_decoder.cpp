// PNG through libpng. Its error callback must not return: ours longjmps to png_jmpbuf, set by the
// call that started the work, which then throws q3n::Error in ordinary C++.
//
// Conversions follow what PIL's Image.convert("RGB") gives, which is what transformers' Qwen3-VL
// processor (5.17) feeds on:
// - alpha (RGBA, gray+alpha, palette or colour-key transparency) is dropped, not composited: PIL
//   keeps whatever colour lies under transparent pixels (tests/fixtures and shared FIXTURES.md,
//   "Processor references"; qwen-vl-utils composites over white, the processor does not);
// - 16-bit samples keep their high byte, as PIL's RGB;16B and RGBA;16B raw modes unpack them
//   (truncation, not rounding). For 16-bit grayscale PIL instead clips the 16-bit value to 255
//   (its I;16 to RGB conversion), which turns almost any such image white; we keep the high byte
//   there too, on purpose;
// - gamma, ICC profiles and sRGB chunks are ignored, as PIL ignores them.
#include <csetjmp>
#include <cstring>

#include <png.h>

#include "core/error.h"
#include "image/decoders.h"
#include "image/exif_orientation.h"

namespace q3n::image {

namespace {

enum class Failure { None, Corrupt, Truncated };

struct Session {
    png_structp png = nullptr;
    png_infop info = nullptr;
    std::span<const uint8_t> bytes;
    size_t offset = 0;
    Failure failure = Failure::None;
    // See jpeg_decoder.cpp: what changes between setjmp and longjmp lives here, not in a local.
    Rgb8Image image;

    ~Session() {
        if (png) png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
    }
};

[[noreturn]] void on_error(png_structp png, png_const_charp) {
    auto* s = static_cast<Session*>(png_get_error_ptr(png));
    if (s->failure == Failure::None) s->failure = Failure::Corrupt;
    png_longjmp(png, 1);
}

void on_warning(png_structp, png_const_charp) {}  // never write to the host's stderr

void on_read(png_structp png, png_bytep out, size_t length) {
    auto* s = static_cast<Session*>(png_get_io_ptr(png));
    if (length > s->bytes.size() - s->offset) {
        s->failure = Failure::Truncated;
        png_error(png, "truncated");
    }
    std::memcpy(out, s->bytes.data() + s->offset, length);
    s->offset += length;
}

[[noreturn]] void fail_decode(Failure failure) {
    if (failure == Failure::Truncated) fail(Q3N_ERR_INVALID_ARGUMENT, "the PNG data is truncated");
    fail(Q3N_ERR_INVALID_ARGUMENT, "the PNG data is corrupt");
}

// Must be called from the function that did setjmp(png_jmpbuf(s.png)).
void read_info(Session& s) {
    png_set_read_fn(s.png, &s, on_read);
    png_read_info(s.png, s.info);
}

void create(Session& s, std::span<const uint8_t> bytes) {
    s.bytes = bytes;
    s.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &s, on_error, on_warning);
    if (!s.png) fail(Q3N_ERR_OUT_OF_MEMORY, "cannot create a PNG reader");
    s.info = png_create_info_struct(s.png);
    if (!s.info) fail(Q3N_ERR_OUT_OF_MEMORY, "cannot create a PNG reader");
}

Header header_of(Session& s) {
    Header h;
    h.format = Format::Png;
    h.width = png_get_image_width(s.png, s.info);
    h.height = png_get_image_height(s.png, s.info);
    h.bit_depth = png_get_bit_depth(s.png, s.info);
    const int type = png_get_color_type(s.png, s.info);
    const bool transparency = png_get_valid(s.png, s.info, PNG_INFO_tRNS) != 0;
    switch (type) {
        case PNG_COLOR_TYPE_GRAY: h.channels = transparency ? 2 : 1; break;
        case PNG_COLOR_TYPE_GRAY_ALPHA: h.channels = 2; break;
        case PNG_COLOR_TYPE_PALETTE:
        case PNG_COLOR_TYPE_RGB: h.channels = transparency ? 4 : 3; break;
        default: h.channels = 4; break;
    }
#ifdef PNG_eXIf_SUPPORTED
    // Only an eXIf chunk before the image data is seen here; PIL also reads one placed after it.
    png_uint_32 exif_size = 0;
    png_bytep exif = nullptr;
    if (png_get_eXIf_1(s.png, s.info, &exif_size, &exif) && exif) h.orientation = parse_tiff_orientation({exif, exif_size});
#endif
    return h;
}

}  // namespace

Header read_png_header(std::span<const uint8_t> bytes) {
    Session s;
    create(s, bytes);
    if (setjmp(png_jmpbuf(s.png))) fail_decode(s.failure);
    read_info(s);
    return header_of(s);
}

Rgb8Image decode_png(std::span<const uint8_t> bytes, uint64_t max_pixels) {
    Session s;
    create(s, bytes);
    if (setjmp(png_jmpbuf(s.png))) fail_decode(s.failure);
    read_info(s);
    const uint32_t width = png_get_image_width(s.png, s.info), height = png_get_image_height(s.png, s.info);
    const size_t size = checked_rgb_size("PNG", width, height, max_pixels);

    const int type = png_get_color_type(s.png, s.info);
    const int depth = png_get_bit_depth(s.png, s.info);
    if (type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(s.png);
    if (type == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(s.png);
    if (depth == 16) png_set_strip_16(s.png);
    png_set_strip_alpha(s.png);
    if (type == PNG_COLOR_TYPE_GRAY || type == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(s.png);
    const int passes = png_set_interlace_handling(s.png);
    png_read_update_info(s.png, s.info);
    const size_t stride = size_t{width} * 3;
    if (png_get_rowbytes(s.png, s.info) != stride || png_get_channels(s.png, s.info) != 3)
        fail(Q3N_ERR_INTERNAL, "libpng produced an unexpected row layout");

    s.image.width = width;
    s.image.height = height;
    s.image.pixels.resize(size);
    // Interlaced images are read pass by pass into the same rows, which libpng fills in place.
    for (int pass = 0; pass < passes; ++pass)
        for (uint32_t y = 0; y < height; ++y) png_read_row(s.png, s.image.pixels.data() + y * stride, nullptr);
    // No png_read_end: the pixels are complete, and chunks after the image data cannot change them.
    return std::move(s.image);
}

}  // namespace q3n::image
