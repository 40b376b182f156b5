// The tensor-core path of linear() for block-FP8 weights and decode-sized batches (linear_fp8_mma.cu).
#pragma once

#include "cuda/ops.h"

namespace q3n::cuda {

constexpr int kLinearFp8MmaMaxRows = 16;

// Whether linear_fp8_mma can take this weight (K a multiple of 16, 16-byte aligned weight and
// activation rows).
bool linear_fp8_mma_applicable(const DeviceLinear& w, const void* quantized);

// linear() for FP8 weights from quantize_fp8's output, identical contract; built for rows <= 16
// (more run as several launches of 16, each row summed in the same order whatever the call size).
// Persistent blocks where linear_fp8_mma_launch takes them, unless Q3N_GEMV_PERSISTENT=0, with
// weight rings Q3N_GEMV_STAGES deep (both read once): the same results bit for bit.
void linear_fp8_mma(const float* quantized, const float* act_scales, int rows, const DeviceLinear& w, float* y, int ldy,
                    cudaStream_t stream);
// linear_fp8_mma with the launch chosen by the caller (tests, benchmarks) rather than by
// Q3N_GEMV_PERSISTENT and Q3N_GEMV_STAGES: blocks < 0, one block per 16-row tile; otherwise
// persistent blocks, at most `blocks` of them (0: as many as the device holds at once).
// - Each warp's next weights wait in registers where the staged activations fit in the default
//   48 KB beside the partial rows.
// - Calls of up to 8 rows that do not fit so (or every call of up to 8 rows, with ring_everywhere)
//   keep each warp's next weights in flight through a shared-memory ring of up to `stages` groups,
//   the deepest that fits (stages 0: never); where none fits, in registers again, with the opt-in
//   shared memory.
// - The rest run one block per tile.
// Every launch gives the same results bit for bit. Returns what ran, the least over the call's
// launches of 16 rows: -1 one block per tile, 0 persistent with registers, S > 0 persistent with an
// S-deep ring.
int linear_fp8_mma_launch(const float* quantized, const float* act_scales, int rows, const DeviceLinear& w, float* y,
                          int ldy, int blocks, int stages, bool ring_everywhere, cudaStream_t stream);

}  // namespace q3n::cuda
