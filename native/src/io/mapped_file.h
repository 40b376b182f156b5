// A read-only memory map of a whole file. Weights stay in the page cache and are shared between
// processes; nothing is copied at load.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace q3n {

class MappedFile {
public:
    // Throws q3n::Error(Q3N_ERR_IO) naming the path when the file cannot be opened or mapped.
    explicit MappedFile(const std::string& path);
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;

    const uint8_t* data() const { return data_; }
    uint64_t size() const { return size_; }
    const std::string& path() const { return path_; }

private:
    std::string path_;
    const uint8_t* data_ = nullptr;
    uint64_t size_ = 0;
};

}  // namespace q3n
