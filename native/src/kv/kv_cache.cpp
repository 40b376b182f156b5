#include "kv/kv_cache.h"

#include <sys/mman.h>

#include "core/checked_math.h"
#include "core/error.h"

namespace q3n {

KvCache::KvCache(const KvCacheShape& shape, bool host_storage) : shape_(shape) {
    const size_t elem = shape.dtype == KvDtype::F32 ? 4 : 2;
    auto bytes = checked_mul(shape.num_blocks, shape.block_size);
    if (bytes) bytes = checked_mul(*bytes, shape.kv_heads * shape.head_dim * elem);
    auto total = bytes ? checked_mul(*bytes, 2 * shape.num_layers) : std::nullopt;
    if (!total || shape.num_blocks > INT32_MAX)
        fail(Q3N_ERR_OUT_OF_MEMORY, "KV cache size overflows");
    layer_bytes_ = *bytes;
    mapped_bytes_ = host_storage ? *total : 0;
    if (mapped_bytes_ > 0) {
        // An anonymous mapping is committed page by page as the cache fills, so a large capacity
        // costs memory only for the tokens actually cached.
        void* p = mmap(nullptr, mapped_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            fail(Q3N_ERR_OUT_OF_MEMORY, "cannot reserve " + std::to_string(mapped_bytes_ >> 20) + " MiB for the KV cache");
        k_ = static_cast<uint8_t*>(p);
        v_ = k_ + layer_bytes_ * shape.num_layers;
    }
    free_.reserve(shape.num_blocks);
    for (size_t b = shape.num_blocks; b-- > 0;) free_.push_back(static_cast<int32_t>(b));
}

KvCache::~KvCache() {
    if (k_) munmap(k_, mapped_bytes_);
}

bool KvCache::allocate(size_t count, std::vector<int32_t>& table) {
    if (count > free_.size()) return false;
    for (size_t i = 0; i < count; ++i) {
        table.push_back(free_.back());
        free_.pop_back();
    }
    return true;
}

void KvCache::release(std::vector<int32_t>& table, size_t keep) {
    while (table.size() > keep) {
        free_.push_back(table.back());
        table.pop_back();
    }
}

cpu::PagedKvLayer KvCache::layer(size_t index) const {
    if (!k_) fail(Q3N_ERR_INTERNAL, "the KV cache has no host storage");
    return cpu::PagedKvLayer{shape_.dtype, k_ + index * layer_bytes_, v_ + index * layer_bytes_,
                             shape_.block_size, shape_.kv_heads, shape_.head_dim};
}

}  // namespace q3n
