#include "io/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/mapped_file.h"

namespace q3n {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";
// Real indexes are a few megabytes at most; the bound keeps a hostile one from costing gigabytes.
constexpr uint64_t kMaxIndexBytes = 100'000'000;
constexpr int kMaxJsonDepth = 64;

[[noreturn]] void bad_index(const std::string& index, const std::string& message) {
    fail(Q3N_ERR_BAD_CHECKPOINT, "bad checkpoint index '" + index + "': " + message);
}

std::string quote(const std::string& s) {
    std::string out = "'";
    for (char ch : s.substr(0, 200)) {
        const auto c = static_cast<unsigned char>(ch);
        out += (c < 0x20 || c == 0x7F) ? '?' : ch;
    }
    if (s.size() > 200) out += "...";
    return out + "'";
}

// Parses the index, rejecting duplicate keys: a weight_map that names one tensor twice is ambiguous,
// and nlohmann would silently keep only one of the entries.
json parse_index(const std::string& path) {
    MappedFile file(path);
    if (file.size() > kMaxIndexBytes)
        bad_index(path, "file is " + std::to_string(file.size()) + " bytes, over the " +
                            std::to_string(kMaxIndexBytes) + "-byte limit");
    std::vector<std::unordered_set<std::string>> keys;
    int depth = 0;
    auto callback = [&](int, json::parse_event_t event, json& parsed) -> bool {
        switch (event) {
            case json::parse_event_t::object_start:
            case json::parse_event_t::array_start:
                if (++depth > kMaxJsonDepth) bad_index(path, "JSON nests too deeply");
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
                if (!keys.empty() && !keys.back().insert(key).second) bad_index(path, "duplicate key " + quote(key));
                break;
            }
            case json::parse_event_t::value:
                break;
        }
        return true;
    };
    const char* begin = reinterpret_cast<const char*>(file.data());
    // nlohmann treats a NUL as the end of the text; JSON never contains one, so anything after it
    // would be silently ignored.
    if (file.size() > 0 && std::memchr(begin, 0, file.size()) != nullptr) bad_index(path, "not valid JSON (contains a NUL byte)");
    try {
        // nlohmann validates UTF-8 inside strings; an empty file is a parse error like any other.
        return json::parse(begin, begin + file.size(), callback, /*allow_exceptions=*/true);
    } catch (const json::exception& e) {
        bad_index(path, "not valid JSON (" + std::string(e.what()).substr(0, 200) + ")");
    }
}

// A shard name must stay inside the checkpoint directory: one plain file name, nothing that a path
// join could turn into a parent, root or sibling directory.
bool is_plain_file_name(const std::string& name) {
    if (name.empty() || name == "." || name == "..") return false;
    for (char c : name)
        if (c == '/' || c == '\\' || c == '\0') return false;
    return true;
}

}  // namespace

std::unique_ptr<Checkpoint> Checkpoint::open(const std::string& directory) {
    auto ckpt = std::unique_ptr<Checkpoint>(new Checkpoint());
    const fs::path dir(directory);
    const fs::path index_path = dir / kIndexName;
    const fs::path single_path = dir / kSingleName;
    std::error_code ec;

    if (fs::exists(index_path, ec)) {
        const std::string index = index_path.string();
        const json root = parse_index(index);
        if (!root.is_object()) bad_index(index, std::string("top level is a JSON ") + root.type_name() + ", not an object");
        if (auto m = root.find("metadata"); m != root.end() && !m->is_object() && !m->is_null())
            bad_index(index, "\"metadata\" must be an object");
        const auto wm = root.find("weight_map");
        if (wm == root.end()) bad_index(index, "missing \"weight_map\"");
        if (!wm->is_object()) bad_index(index, "\"weight_map\" is not an object");
        if (wm->empty()) bad_index(index, "\"weight_map\" is empty");

        // Check every name before any file is opened, so a hostile index never makes us touch a
        // path outside the directory.
        std::map<std::string, std::vector<std::string>> shard_tensors;  // shard -> tensors it must hold
        for (const auto& [tensor, shard] : wm->items()) {
            if (!shard.is_string()) bad_index(index, "weight_map entry for tensor " + quote(tensor) + " is not a string");
            const auto& name = shard.get_ref<const std::string&>();
            if (!is_plain_file_name(name))
                bad_index(index, "tensor " + quote(tensor) + " maps to " + quote(name) +
                                     ", which is not a plain file name inside the checkpoint directory");
            shard_tensors[name].push_back(tensor);
        }

        for (const auto& [shard, expected] : shard_tensors) {
            const fs::path shard_path = dir / shard;
            if (!fs::exists(shard_path, ec))
                bad_index(index, "shard " + quote(shard) + " (named for tensor " + quote(expected.front()) +
                                     ") does not exist in '" + directory + "'");
            auto file = SafetensorsFile::open(shard_path.string());
            for (const auto& tensor : expected)
                if (file->tensors().count(tensor) == 0)
                    bad_index(index, "tensor " + quote(tensor) + " is mapped to shard " + quote(shard) +
                                         ", which does not contain it");
            ckpt->files_.push_back(std::move(file));
        }
    } else if (fs::exists(single_path, ec)) {
        ckpt->files_.push_back(SafetensorsFile::open(single_path.string()));
    } else {
        fail(Q3N_ERR_IO, "no model.safetensors or model.safetensors.index.json in " + directory);
    }

    // Tensors a shard holds beyond what the index lists are kept (the index is a lookup aid, the
    // shards are the truth), but one name in two files is ambiguous and refused.
    for (const auto& file : ckpt->files_) {
        for (const auto& [name, view] : file->tensors()) {
            auto [it, inserted] = ckpt->tensors_.emplace(name, view);
            if (!inserted)
                fail(Q3N_ERR_BAD_CHECKPOINT, "tensor " + quote(name) + " appears in both '" + it->second.file +
                                                 "' and '" + view.file + "'");
        }
    }
    return ckpt;
}

const TensorView& Checkpoint::get(const std::string& name) const {
    if (const TensorView* view = find(name)) return *view;
    std::string where;
    if (!files_.empty()) where = " (checkpoint " + fs::path(files_.front()->path()).parent_path().string() + ")";
    fail(Q3N_ERR_BAD_CHECKPOINT, "missing tensor " + name + where);
}

const TensorView* Checkpoint::find(const std::string& name) const {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
}

}  // namespace q3n
