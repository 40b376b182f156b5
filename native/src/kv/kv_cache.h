// The paged KV cache: fixed-size blocks from one pool, handed to sequences through block tables,
// so sequences of any length share memory without fragmentation and a freed sequence's blocks are
// reused at once. Storage is reserved up front but committed by the OS only when first written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu/ops.h"

namespace q3n {

struct KvCacheShape {
    size_t num_layers = 0;
    size_t kv_heads = 0;
    size_t head_dim = 0;
    size_t block_size = 16;
    size_t num_blocks = 0;
    KvDtype dtype = KvDtype::F32;
};

class KvCache {
public:
    // Throws Q3N_ERR_OUT_OF_MEMORY when the address space cannot be reserved. Without host storage
    // the cache only hands out block numbers: a device backend keeps the K/V memory itself.
    explicit KvCache(const KvCacheShape& shape, bool host_storage = true);
    ~KvCache();
    KvCache(const KvCache&) = delete;
    KvCache& operator=(const KvCache&) = delete;

    const KvCacheShape& shape() const { return shape_; }
    size_t free_blocks() const { return free_.size(); }
    size_t bytes_reserved() const { return 2 * layer_bytes_ * shape_.num_layers; }

    // Appends `count` blocks to `table`, all or none; returns false (table unchanged) when the pool
    // has fewer free blocks.
    bool allocate(size_t count, std::vector<int32_t>& table);
    // Returns the blocks of table[keep..] to the pool and shrinks the table to `keep` entries.
    void release(std::vector<int32_t>& table, size_t keep = 0);

    // Host storage only.
    cpu::PagedKvLayer layer(size_t index) const;
    size_t layer_bytes() const { return layer_bytes_; }

private:
    KvCacheShape shape_;
    size_t layer_bytes_ = 0;
    uint8_t* k_ = nullptr;
    uint8_t* v_ = nullptr;
    size_t mapped_bytes_ = 0;
    std::vector<int32_t> free_;  // a stack: the most recently freed block is reused first
};

}  // namespace q3n
