#include "io/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "core/error.h"

namespace q3n {

namespace {

[[noreturn]] void fail_io(const std::string& what, const std::string& path, int err) {
    fail(Q3N_ERR_IO, what + " '" + path + "': " + std::strerror(err));
}

// Closes the descriptor on every path out of the constructor; the mapping outlives it.
struct FdGuard {
    int fd;
    ~FdGuard() {
        if (fd >= 0) ::close(fd);
    }
};

}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
    int fd;
    do {
        fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) fail_io("cannot open", path, errno);
    FdGuard guard{fd};

    struct stat st {};
    if (::fstat(fd, &st) != 0) fail_io("cannot stat", path, errno);
    // A directory, FIFO or device has no meaningful size to map (and /dev/zero would map "forever").
    if (!S_ISREG(st.st_mode)) fail(Q3N_ERR_IO, "cannot map '" + path + "': not a regular file");
    if (st.st_size < 0 || static_cast<uint64_t>(st.st_size) > std::numeric_limits<size_t>::max())
        fail(Q3N_ERR_IO, "cannot map '" + path + "': file size out of range");

    size_ = static_cast<uint64_t>(st.st_size);
    // mmap rejects a zero length; an empty file is still a file, so it maps to nothing and the
    // format layer reports what is wrong with it.
    if (size_ == 0) return;

    void* p = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) fail_io("cannot map", path, errno);
    data_ = static_cast<const uint8_t*>(p);
}

MappedFile::~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), static_cast<size_t>(size_));
}

}  // namespace q3n
