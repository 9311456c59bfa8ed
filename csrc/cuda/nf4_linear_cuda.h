// Launchers of the fused NF4 linear CUDA kernels. Plain pointers and a stream only: the .cu file
// includes no torch headers (see nf4_linear_cuda_ops.cpp for the ops).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "float_kind.h"

namespace lowrank_kernels::cuda {

// Few-token (decode) GEMV with the low-rank term fused in:
//   y = x @ W^T + scale * lowrank_x @ up^T (+ bias),   accumulated in fp32, rounded once to `kind`.
//   x [tokens, cols], lowrank_x [tokens, rank], up [rows, rank], bias [rows] or nullptr,
//   y [tokens, rows]: all contiguous, all of dtype `kind`.
//   W [rows, cols] is NF4, flat row-major: packed [(rows * cols + 1) / 2] uint8, absmax
//   [ceil(rows * cols / blocksize)] fp32; blocksize a power of two in [32, 4096].
// Any sizes work (tokens, rows, cols and rank may be 0). The vectorised path needs cols % 32 == 0
// and 16-byte aligned packed and x; other inputs take a per-element path.
void nf4_lowrank_gemv(const void* x, FloatKind kind, const uint8_t* packed, const float* absmax, int64_t blocksize,
                      int64_t tokens, int64_t rows, int64_t cols, const void* lowrank_x, const void* up, int64_t rank,
                      float scale, const void* bias, void* y, cudaStream_t stream);

}  // namespace lowrank_kernels::cuda
