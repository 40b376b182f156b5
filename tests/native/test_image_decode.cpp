// Image decoding through the C ABI (native/src/image, api/image_api.cpp). References come from
// outside the engine: djpeg's pixels for JPEG (tests/fixtures/images/make_images.sh), exact round
// trips through libpng's and libwebp's own encoders, and where a marked corner ends up for EXIF.
// Every bad input of RELIABILITY.md's image list gets its typed status, and a good image decodes
// after each.
#include <gtest/gtest.h>

#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <jpeglib.h>
#include <png.h>
#include <webp/encode.h>
#include <zlib.h>

#include "image/exif_orientation.h"
#include "qwen3native.h"

namespace {

using Bytes = std::vector<uint8_t>;

std::string images_dir() { return std::string(Q3N_FIXTURE_DIR) + "/images/"; }

Bytes read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    EXPECT_TRUE(in.good()) << path;
    return Bytes(std::istreambuf_iterator<char>(in), {});
}

// A binary PPM (P6) or PGM (P5) as written by djpeg; gray is widened to RGB.
Bytes read_pnm(const std::string& path, uint32_t& w, uint32_t& h) {
    const Bytes b = read_file(path);
    std::string head(b.begin(), b.begin() + std::min<size_t>(b.size(), 64));
    std::istringstream is(head);
    std::string magic;
    int maxval = 0;
    is >> magic >> w >> h >> maxval;
    const size_t start = static_cast<size_t>(is.tellg()) + 1;
    const bool gray = magic == "P5";
    Bytes rgb;
    for (size_t i = 0; i < size_t{w} * h; ++i)
        for (int c = 0; c < 3; ++c) rgb.push_back(b.at(start + (gray ? i : i * 3 + c)));
    return rgb;
}

struct Image {
    q3n_image* p = nullptr;
    ~Image() { q3n_image_free(p); }
};

struct Decoded {
    q3n_status status = Q3N_ERR_INTERNAL;
    std::string error;
    q3n_image_info info{};
    Bytes rgb;
};

Decoded decode(const Bytes& bytes, uint64_t max_pixels = Q3N_IMAGE_DEFAULT_MAX_PIXELS, bool orient = true) {
    q3n_image_decode_options o;
    q3n_image_decode_options_init(&o, sizeof o);
    o.max_pixels = max_pixels;
    o.apply_exif_orientation = orient ? 1 : 0;
    Decoded d;
    Image img;
    d.status = q3n_image_decode(bytes.data(), bytes.size(), &o, &img.p);
    if (d.status != Q3N_OK) {
        d.error = q3n_last_error();
        EXPECT_EQ(img.p, nullptr);
        return d;
    }
    d.info.struct_size = sizeof d.info;
    EXPECT_EQ(q3n_image_get_info(img.p, &d.info), Q3N_OK);
    size_t n = 0;
    EXPECT_EQ(q3n_image_get_pixels(img.p, nullptr, 0, &n), Q3N_ERR_BUFFER_TOO_SMALL);
    EXPECT_EQ(n, size_t{d.info.width} * d.info.height * 3);
    d.rgb.resize(n);
    EXPECT_EQ(q3n_image_get_pixels(img.p, d.rgb.data(), d.rgb.size(), &n), Q3N_OK);
    return d;
}

// ---- encoders (the libraries' own) -------------------------------------------------------------

struct PngSpec {
    uint32_t w = 1, h = 1;
    int color_type = PNG_COLOR_TYPE_RGB;
    int bit_depth = 8;
    bool interlace = false;
    std::vector<png_color> palette;
    std::vector<uint8_t> trns;      // palette alpha
    Bytes exif;                     // a bare TIFF structure for an eXIf chunk
    Bytes samples;                  // packed rows as libpng takes them (big-endian for 16 bits)
};

void png_write_to_vector(png_structp png, png_bytep data, size_t n) {
    auto* out = static_cast<Bytes*>(png_get_io_ptr(png));
    out->insert(out->end(), data, data + n);
}

Bytes encode_png(const PngSpec& s) {
    Bytes out;
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
    png_infop info = png_create_info_struct(png);
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        ADD_FAILURE() << "libpng could not encode the test image";
        return {};
    }
    png_set_write_fn(png, &out, png_write_to_vector, nullptr);
    png_set_IHDR(png, info, s.w, s.h, s.bit_depth, s.color_type, s.interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (!s.palette.empty()) png_set_PLTE(png, info, s.palette.data(), static_cast<int>(s.palette.size()));
    if (!s.trns.empty()) png_set_tRNS(png, info, s.trns.data(), static_cast<int>(s.trns.size()), nullptr);
    if (!s.exif.empty()) png_set_eXIf_1(png, info, static_cast<png_uint_32>(s.exif.size()), const_cast<png_bytep>(s.exif.data()));
    png_write_info(png, info);
    const size_t row = png_get_rowbytes(png, info);
    std::vector<png_bytep> rows(s.h);
    for (uint32_t y = 0; y < s.h; ++y) rows[y] = const_cast<png_bytep>(s.samples.data() + y * row);
    png_write_image(png, rows.data());
    png_write_end(png, nullptr);
    png_destroy_write_struct(&png, &info);
    return out;
}

struct JpegSpec {
    uint32_t w = 8, h = 8;
    int components = 3;
    J_COLOR_SPACE space = JCS_RGB;
    int quality = 100;
    Bytes app1;      // written as an APP1 segment when not empty
    Bytes samples;
};

Bytes encode_jpeg(const JpegSpec& s) {
    jpeg_compress_struct c;
    jpeg_error_mgr err;
    c.err = jpeg_std_error(&err);  // the encoder only sees inputs the test made
    jpeg_create_compress(&c);
    unsigned char* mem = nullptr;
    unsigned long size = 0;
    jpeg_mem_dest(&c, &mem, &size);
    c.image_width = s.w;
    c.image_height = s.h;
    c.input_components = s.components;
    c.in_color_space = s.space;
    jpeg_set_defaults(&c);
    jpeg_set_quality(&c, s.quality, TRUE);
    for (int i = 0; i < c.num_components; ++i) c.comp_info[i].h_samp_factor = c.comp_info[i].v_samp_factor = 1;
    jpeg_start_compress(&c, TRUE);
    if (!s.app1.empty()) jpeg_write_marker(&c, JPEG_APP0 + 1, s.app1.data(), static_cast<unsigned>(s.app1.size()));
    while (c.next_scanline < c.image_height) {
        JSAMPROW row = const_cast<JSAMPROW>(s.samples.data() + size_t{c.next_scanline} * s.w * s.components);
        jpeg_write_scanlines(&c, &row, 1);
    }
    jpeg_finish_compress(&c);
    Bytes out(mem, mem + size);
    jpeg_destroy_compress(&c);
    free(mem);
    return out;
}

Bytes encode_webp_lossless(const Bytes& samples, int w, int h, bool alpha) {
    uint8_t* out = nullptr;
    const size_t n = alpha ? WebPEncodeLosslessRGBA(samples.data(), w, h, w * 4, &out)
                           : WebPEncodeLosslessRGB(samples.data(), w, h, w * 3, &out);
    Bytes b(out, out + n);
    WebPFree(out);
    return b;
}

Bytes encode_webp_lossy(const Bytes& rgb, int w, int h) {
    uint8_t* out = nullptr;
    const size_t n = WebPEncodeRGB(rgb.data(), w, h, w * 3, 90, &out);
    Bytes b(out, out + n);
    WebPFree(out);
    return b;
}

Bytes noise(size_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    Bytes b(n);
    for (auto& v : b) v = static_cast<uint8_t>(rng());
    return b;
}

Bytes small_rgb_png(uint32_t w = 5, uint32_t h = 3) {
    PngSpec s;
    s.w = w;
    s.h = h;
    s.samples = noise(size_t{w} * h * 3, w * 31 + h);
    return encode_png(s);
}

// An EXIF APP1 payload whose IFD0 holds a few tags, Orientation among them.
Bytes exif_app1(uint16_t orientation, bool little_endian, uint16_t type = 3) {
    Bytes b = {'E', 'x', 'i', 'f', 0, 0};
    auto u16 = [&](uint16_t v) {
        if (little_endian) { b.push_back(v & 0xFF); b.push_back(v >> 8); }
        else { b.push_back(v >> 8); b.push_back(v & 0xFF); }
    };
    auto u32 = [&](uint32_t v) {
        if (little_endian) for (int i = 0; i < 4; ++i) b.push_back((v >> (8 * i)) & 0xFF);
        else for (int i = 3; i >= 0; --i) b.push_back((v >> (8 * i)) & 0xFF);
    };
    b.push_back(little_endian ? 'I' : 'M');
    b.push_back(little_endian ? 'I' : 'M');
    u16(42);
    u32(8);
    u16(3);                                    // three entries
    u16(0x010F); u16(2); u32(4); u32(26 + 12); // Make, ASCII, stored after the directory
    u16(0x0112); u16(type); u32(1);
    if (type == 3) { u16(orientation); u16(0); } else u32(orientation);
    u16(0x011A); u16(5); u32(1); u32(0);       // XResolution (offset not followed)
    u32(0);                                    // no IFD1
    b.insert(b.end(), {'A', 'B', 'C', 0});
    return b;
}

void png_patch_ihdr(Bytes& png, uint32_t w, uint32_t h) {
    // IHDR data starts at byte 16 (8 signature + 4 length + 4 type); its CRC covers type and data.
    for (int i = 0; i < 4; ++i) {
        png[16 + i] = static_cast<uint8_t>(w >> (24 - 8 * i));
        png[20 + i] = static_cast<uint8_t>(h >> (24 - 8 * i));
    }
    const uLong crc = crc32(0, png.data() + 12, 17);
    for (int i = 0; i < 4; ++i) png[29 + i] = static_cast<uint8_t>(crc >> (24 - 8 * i));
}

void expect_good_image_still_decodes() {
    const Decoded d = decode(small_rgb_png());
    EXPECT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.info.width, 5u);
}

}  // namespace

// ---- JPEG against djpeg ---------------------------------------------------------------------------

class JpegFixture : public ::testing::TestWithParam<std::pair<const char*, const char*>> {};

TEST_P(JpegFixture, MatchesDjpegExactly) {
    const auto [jpg, ref] = GetParam();
    uint32_t w = 0, h = 0;
    const Bytes expected = read_pnm(images_dir() + ref, w, h);
    const Decoded d = decode(read_file(images_dir() + jpg));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.info.format, Q3N_IMAGE_FORMAT_JPEG);
    ASSERT_EQ(d.info.width, w);
    ASSERT_EQ(d.info.height, h);
    EXPECT_EQ(d.rgb, expected);  // same library, same defaults: bit-exact
}

INSTANTIATE_TEST_SUITE_P(Images, JpegFixture,
                         ::testing::Values(std::make_pair("photo_420.jpg", "photo_420.djpeg.ppm"),
                                           std::make_pair("photo_422_progressive.jpg", "photo_422_progressive.djpeg.ppm"),
                                           std::make_pair("photo_gray.jpg", "photo_gray.djpeg.pgm")));

TEST(ImageDecode, JpegGrayscaleReportsOneChannel) {
    q3n_image_info info{};
    info.struct_size = sizeof info;
    const Bytes b = read_file(images_dir() + "photo_gray.jpg");
    ASSERT_EQ(q3n_image_probe(b.data(), b.size(), &info), Q3N_OK) << q3n_last_error();
    EXPECT_EQ(info.source_channels, 1u);
    EXPECT_EQ(info.width, 61u);
    EXPECT_EQ(info.height, 37u);
}

TEST(ImageDecode, CmykJpegConvertsAsPil) {
    // Adobe-style (inverted) CMYK, as Photoshop writes and libjpeg marks with an Adobe segment.
    // True CMYK (c, m, y, k) = (40, 120, 200, 60) gives PIL's R = (255-k) - c(255-k)/255.
    JpegSpec s;
    s.w = s.h = 16;
    s.components = 4;
    s.space = JCS_CMYK;
    const uint8_t cmyk[4] = {40, 120, 200, 60};
    for (int i = 0; i < 16 * 16; ++i)
        for (int c = 0; c < 4; ++c) s.samples.push_back(255 - cmyk[c]);
    const Decoded d = decode(encode_jpeg(s));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.info.source_channels, 4u);
    for (int c = 0; c < 3; ++c) {
        const double nk = 255 - cmyk[3];
        const double expected = nk - cmyk[c] * nk / 255.0;
        EXPECT_NEAR(d.rgb[(8 * 16 + 8) * 3 + c], expected, 2.0) << "channel " << c;
    }
}

// ---- EXIF orientation ---------------------------------------------------------------------------

// A 16x8 grey JPEG whose top-left 8x8 block is red: after orientation o the red block must sit in
// the corner PIL's exif_transpose puts it (the stored top-left corner, moved by o).
TEST(ImageDecode, ExifOrientationMovesTheMarkedCornerInBothByteOrders) {
    struct Case {
        uint16_t orientation;
        uint32_t w, h;
        int corner;  // 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
    };
    const Case cases[] = {{1, 16, 8, 0}, {2, 16, 8, 1}, {3, 16, 8, 3}, {4, 16, 8, 2},
                          {5, 8, 16, 0}, {6, 8, 16, 1}, {7, 8, 16, 3}, {8, 8, 16, 2}};
    JpegSpec s;
    s.w = 16;
    s.h = 8;
    for (uint32_t y = 0; y < 8; ++y)
        for (uint32_t x = 0; x < 16; ++x) {
            const bool red = x < 8;
            s.samples.insert(s.samples.end(), {uint8_t(red ? 250 : 128), uint8_t(red ? 0 : 128), uint8_t(red ? 0 : 128)});
        }
    for (bool little : {true, false}) {
        for (const Case& c : cases) {
            SCOPED_TRACE("orientation " + std::to_string(c.orientation) + (little ? " II" : " MM"));
            s.app1 = exif_app1(c.orientation, little);
            const Bytes jpg = encode_jpeg(s);
            q3n_image_info probe{};
            probe.struct_size = sizeof probe;
            ASSERT_EQ(q3n_image_probe(jpg.data(), jpg.size(), &probe), Q3N_OK);
            EXPECT_EQ(probe.exif_orientation, c.orientation);
            EXPECT_EQ(probe.width, c.w);
            const Decoded d = decode(jpg);
            ASSERT_EQ(d.status, Q3N_OK) << d.error;
            ASSERT_EQ(d.info.width, c.w);
            ASSERT_EQ(d.info.height, c.h);
            EXPECT_EQ(d.info.stored_width, 16u);
            const uint32_t cx = (c.corner & 1) ? c.w - 2 : 1, cy = (c.corner & 2) ? c.h - 2 : 1;
            const uint32_t ox = (c.corner & 1) ? 1 : c.w - 2, oy = (c.corner & 2) ? 1 : c.h - 2;
            EXPECT_GT(d.rgb[(cy * c.w + cx) * 3], 200) << "the marked corner is not red";
            EXPECT_LT(d.rgb[(cy * c.w + cx) * 3 + 1], 40);
            EXPECT_NEAR(d.rgb[(oy * c.w + ox) * 3 + 1], 128, 8) << "the opposite corner is not grey";
            // Orientation off: the stored picture.
            const Decoded raw = decode(jpg, Q3N_IMAGE_DEFAULT_MAX_PIXELS, false);
            ASSERT_EQ(raw.status, Q3N_OK);
            EXPECT_EQ(raw.info.width, 16u);
            EXPECT_GT(raw.rgb[(1 * 16 + 1) * 3], 200);
        }
    }
}

TEST(ImageDecode, ExifParserIsBoundedAndIgnoresNonsense) {
    using q3n::image::parse_exif_orientation;
    EXPECT_EQ(parse_exif_orientation(exif_app1(6, true)), 6u);
    EXPECT_EQ(parse_exif_orientation(exif_app1(8, false)), 8u);
    EXPECT_EQ(parse_exif_orientation(exif_app1(3, false, 4)), 3u);  // a LONG Orientation
    EXPECT_EQ(parse_exif_orientation(exif_app1(9, true)), 1u);      // no transpose for 9: ignored
    EXPECT_EQ(parse_exif_orientation(exif_app1(0, true)), 1u);
    const Bytes good = exif_app1(6, true);
    // Every truncation of a valid payload, and offsets pointing anywhere, stay inside the span.
    for (size_t n = 0; n < good.size(); ++n) {
        const uint32_t o = parse_exif_orientation({good.data(), n});
        EXPECT_TRUE(o == 1 || o == 6);
    }
    Bytes bad = good;
    bad[10] = bad[11] = bad[12] = bad[13] = 0xFF;  // IFD0 offset 0xFFFFFFFF
    EXPECT_EQ(parse_exif_orientation(bad), 1u);
    bad = good;
    bad[14] = bad[15] = 0xFF;  // 65535 entries in a 50-byte segment: read only while inside it
    EXPECT_EQ(parse_exif_orientation(bad), 6u);
    bad[16] = bad[17] = 0;     // ... and with the first entries unknown, the walk stops at the end
    bad[28] = bad[29] = 0;
    EXPECT_EQ(parse_exif_orientation(bad), 1u);
    Bytes xmp = {'h', 't', 't', 'p', ':', '/', '/'};
    EXPECT_EQ(parse_exif_orientation(xmp), 1u);
}

TEST(ImageDecode, PngExifChunkIsApplied) {
    PngSpec s;
    s.w = 3;
    s.h = 2;
    s.samples = noise(3 * 2 * 3, 5);
    const Bytes app1 = exif_app1(6, false);
    s.exif.assign(app1.begin() + 6, app1.end());
    const Decoded d = decode(encode_png(s));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.info.exif_orientation, 6u);
    ASSERT_EQ(d.info.width, 2u);
    ASSERT_EQ(d.info.height, 3u);
    // Rotated 90 degrees clockwise: the stored bottom-left pixel (0, 1) lands at the top-left.
    EXPECT_TRUE(std::equal(d.rgb.begin(), d.rgb.begin() + 3, s.samples.begin() + 3 * 3));
}

// ---- PNG: exact round trips and PIL's conversions --------------------------------------------------

TEST(ImageDecode, PngRgbRoundTripsExactlyIncludingInterlaced) {
    for (bool interlace : {false, true}) {
        PngSpec s;
        s.w = 37;
        s.h = 23;
        s.interlace = interlace;
        s.samples = noise(37 * 23 * 3, 11);
        const Decoded d = decode(encode_png(s));
        ASSERT_EQ(d.status, Q3N_OK) << d.error;
        EXPECT_EQ(d.info.format, Q3N_IMAGE_FORMAT_PNG);
        EXPECT_EQ(d.rgb, s.samples) << (interlace ? "Adam7" : "plain");
    }
}

TEST(ImageDecode, PngAlphaIsDroppedNotComposited) {
    // transformers 5.17's Qwen3-VL processor converts with PIL's convert("RGB"): the colour under a
    // fully transparent pixel survives (no white background).
    PngSpec s;
    s.w = 2;
    s.h = 1;
    s.color_type = PNG_COLOR_TYPE_RGBA;
    s.samples = {10, 20, 30, 0, 200, 150, 100, 128};
    const Decoded d = decode(encode_png(s));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.info.source_channels, 4u);
    EXPECT_EQ(d.rgb, (Bytes{10, 20, 30, 200, 150, 100}));
}

TEST(ImageDecode, PngGrayGrayAlphaAndLowBitDepths) {
    PngSpec ga;
    ga.w = 2;
    ga.color_type = PNG_COLOR_TYPE_GRAY_ALPHA;
    ga.samples = {7, 0, 250, 255};
    Decoded d = decode(encode_png(ga));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.rgb, (Bytes{7, 7, 7, 250, 250, 250}));

    PngSpec g1;  // 1 bit: 0 and 255, as PIL's mode "1" then "RGB"
    g1.w = 8;
    g1.color_type = PNG_COLOR_TYPE_GRAY;
    g1.bit_depth = 1;
    g1.samples = {0b10100000};
    d = decode(encode_png(g1));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.info.source_bit_depth, 1u);
    EXPECT_EQ(d.rgb[0], 255);
    EXPECT_EQ(d.rgb[3], 0);
    EXPECT_EQ(d.rgb[6], 255);

    PngSpec g4;  // 4 bits: v * 17
    g4.w = 2;
    g4.color_type = PNG_COLOR_TYPE_GRAY;
    g4.bit_depth = 4;
    g4.samples = {0x3F};
    d = decode(encode_png(g4));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.rgb, (Bytes{51, 51, 51, 255, 255, 255}));
}

TEST(ImageDecode, PngPaletteWithTransparencyGivesThePaletteColours) {
    PngSpec s;
    s.w = 3;
    s.color_type = PNG_COLOR_TYPE_PALETTE;
    s.palette = {{1, 2, 3}, {40, 50, 60}, {255, 0, 128}};
    s.trns = {0, 255, 10};
    s.samples = {2, 0, 1};
    const Decoded d = decode(encode_png(s));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.rgb, (Bytes{255, 0, 128, 1, 2, 3, 40, 50, 60}));
}

TEST(ImageDecode, Png16BitKeepsTheHighByteAsPil) {
    PngSpec s;
    s.w = 2;
    s.bit_depth = 16;
    // Big-endian samples: 0x12FF, 0x3400, 0xFFFF | 0x0080, 0x7F7F, 0x8001. High bytes, not rounding
    // (rounding would give 0x13 for 0x12FF).
    s.samples = {0x12, 0xFF, 0x34, 0x00, 0xFF, 0xFF, 0x00, 0x80, 0x7F, 0x7F, 0x80, 0x01};
    Decoded d = decode(encode_png(s));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.info.source_bit_depth, 16u);
    EXPECT_EQ(d.rgb, (Bytes{0x12, 0x34, 0xFF, 0x00, 0x7F, 0x80}));

    PngSpec g;
    g.w = 2;
    g.color_type = PNG_COLOR_TYPE_GRAY;
    g.bit_depth = 16;
    g.samples = {0xAB, 0xCD, 0x01, 0x02};
    d = decode(encode_png(g));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.rgb, (Bytes{0xAB, 0xAB, 0xAB, 0x01, 0x01, 0x01}));
}

// ---- WebP ----------------------------------------------------------------------------------------

TEST(ImageDecode, WebpLosslessRoundTripsExactly) {
    const Bytes rgb = noise(19 * 11 * 3, 3);
    Decoded d = decode(encode_webp_lossless(rgb, 19, 11, false));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.info.format, Q3N_IMAGE_FORMAT_WEBP);
    EXPECT_EQ(d.rgb, rgb);

    // With alpha (kept above 0, where the encoder keeps colours exactly): alpha is dropped.
    Bytes rgba = noise(7 * 5 * 4, 4);
    for (size_t i = 3; i < rgba.size(); i += 4) rgba[i] = static_cast<uint8_t>(1 + rgba[i] % 255);
    d = decode(encode_webp_lossless(rgba, 7, 5, true));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.info.source_channels, 4u);
    for (size_t i = 0; i < 7 * 5; ++i)
        for (int c = 0; c < 3; ++c) ASSERT_EQ(d.rgb[i * 3 + c], rgba[i * 4 + c]) << "pixel " << i;
}

TEST(ImageDecode, WebpLossyDecodesCloseToTheSource) {
    Bytes rgb(32 * 16 * 3);
    for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>((i / 3 % 32) * 8);
    const Decoded d = decode(encode_webp_lossy(rgb, 32, 16));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    ASSERT_EQ(d.rgb.size(), rgb.size());
    double err = 0;
    for (size_t i = 0; i < rgb.size(); ++i) err += std::abs(int(d.rgb[i]) - int(rgb[i]));
    EXPECT_LT(err / rgb.size(), 6.0);
}

TEST(ImageDecode, AnimatedWebpIsRefusedAsUnsupported) {
    // A VP8X header with the animation flag and a 4x4 canvas.
    Bytes b = {'R', 'I', 'F', 'F', 22, 0, 0, 0, 'W', 'E', 'B', 'P', 'V', 'P', '8', 'X', 10, 0, 0, 0,
               0x02, 0, 0, 0, 3, 0, 0, 3, 0, 0};
    const Decoded d = decode(b);
    EXPECT_EQ(d.status, Q3N_ERR_UNSUPPORTED) << d.error;
    EXPECT_NE(d.error.find("animated"), std::string::npos) << d.error;
    expect_good_image_still_decodes();
}

// ---- sizes, bombs and bad input ----------------------------------------------------------------------

TEST(ImageDecode, OneByOneDecodesInEveryFormat) {
    PngSpec p;
    p.samples = {9, 8, 7};
    Decoded d = decode(encode_png(p));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.rgb, (Bytes{9, 8, 7}));
    d = decode(encode_webp_lossless({9, 8, 7}, 1, 1, false));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.rgb, (Bytes{9, 8, 7}));
    JpegSpec j;
    j.w = j.h = 1;
    j.samples = {200, 100, 50};
    d = decode(encode_jpeg(j));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    ASSERT_EQ(d.rgb.size(), 3u);
    EXPECT_NEAR(d.rgb[0], 200, 4);
}

TEST(ImageDecode, VeryWideImageDecodes) {
    const Decoded d = decode(small_rgb_png(20000, 1));
    ASSERT_EQ(d.status, Q3N_OK) << d.error;
    EXPECT_EQ(d.info.width, 20000u);
    EXPECT_EQ(d.info.height, 1u);
}

TEST(ImageDecode, DecompressionBombsAreRefusedFromTheHeader) {
    // PNG claiming 100000x100000 (1e10 pixels, 30 GB of RGB): the probe reads the claim, the decoder
    // refuses it without allocating (under AddressSanitizer such an allocation would abort).
    Bytes png = small_rgb_png(4, 4);
    png_patch_ihdr(png, 100000, 100000);
    q3n_image_info info{};
    info.struct_size = sizeof info;
    ASSERT_EQ(q3n_image_probe(png.data(), png.size(), &info), Q3N_OK) << q3n_last_error();
    EXPECT_EQ(info.width, 100000u);
    Decoded d = decode(png);
    EXPECT_EQ(d.status, Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_NE(d.error.find("100000x100000"), std::string::npos) << d.error;
    EXPECT_NE(d.error.find("limit"), std::string::npos) << d.error;

    // JPEG's largest expressible size, 65000x65000, patched into the SOF of a real file.
    JpegSpec j;
    j.samples = noise(8 * 8 * 3, 1);
    Bytes jpg = encode_jpeg(j);
    size_t sof = 2;
    while (sof + 9 < jpg.size() && !(jpg[sof] == 0xFF && jpg[sof + 1] == 0xC0)) ++sof;
    ASSERT_LT(sof + 9, jpg.size());
    jpg[sof + 5] = jpg[sof + 7] = 65000 >> 8;
    jpg[sof + 6] = jpg[sof + 8] = 65000 & 0xFF;
    d = decode(jpg);
    EXPECT_EQ(d.status, Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_NE(d.error.find("65000x65000"), std::string::npos) << d.error;

    // Lossless WebP header claiming 16384x16384 (the VP8L maximum).
    Bytes webp = encode_webp_lossless(noise(4 * 4 * 3, 2), 4, 4, false);
    ASSERT_EQ(webp[20], 0x2F);
    uint32_t bits = webp[21] | webp[22] << 8 | webp[23] << 16 | uint32_t(webp[24]) << 24;
    bits = (bits & ~0x0FFFFFFFu) | 0x3FFFu | (0x3FFFu << 14);
    for (int i = 0; i < 4; ++i) webp[21 + i] = static_cast<uint8_t>(bits >> (8 * i));
    d = decode(webp);
    EXPECT_EQ(d.status, Q3N_ERR_INVALID_ARGUMENT) << d.error;
    EXPECT_NE(d.error.find("16384x16384"), std::string::npos) << d.error;
    expect_good_image_still_decodes();
}

TEST(ImageDecode, PixelLimitIsInclusive) {
    const Bytes png = small_rgb_png(5, 3);
    EXPECT_EQ(decode(png, 15).status, Q3N_OK);
    EXPECT_EQ(decode(png, 14).status, Q3N_ERR_INVALID_ARGUMENT);
    const Bytes jpg = read_file(images_dir() + "photo_420.jpg");
    EXPECT_EQ(decode(jpg, 61 * 37).status, Q3N_OK);
    EXPECT_EQ(decode(jpg, 61 * 37 - 1).status, Q3N_ERR_INVALID_ARGUMENT);
}

TEST(ImageDecode, EveryTruncationIsATypedErrorNeverACrash) {
    const Bytes files[] = {read_file(images_dir() + "photo_420.jpg"), read_file(images_dir() + "photo_422_progressive.jpg"),
                           small_rgb_png(17, 9), encode_webp_lossless(noise(9 * 9 * 3, 8), 9, 9, false),
                           encode_webp_lossy(noise(16 * 16 * 3, 9), 16, 16)};
    for (const Bytes& f : files) {
        for (size_t n = 1; n < f.size(); n += (n < 64 || n + 64 > f.size() ? 1 : 7)) {
            const Bytes cut(f.begin(), f.begin() + n);
            const Decoded d = decode(cut);
            // Only the last 12 bytes (PNG's IEND chunk, JPEG's EOI) may go without losing a pixel:
            // PIL loads such files too.
            if (n + 12 < f.size()) {
                ASSERT_NE(d.status, Q3N_OK) << "a file cut to " << n << " of " << f.size() << " bytes decoded";
            }
            ASSERT_TRUE(d.status == Q3N_OK || d.status == Q3N_ERR_INVALID_ARGUMENT || d.status == Q3N_ERR_UNSUPPORTED)
                << n << ": " << q3n_status_name(d.status) << " " << d.error;
        }
    }
    const Decoded d = decode(Bytes(files[0].begin(), files[0].begin() + files[0].size() / 2));
    EXPECT_NE(d.error.find("truncated"), std::string::npos) << d.error;
    expect_good_image_still_decodes();
}

TEST(ImageDecode, CorruptDataIsATypedErrorNeverACrash) {
    // Flipped bytes after the signature: PNG's CRCs catch them; JPEG may decode through damaged
    // entropy data (as PIL does) but must never crash or read out of bounds.
    const Bytes png = small_rgb_png(16, 16);
    Bytes bad = png;
    bad[png.size() / 2] ^= 0x55;
    EXPECT_EQ(decode(bad).status, Q3N_ERR_INVALID_ARGUMENT);
    std::mt19937 rng(1);
    const Bytes sources[] = {read_file(images_dir() + "photo_420.jpg"), png,
                             encode_webp_lossless(noise(9 * 9 * 3, 8), 9, 9, false)};
    for (const Bytes& src : sources) {
        for (int trial = 0; trial < 200; ++trial) {
            Bytes b = src;
            for (int k = 0; k < 4; ++k) b[4 + rng() % (b.size() - 4)] = static_cast<uint8_t>(rng());
            const q3n_status s = decode(b).status;
            ASSERT_TRUE(s == Q3N_OK || s == Q3N_ERR_INVALID_ARGUMENT || s == Q3N_ERR_UNSUPPORTED) << q3n_status_name(s);
        }
    }
    expect_good_image_still_decodes();
}

TEST(ImageDecode, EmptyRandomAndForeignBytesAreRefused) {
    Decoded d = decode({});
    EXPECT_EQ(d.status, Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_NE(d.error.find("empty"), std::string::npos) << d.error;
    d = decode(noise(4096, 42));
    EXPECT_EQ(d.status, Q3N_ERR_UNSUPPORTED);
    d = decode({'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0});
    EXPECT_EQ(d.status, Q3N_ERR_UNSUPPORTED);
    EXPECT_NE(d.error.find("GIF"), std::string::npos) << d.error;
    // A PNG renamed .jpg is still a PNG: only the bytes count (the API never sees a name), and a
    // JPEG signature followed by PNG data is corrupt JPEG, not a PNG.
    Bytes fake = small_rgb_png();
    fake[0] = 0xFF;
    fake[1] = 0xD8;
    fake[2] = 0xFF;
    EXPECT_EQ(decode(fake).status, Q3N_ERR_INVALID_ARGUMENT);
    expect_good_image_still_decodes();
}

TEST(ImageDecode, CApiArgumentsAndVersionedStructs) {
    const Bytes png = small_rgb_png();
    q3n_image* img = reinterpret_cast<q3n_image*>(1);
    EXPECT_EQ(q3n_image_decode(nullptr, 10, nullptr, &img), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(img, nullptr);
    EXPECT_EQ(q3n_image_decode(png.data(), png.size(), nullptr, nullptr), Q3N_ERR_INVALID_ARGUMENT);
    q3n_image_decode_options o;
    q3n_image_decode_options_init(&o, sizeof o);
    EXPECT_EQ(o.max_pixels, uint64_t{Q3N_IMAGE_DEFAULT_MAX_PIXELS});
    EXPECT_EQ(o.apply_exif_orientation, 1u);
    o.max_pixels = 0;
    EXPECT_EQ(q3n_image_decode(png.data(), png.size(), &o, &img), Q3N_ERR_INVALID_ARGUMENT);
    o.struct_size = 1000;
    o.max_pixels = 100;
    EXPECT_EQ(q3n_image_decode(png.data(), png.size(), &o, &img), Q3N_ERR_INVALID_ARGUMENT);
    // An older caller's struct (only struct_size and max_pixels) keeps the newer defaults.
    q3n_image_decode_options_init(&o, offsetof(q3n_image_decode_options, apply_exif_orientation));
    EXPECT_EQ(o.struct_size, offsetof(q3n_image_decode_options, apply_exif_orientation));
    ASSERT_EQ(q3n_image_decode(png.data(), png.size(), &o, &img), Q3N_OK) << q3n_last_error();
    // A caller that knows only the first fields of the info struct gets only those.
    uint32_t small_info[4] = {4 * sizeof(uint32_t), 0, 0, 0xDEAD};
    ASSERT_EQ(q3n_image_get_info(img, reinterpret_cast<q3n_image_info*>(small_info)), Q3N_OK);
    EXPECT_EQ(small_info[1], uint32_t{Q3N_IMAGE_FORMAT_PNG});
    EXPECT_EQ(small_info[2], 5u);
    EXPECT_EQ(small_info[3], 3u);
    size_t n = 0;
    uint8_t two[2];
    EXPECT_EQ(q3n_image_get_pixels(img, two, sizeof two, &n), Q3N_ERR_BUFFER_TOO_SMALL);
    EXPECT_EQ(n, 45u);
    EXPECT_EQ(q3n_image_get_pixels(img, two, sizeof two, nullptr), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(q3n_image_get_info(nullptr, nullptr), Q3N_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(q3n_image_probe(png.data(), png.size(), nullptr), Q3N_ERR_INVALID_ARGUMENT);
    q3n_image_free(img);
    q3n_image_free(nullptr);
}
