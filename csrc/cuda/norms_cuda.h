// Launcher of the row_col_sq_norms CUDA kernels. Plain pointers and a stream only: the .cu file
// includes no torch headers (see norms_cuda_ops.cpp for the op).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "float_kind.h"

namespace lowrank_kernels::cuda {

// Each thread block of the norm kernel reads a tile of W of kNormRowsPerBlock rows by
// kNormColsPerBlock columns.
constexpr int64_t kNormRowsPerBlock = 32;
constexpr int64_t kNormColsPerBlock = 1024;

inline int64_t norm_row_blocks(int64_t m) { return (m + kNormRowsPerBlock - 1) / kNormRowsPerBlock; }
inline int64_t norm_col_blocks(int64_t n) { return (n + kNormColsPerBlock - 1) / kNormColsPerBlock; }

// Squared norms of the `batch` matrices W [batch, m, n] (contiguous, dtype `kind`, m, n >= 1):
//   rows [batch, m] = sum_j W_ij^2,   cols [batch, n] = sum_i W_ij^2   (fp32, deterministic).
// Scratch, fp32: row_partial [batch, norm_col_blocks(n), m], needed only when
// norm_col_blocks(n) > 1, and col_partial [batch, norm_row_blocks(m), n], needed only when
// norm_row_blocks(m) > 1 (pass nullptr otherwise).
void row_col_sq_norms(const void* w, FloatKind kind, int64_t batch, int64_t m, int64_t n, float* row_partial,
                      float* col_partial, float* rows, float* cols, cudaStream_t stream);

}  // namespace lowrank_kernels::cuda
