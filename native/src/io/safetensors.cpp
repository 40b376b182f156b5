#include "io/safetensors.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "core/checked_math.h"
#include "core/error.h"

namespace q3n {

namespace {

using json = nlohmann::json;

// The reference implementation's cap: a header larger than this is an attack, not a model.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// A valid header nests three deep (header -> entry -> shape); anything far deeper is hostile input
// and is stopped before it is built.
constexpr int kMaxJsonDepth = 64;
// Names and parser messages quoted in errors are cut here so that one hostile header cannot make a
// megabyte-long message.
constexpr size_t kMaxQuoted = 200;

struct DtypeInfo {
    StDtype dtype;
    const char* name;
    size_t size;
};

constexpr std::array<DtypeInfo, 15> kDtypes{{
    {StDtype::BOOL, "BOOL", 1},
    {StDtype::U8, "U8", 1},
    {StDtype::I8, "I8", 1},
    {StDtype::I16, "I16", 2},
    {StDtype::U16, "U16", 2},
    {StDtype::F16, "F16", 2},
    {StDtype::BF16, "BF16", 2},
    {StDtype::I32, "I32", 4},
    {StDtype::U32, "U32", 4},
    {StDtype::F32, "F32", 4},
    {StDtype::F64, "F64", 8},
    {StDtype::I64, "I64", 8},
    {StDtype::U64, "U64", 8},
    {StDtype::F8_E4M3, "F8_E4M3", 1},
    {StDtype::F8_E5M2, "F8_E5M2", 1},
}};

const DtypeInfo& dtype_info(StDtype dtype) {
    for (const auto& d : kDtypes)
        if (d.dtype == dtype) return d;
    fail(Q3N_ERR_INTERNAL, "unknown StDtype " + std::to_string(static_cast<int>(dtype)));
}

std::optional<StDtype> dtype_from_name(const std::string& name) {
    for (const auto& d : kDtypes)
        if (name == d.name) return d.dtype;
    return std::nullopt;
}

// Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF.
// Returns the offset of the first bad byte, or nullopt when the text is valid.
std::optional<size_t> find_invalid_utf8(const uint8_t* s, size_t n) {
    size_t i = 0;
    while (i < n) {
        const uint8_t c = s[i];
        if (c < 0x80) {
            ++i;
            continue;
        }
        size_t extra;
        uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the first continuation byte
        if (c >= 0xC2 && c <= 0xDF) {
            extra = 1;
        } else if (c == 0xE0) {
            extra = 2, lo = 0xA0;
        } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
            extra = 2;
        } else if (c == 0xED) {
            extra = 2, hi = 0x9F;
        } else if (c == 0xF0) {
            extra = 3, lo = 0x90;
        } else if (c >= 0xF1 && c <= 0xF3) {
            extra = 3;
        } else if (c == 0xF4) {
            extra = 3, hi = 0x8F;
        } else {
            return i;
        }
        if (n - i <= extra) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k <= extra; ++k)
            if ((s[i + k] & 0xC0) != 0x80) return i;
        i += extra + 1;
    }
    return std::nullopt;
}

// Quotes text from the file for a message: bounded length, control bytes made visible.
std::string quote(std::string_view text) {
    std::string out = "'";
    size_t n = std::min(text.size(), kMaxQuoted);
    // Do not cut a multi-byte character in half.
    while (n < text.size() && n > 0 && (static_cast<uint8_t>(text[n]) & 0xC0) == 0x80) --n;
    for (size_t i = 0; i < n; ++i) {
        const auto c = static_cast<uint8_t>(text[i]);
        if (c < 0x20 || c == 0x7F) {
            static const char* hex = "0123456789abcdef";
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        } else {
            out += static_cast<char>(c);
        }
    }
    if (n < text.size()) out += "...";
    out += "'";
    return out;
}

[[noreturn]] void bad(const std::string& file, const std::string& message) {
    fail(Q3N_ERR_BAD_CHECKPOINT, "bad safetensors file '" + file + "': " + message);
}

// Parses JSON text, rejecting duplicate keys in any object. nlohmann keeps one of two equal keys
// silently, which would let a header hide a second definition of a tensor.
json parse_header_json(const char* begin, const char* end, const std::string& file) {
    std::vector<std::unordered_set<std::string>> keys;  // one set per open object
    int depth = 0;
    auto callback = [&](int, json::parse_event_t event, json& parsed) -> bool {
        switch (event) {
            case json::parse_event_t::object_start:
            case json::parse_event_t::array_start:
                if (++depth > kMaxJsonDepth)
                    bad(file, "header JSON nests deeper than " + std::to_string(kMaxJsonDepth) + " levels");
                if (event == json::parse_event_t::object_start) keys.emplace_back();
                break;
            case json::parse_event_t::object_end:
                --depth;
                keys.pop_back();
                break;
            case json::parse_event_t::array_end:
                --depth;
                break;
            case json::parse_event_t::key: {
                const auto& key = parsed.get_ref<const std::string&>();
                if (!keys.empty() && !keys.back().insert(key).second) {
                    if (keys.size() == 1) bad(file, "duplicate tensor name " + quote(key));
                    bad(file, "duplicate key " + quote(key) + " in a header object");
                }
                break;
            }
            case json::parse_event_t::value:
                break;
        }
        return true;
    };
    try {
        return json::parse(begin, end, callback, /*allow_exceptions=*/true);
    } catch (const json::exception& e) {
        bad(file, "header is not valid JSON (" + std::string(e.what()).substr(0, kMaxQuoted) + ")");
    }
}

// Describes why a JSON value is not a non-negative integer; empty when it is one.
std::string not_an_index(const json& v) {
    if (v.is_number_unsigned()) return {};
    if (v.is_number_integer()) return v.get<int64_t>() < 0 ? "is negative (" + v.dump() + ")" : "";
    if (v.is_number_float()) return "is not an integer (" + v.dump().substr(0, 40) + ")";
    return std::string("is a JSON ") + v.type_name() + ", not an integer";
}

uint64_t as_index(const json& v) {
    return v.is_number_unsigned() ? v.get<uint64_t>() : static_cast<uint64_t>(v.get<int64_t>());
}

}  // namespace

size_t st_dtype_size(StDtype dtype) { return dtype_info(dtype).size; }

const char* st_dtype_name(StDtype dtype) { return dtype_info(dtype).name; }

uint64_t TensorView::numel() const {
    uint64_t n = 1;
    for (int64_t d : shape) n *= static_cast<uint64_t>(d);  // fits: validated against nbytes
    return n;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
    auto file = std::make_shared<SafetensorsFile>();
    file->file_ = std::make_unique<MappedFile>(path);
    validate(file->file_->data(), file->file_->size(), path, &file->tensors_, &file->metadata_);
    return file;
}

void SafetensorsFile::validate(const uint8_t* data, uint64_t size, const std::string& name_for_errors,
                               std::map<std::string, TensorView>* out_tensors,
                               std::map<std::string, std::string>* out_metadata) {
    const std::string& file = name_for_errors;

    if (size < 8) bad(file, "file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];  // little-endian on any host
    if (header_len > kMaxHeaderBytes)
        bad(file, "header length " + std::to_string(header_len) + " exceeds the limit of " +
                      std::to_string(kMaxHeaderBytes) + " bytes");
    const auto header_end = checked_add(header_len, 8);
    if (!header_end || *header_end > size)
        bad(file, "header length " + std::to_string(header_len) + " runs past the end of the " +
                      std::to_string(size) + "-byte file");

    const auto* header = data + 8;
    if (auto at = find_invalid_utf8(header, header_len))
        bad(file, "header is not valid UTF-8 (byte " + std::to_string(*at) + " of the header)");
    // JSON never holds a raw NUL, and nlohmann stops reading at one as if the text ended there: without
    // this check "{...}\0<anything>" would pass with its tail unread.
    if (const void* nul = std::memchr(header, 0, header_len))
        bad(file, "header is not valid JSON (NUL byte at byte " +
                      std::to_string(static_cast<const uint8_t*>(nul) - header) + " of the header)");

    const json root = parse_header_json(reinterpret_cast<const char*>(header),
                                        reinterpret_cast<const char*>(header + header_len), file);
    if (!root.is_object()) bad(file, std::string("header is a JSON ") + root.type_name() + ", not an object");

    struct Extent {
        uint64_t begin, end;
        const std::string* name;
    };
    std::map<std::string, TensorView> tensors;
    std::map<std::string, std::string> metadata;
    std::vector<Extent> extents;

    for (const auto& [key, entry] : root.items()) {
        if (key == "__metadata__") {
            if (!entry.is_object()) bad(file, "__metadata__ must be an object of strings");
            for (const auto& [mkey, mvalue] : entry.items()) {
                if (!mvalue.is_string())
                    bad(file, "__metadata__ value for " + quote(mkey) + " is a JSON " + mvalue.type_name() +
                                  ", not a string");
                metadata.emplace(mkey, mvalue.get<std::string>());
            }
            continue;
        }

        const std::string where = "tensor " + quote(key) + ": ";
        if (!entry.is_object()) bad(file, where + "entry is a JSON " + entry.type_name() + ", not an object");

        const auto dtype_it = entry.find("dtype");
        if (dtype_it == entry.end()) bad(file, where + "missing \"dtype\"");
        if (!dtype_it->is_string()) bad(file, where + "\"dtype\" is not a string");
        const auto dtype = dtype_from_name(dtype_it->get_ref<const std::string&>());
        if (!dtype) bad(file, where + "unknown dtype " + quote(dtype_it->get_ref<const std::string&>()));

        const auto shape_it = entry.find("shape");
        if (shape_it == entry.end()) bad(file, where + "missing \"shape\"");
        if (!shape_it->is_array()) bad(file, where + "\"shape\" is not an array");
        // The byte count starts from the element size so that one checked product covers both the
        // element count and the bytes ([2, 2^64-2] must fail here, not wrap to a small number).
        std::optional<uint64_t> expected_bytes = st_dtype_size(*dtype);
        std::vector<uint64_t> dims;
        for (const auto& d : *shape_it) {
            if (auto why = not_an_index(d); !why.empty()) bad(file, where + "shape dimension " + why);
            dims.push_back(as_index(d));
            if (expected_bytes) expected_bytes = checked_mul(*expected_bytes, dims.back());
        }
        if (!expected_bytes) bad(file, where + "shape " + quote(shape_it->dump()) + " overflows 64-bit size arithmetic");

        const auto offsets_it = entry.find("data_offsets");
        if (offsets_it == entry.end()) bad(file, where + "missing \"data_offsets\"");
        if (!offsets_it->is_array() || offsets_it->size() != 2)
            bad(file, where + "\"data_offsets\" must be an array [begin, end]");
        for (const auto& o : *offsets_it)
            if (auto why = not_an_index(o); !why.empty()) bad(file, where + "data offset " + why);
        const uint64_t begin = as_index((*offsets_it)[0]);
        const uint64_t end = as_index((*offsets_it)[1]);
        if (end < begin)
            bad(file, where + "data_offsets end " + std::to_string(end) + " is before begin " + std::to_string(begin));
        if (*expected_bytes != end - begin)
            bad(file, where + "shape " + quote(shape_it->dump()) + " of " + st_dtype_name(*dtype) + " needs " +
                          std::to_string(*expected_bytes) + " bytes but data_offsets span " +
                          std::to_string(end - begin));

        TensorView view;
        view.name = key;
        view.dtype = *dtype;
        view.nbytes = end - begin;
        view.file = file;
        for (uint64_t d : dims) {
            // Only a zero-element tensor can get here with such a dimension; int64 cannot hold it.
            if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
                bad(file, where + "shape dimension " + std::to_string(d) + " is too large");
            view.shape.push_back(static_cast<int64_t>(d));
        }
        auto [it, inserted] = tensors.emplace(key, std::move(view));
        if (!inserted) bad(file, "duplicate tensor name " + quote(key));  // the parser catches it first
        extents.push_back({begin, end, &it->first});
        // The data pointer waits until the layout below is proven.
    }

    // The data region must be tiled exactly: sorted by offset, each tensor starts where the previous
    // one ended. Zero-sized tensors (begin == end) sit between others without breaking the chain.
    std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) {
        return std::tie(a.begin, a.end, *a.name) < std::tie(b.begin, b.end, *b.name);
    });
    uint64_t cursor = 0;
    const std::string* previous = nullptr;
    for (const auto& e : extents) {
        if (e.begin != cursor) {
            if (previous == nullptr)
                bad(file, "tensor " + quote(*e.name) + " starts at " + std::to_string(e.begin) +
                              "; the first tensor must start at offset 0");
            bad(file, "tensor " + quote(*e.name) + " starts at " + std::to_string(e.begin) + " but tensor " +
                          quote(*previous) + " ends at " + std::to_string(cursor) +
                          (e.begin < cursor ? " (overlapping data)" : " (gap in the data)"));
        }
        cursor = e.end;
        previous = e.name;
    }

    const uint64_t data_bytes = size - *header_end;
    if (cursor < data_bytes)
        bad(file, std::to_string(data_bytes - cursor) + " trailing bytes after the last tensor (tensors end at " +
                      std::to_string(cursor) + ", data region is " + std::to_string(data_bytes) + " bytes)");
    if (cursor > data_bytes)
        bad(file, "tensor data runs past the end of the file (tensors end at " + std::to_string(cursor) +
                      ", data region is " + std::to_string(data_bytes) + " bytes); truncated file?");

    const uint8_t* base = data + *header_end;
    for (const auto& e : extents) tensors.at(*e.name).data = base + e.begin;

    if (out_tensors) *out_tensors = std::move(tensors);
    if (out_metadata) *out_metadata = std::move(metadata);
}

}  // namespace q3n
