// The safetensors format, validated by every rule of huggingface/safetensors before any tensor
// is used (shared/RELIABILITY.md): header length bounds, UTF-8 JSON, known dtypes, sorted and
// contiguous data_offsets, checked shape products, no trailing bytes, no duplicate names.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/mapped_file.h"

namespace q3n {

enum class StDtype { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, F8_E4M3, F8_E5M2 };

// Bytes per element.
size_t st_dtype_size(StDtype dtype);
// The header's spelling: "BF16", "F8_E4M3", ...
const char* st_dtype_name(StDtype dtype);

struct TensorView {
    std::string name;
    StDtype dtype;
    std::vector<int64_t> shape;
    const uint8_t* data = nullptr;  // inside the mapping; valid while the owning file lives
    uint64_t nbytes = 0;
    std::string file;               // path of the file that holds it, for messages

    uint64_t numel() const;
};

class SafetensorsFile {
public:
    // Maps and validates `path`. Throws q3n::Error(Q3N_ERR_BAD_CHECKPOINT) naming the file and the
    // broken rule, or Q3N_ERR_IO when it cannot be read.
    static std::shared_ptr<SafetensorsFile> open(const std::string& path);
    // Validates an in-memory image (the same rules; used by open and by the tests).
    static void validate(const uint8_t* data, uint64_t size, const std::string& name_for_errors,
                         std::map<std::string, TensorView>* out_tensors,
                         std::map<std::string, std::string>* out_metadata);

    const std::map<std::string, TensorView>& tensors() const { return tensors_; }
    const std::map<std::string, std::string>& metadata() const { return metadata_; }
    const std::string& path() const { return file_->path(); }

private:
    std::unique_ptr<MappedFile> file_;
    std::map<std::string, TensorView> tensors_;
    std::map<std::string, std::string> metadata_;
};

}  // namespace q3n
