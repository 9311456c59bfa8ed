// Launchers of the NF4 CUDA kernels. Plain pointers and a stream only: the .cu file includes
// no torch headers, which keeps nvcc's compile time small (see nf4_cuda_ops.cpp for the ops).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "float_kind.h"

namespace lowrank_kernels::cuda {

void quantize_nf4(const void* x, FloatKind kind, int64_t numel, int64_t blocksize, uint8_t* packed, float* absmax,
                  cudaStream_t stream);
void dequantize_nf4(const uint8_t* packed, const float* absmax, int64_t numel, int64_t blocksize, void* out,
                    FloatKind kind, cudaStream_t stream);
void quantize_blockwise8(const float* x, int64_t numel, const float* code, int64_t blocksize, uint8_t* q, float* absmax,
                         cudaStream_t stream);
void dequantize_blockwise8(const uint8_t* q, const float* absmax, const float* code, int64_t numel, int64_t blocksize,
                           float* out, cudaStream_t stream);

}  // namespace lowrank_kernels::cuda
