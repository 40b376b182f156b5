// The C boundary of the image decoders (native/src/image). Same rules as c_api.cpp: every body
// runs inside guard(), and versioned structs are read and written only up to their struct_size.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>

#include "api/last_error.h"
#include "image/exif_orientation.h"
#include "image/image.h"
#include "qwen3native.h"

struct q3n_image {
    q3n::image::Rgb8Image pixels;
    q3n_image_info info;
};

namespace {

void need(const void* p, const char* what) {
    if (!p) q3n::fail(Q3N_ERR_INVALID_ARGUMENT, std::string(what) + " is NULL");
}

q3n_image_format to_c(q3n::image::Format f) {
    switch (f) {
        case q3n::image::Format::Jpeg: return Q3N_IMAGE_FORMAT_JPEG;
        case q3n::image::Format::Png: return Q3N_IMAGE_FORMAT_PNG;
        case q3n::image::Format::Webp: return Q3N_IMAGE_FORMAT_WEBP;
        case q3n::image::Format::Unknown: break;
    }
    return Q3N_IMAGE_FORMAT_UNKNOWN;
}

q3n::image::DecodeOptions read_options(const q3n_image_decode_options* in) {
    q3n_image_decode_options o;
    q3n_image_decode_options_init(&o, sizeof o);
    if (in) {
        if (in->struct_size < sizeof(uint32_t) || in->struct_size > sizeof o)
            q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "q3n_image_decode_options.struct_size is " + std::to_string(in->struct_size) +
                                                     "; set it with q3n_image_decode_options_init");
        std::memcpy(&o, in, in->struct_size);
    }
    if (o.max_pixels < 1) q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "max_pixels must be at least 1");
    return {o.max_pixels, o.apply_exif_orientation != 0};
}

q3n_image_info info_of(const q3n::image::Header& h, bool oriented) {
    q3n_image_info info;
    std::memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    info.format = to_c(h.format);
    const bool swap = oriented && q3n::image::orientation_swaps_axes(h.orientation);
    info.width = swap ? h.height : h.width;
    info.height = swap ? h.width : h.height;
    info.stored_width = h.width;
    info.stored_height = h.height;
    info.exif_orientation = h.orientation;
    info.source_channels = h.channels;
    info.source_bit_depth = h.bit_depth;
    return info;
}

// Writes as much of `full` as the caller's struct holds, keeping the caller's struct_size.
void write_info(const q3n_image_info& full, q3n_image_info* out) {
    if (out->struct_size < sizeof(uint32_t) || out->struct_size > sizeof full)
        q3n::fail(Q3N_ERR_INVALID_ARGUMENT, "q3n_image_info.struct_size is " + std::to_string(out->struct_size) +
                                                 "; set it to sizeof(q3n_image_info)");
    const uint32_t size = out->struct_size;
    std::memcpy(out, &full, size);
    out->struct_size = size;
}

std::span<const uint8_t> input(const uint8_t* bytes, size_t size) {
    if (size > 0) need(bytes, "bytes");
    return {bytes, size};
}

}  // namespace

extern "C" {

void q3n_image_decode_options_init(q3n_image_decode_options* o, size_t struct_size) {
    if (!o || struct_size < sizeof(uint32_t)) return;
    q3n_image_decode_options d;
    std::memset(&d, 0, sizeof d);
    d.max_pixels = Q3N_IMAGE_DEFAULT_MAX_PIXELS;
    d.apply_exif_orientation = 1;
    const size_t n = std::min(struct_size, sizeof d);
    std::memcpy(o, &d, n);
    o->struct_size = static_cast<uint32_t>(n);
}

q3n_status q3n_image_probe(const uint8_t* bytes, size_t size, q3n_image_info* info) {
    return q3n::api::guard([&] {
        need(info, "info");
        write_info(info_of(q3n::image::read_header(input(bytes, size)), true), info);
    });
}

q3n_status q3n_image_decode(const uint8_t* bytes, size_t size, const q3n_image_decode_options* options,
                            q3n_image** out_image) {
    if (out_image) *out_image = nullptr;
    return q3n::api::guard([&] {
        need(out_image, "out_image");
        const auto data = input(bytes, size);
        const q3n::image::DecodeOptions o = read_options(options);
        auto image = std::make_unique<q3n_image>();
        image->pixels = q3n::image::decode(data, o);
        image->info = info_of(q3n::image::read_header(data), o.apply_orientation);
        if (image->info.width != image->pixels.width || image->info.height != image->pixels.height)
            q3n::fail(Q3N_ERR_INTERNAL, "decoded size differs from the header");
        *out_image = image.release();
    });
}

void q3n_image_free(q3n_image* image) { delete image; }

q3n_status q3n_image_get_info(const q3n_image* image, q3n_image_info* info) {
    return q3n::api::guard([&] {
        need(image, "image");
        need(info, "info");
        write_info(image->info, info);
    });
}

q3n_status q3n_image_get_pixels(const q3n_image* image, uint8_t* pixels, size_t capacity, size_t* out_count) {
    return q3n::api::guard([&] {
        need(image, "image");
        need(out_count, "out_count");
        const auto& p = image->pixels.pixels;
        *out_count = p.size();
        if (capacity < p.size())
            q3n::fail(Q3N_ERR_BUFFER_TOO_SMALL, "the buffer holds " + std::to_string(capacity) + " bytes; the image needs " +
                                                    std::to_string(p.size()));
        need(pixels, "pixels");
        std::memcpy(pixels, p.data(), p.size());
    });
}

}  // extern "C"
