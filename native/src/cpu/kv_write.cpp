#include <cstring>

#include "core/numeric.h"
#include "cpu/ops.h"

namespace q3n::cpu {

void kv_write(const PagedKvLayer& kv, const float* k, const float* v, const TokenSlot* slots, size_t tokens) {
    const size_t row = kv.kv_heads * kv.head_dim;
    for (size_t t = 0; t < tokens; ++t) {
        const size_t pos = static_cast<size_t>(slots[t].position);
        const size_t block = static_cast<size_t>(slots[t].block_table[pos / kv.block_size]);
        const size_t offset = (block * kv.block_size + pos % kv.block_size) * row;
        if (kv.dtype == KvDtype::F32) {
            std::memcpy(static_cast<float*>(kv.k) + offset, k + t * row, row * sizeof(float));
            std::memcpy(static_cast<float*>(kv.v) + offset, v + t * row, row * sizeof(float));
        } else {
            uint16_t* kd = static_cast<uint16_t*>(kv.k) + offset;
            uint16_t* vd = static_cast<uint16_t*>(kv.v) + offset;
            for (size_t i = 0; i < row; ++i) {
                kd[i] = float_to_bf16(k[t * row + i]);
                vd[i] = float_to_bf16(v[t * row + i]);
            }
        }
    }
}

}  // namespace q3n::cpu
