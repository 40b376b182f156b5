#include "cuda/common.cuh"
#include "cuda/cuda_check.h"
#include "cuda/ops.h"

namespace q3n::cuda {
namespace {

__global__ void embed_bf16(const uint16_t* table, const int32_t* tokens, int h, float* out) {
    pdl_launch_dependents();
    pdl_wait();
    const int t = blockIdx.x;
    const uint16_t* row = table + static_cast<size_t>(tokens[t]) * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) out[static_cast<size_t>(t) * h + i] = bf16_bits_to_float(row[i]);
}

__global__ void embed_f32(const float* table, const int32_t* tokens, int h, float* out) {
    pdl_launch_dependents();
    pdl_wait();
    const int t = blockIdx.x;
    const float* row = table + static_cast<size_t>(tokens[t]) * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) out[static_cast<size_t>(t) * h + i] = row[i];
}

}  // namespace

void embed(const DeviceLinear& table, const int32_t* tokens, int count, float* out, cudaStream_t stream) {
    if (count == 0) return;
    if (table.type == WeightType::BF16)
        Q3N_CUDA(launch_pdl(embed_bf16, count, 256, 0, stream, static_cast<const uint16_t*>(table.data), tokens, table.in, out));
    else if (table.type == WeightType::F32)
        Q3N_CUDA(launch_pdl(embed_f32, count, 256, 0, stream, static_cast<const float*>(table.data), tokens, table.in, out));
    else
        fail(Q3N_ERR_UNSUPPORTED, "FP8 embedding tables are not supported on the GPU");
}

}  // namespace q3n::cuda
