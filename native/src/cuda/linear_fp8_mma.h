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
void linear_fp8_mma(const float* quantized, const float* act_scales, int rows, const DeviceLinear& w, float* y, int ldy,
                    cudaStream_t stream);

}  // namespace q3n::cuda
