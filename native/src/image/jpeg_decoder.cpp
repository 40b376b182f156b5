// JPEG through libjpeg-turbo. libjpeg reports fatal errors through error_exit, which must not
// return; ours longjmps back to the call that started the work, which then throws q3n::Error in
// ordinary C++ (no exception ever unwinds through libjpeg's C frames).
#include <csetjmp>
#include <cstdio>  // jpeglib.h needs FILE
#include <string>

#include <jerror.h>
#include <jpeglib.h>

#include "core/error.h"
#include "image/decoders.h"
#include "image/exif_orientation.h"

namespace q3n::image {

namespace {

// Far more than any real progressive file has (libjpeg-turbo's own advice against the
// many-scans denial of service is a cap of this order).
constexpr int kMaxScans = 1000;

enum class Failure { None, Corrupt, Truncated, TooManyScans };

struct ErrorManager {
    jpeg_error_mgr pub;  // first, so libjpeg's pointer to it is a pointer to the whole
    std::jmp_buf jump;
    Failure failure;
};

[[noreturn]] void on_error_exit(j_common_ptr cinfo) {
    auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
    if (err->failure == Failure::None) err->failure = Failure::Corrupt;
    std::longjmp(err->jump, 1);
}

void on_emit_message(j_common_ptr cinfo, int level) {
    // Warnings (level -1) are mostly recoverable glitches that PIL also decodes through. Running
    // out of data is not: libjpeg would pad the rest with grey, where PIL refuses the file.
    auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
    if (level == -1 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        err->failure = Failure::Truncated;
        std::longjmp(err->jump, 1);
    }
}

void on_output_message(j_common_ptr) {}  // never write to the host's stderr

void on_progress(j_common_ptr cinfo) {
    if (!cinfo->is_decompressor) return;
    if (reinterpret_cast<j_decompress_ptr>(cinfo)->input_scan_number > kMaxScans) {
        reinterpret_cast<ErrorManager*>(cinfo->err)->failure = Failure::TooManyScans;
        std::longjmp(reinterpret_cast<ErrorManager*>(cinfo->err)->jump, 1);
    }
}

// Owns the decompressor so that every exit, thrown or jumped, destroys it exactly once.
struct Session {
    jpeg_decompress_struct cinfo{};
    ErrorManager err{};
    jpeg_progress_mgr progress{};
    bool created = false;
    // The output lives here rather than in decode_jpeg's frame: objects changed between setjmp and
    // longjmp must not be plain locals of the function that called setjmp.
    Rgb8Image image;
    std::vector<uint8_t> cmyk_row;

    ~Session() {
        if (created) jpeg_destroy_decompress(&cinfo);
    }
};

[[noreturn]] void fail_decode(Failure failure) {
    // Our own wording only: decoder messages are not passed on to callers.
    switch (failure) {
        case Failure::Truncated: fail(Q3N_ERR_INVALID_ARGUMENT, "the JPEG data is truncated");
        case Failure::TooManyScans:
            fail(Q3N_ERR_INVALID_ARGUMENT, "the JPEG has more than " + std::to_string(kMaxScans) + " scans");
        default: fail(Q3N_ERR_INVALID_ARGUMENT, "the JPEG data is corrupt");
    }
}

// Sets up the session and reads the header with the APP1 segments kept. Must be called from the
// function that did setjmp on s.err.jump.
void start(Session& s, std::span<const uint8_t> bytes) {
    s.cinfo.err = jpeg_std_error(&s.err.pub);
    s.err.pub.error_exit = on_error_exit;
    s.err.pub.emit_message = on_emit_message;
    s.err.pub.output_message = on_output_message;
    jpeg_create_decompress(&s.cinfo);
    s.created = true;
    s.progress.progress_monitor = on_progress;
    s.cinfo.progress = &s.progress;
    jpeg_mem_src(&s.cinfo, bytes.data(), static_cast<unsigned long>(bytes.size()));
    jpeg_save_markers(&s.cinfo, JPEG_APP0 + 1, 0xFFFF);
    jpeg_read_header(&s.cinfo, TRUE);  // an abbreviated (tables-only) stream is an error here
}

Header header_of(const Session& s) {
    Header h;
    h.format = Format::Jpeg;
    h.width = s.cinfo.image_width;
    h.height = s.cinfo.image_height;
    h.channels = static_cast<uint32_t>(s.cinfo.num_components);
    h.bit_depth = static_cast<uint32_t>(s.cinfo.data_precision);
    for (jpeg_saved_marker_ptr m = s.cinfo.marker_list; m; m = m->next) {
        if (m->marker != JPEG_APP0 + 1) continue;
        const uint32_t o = parse_exif_orientation({m->data, m->data_length});
        // XMP also lives in APP1; the first segment that is EXIF decides, as in PIL.
        if (m->data_length >= 6 && std::string_view(reinterpret_cast<const char*>(m->data), 6) == std::string_view("Exif\0\0", 6)) {
            h.orientation = o;
            break;
        }
    }
    return h;
}

// PIL's MULDIV255: a * b / 255 rounded, in integers.
inline uint8_t muldiv255(unsigned a, unsigned b) {
    const unsigned t = a * b + 128;
    return static_cast<uint8_t>(((t >> 8) + t) >> 8);
}

}  // namespace

Header read_jpeg_header(std::span<const uint8_t> bytes) {
    Session s;
    if (setjmp(s.err.jump)) fail_decode(s.err.failure);
    start(s, bytes);
    return header_of(s);
}

Rgb8Image decode_jpeg(std::span<const uint8_t> bytes, uint64_t max_pixels) {
    Session s;
    Rgb8Image& image = s.image;
    std::vector<uint8_t>& cmyk_row = s.cmyk_row;
    if (setjmp(s.err.jump)) fail_decode(s.err.failure);
    start(s, bytes);
    const size_t size = checked_rgb_size("JPEG", s.cinfo.image_width, s.cinfo.image_height, max_pixels);

    const bool cmyk = s.cinfo.jpeg_color_space == JCS_CMYK || s.cinfo.jpeg_color_space == JCS_YCCK;
    // libjpeg-turbo turns grayscale and YCbCr into RGB itself; CMYK (and YCCK, which it turns into
    // CMYK) is converted below. DCT method and upsampling stay at the defaults PIL and djpeg use.
    s.cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
    jpeg_start_decompress(&s.cinfo);
    if (s.cinfo.output_width != s.cinfo.image_width || s.cinfo.output_height != s.cinfo.image_height ||
        s.cinfo.output_components != (cmyk ? 4 : 3))
        fail(Q3N_ERR_INTERNAL, "libjpeg produced an unexpected output layout");

    image.width = s.cinfo.output_width;
    image.height = s.cinfo.output_height;
    image.pixels.resize(size);
    if (cmyk) cmyk_row.resize(size_t{image.width} * 4);
    const size_t stride = size_t{image.width} * 3;
    while (s.cinfo.output_scanline < s.cinfo.output_height) {
        const size_t y = s.cinfo.output_scanline;
        JSAMPROW row = cmyk ? cmyk_row.data() : image.pixels.data() + y * stride;
        if (jpeg_read_scanlines(&s.cinfo, &row, 1) != 1) fail_decode(Failure::Truncated);
        if (!cmyk) continue;
        // As PIL: Adobe (Photoshop) files store CMYK inverted, which PIL undoes through its
        // "CMYK;I" raw mode before its cmyk2rgb, R = (255 - K) - C * (255 - K) / 255.
        const bool inverted = s.cinfo.saw_Adobe_marker;
        uint8_t* out = image.pixels.data() + y * stride;
        for (size_t x = 0; x < image.width; ++x) {
            const uint8_t* in = &cmyk_row[x * 4];
            const unsigned k = inverted ? 255u - in[3] : in[3];
            const unsigned nk = 255u - k;
            for (int c = 0; c < 3; ++c) {
                const unsigned v = inverted ? 255u - in[c] : in[c];
                out[x * 3 + c] = static_cast<uint8_t>(nk - muldiv255(v, nk));
            }
        }
    }
    // No jpeg_finish_decompress: every pixel is in, and what follows the last scan cannot change
    // them; the session's destructor releases libjpeg's memory.
    return std::move(s.image);
}

}  // namespace q3n::image
