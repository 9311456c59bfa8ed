// Per-element math of the fused NF4 linear kernels, shared by the CPU (C++) and CUDA kernels.
//
// The NF4 residual W [rows, cols] is stored flat and row-major (ARCHITECTURE.md, notation): element (row, col)
// is flat index row * cols + col, its quantization block is that index / blocksize. Blocks may
// straddle rows when cols is not a multiple of blocksize, and a row may start in the low nibble
// of a byte when cols is odd; the vectorised paths need neither to happen (nf4_rows_aligned).
#pragma once

#include <cstdint>

#include "lowrank_kernels/nf4_math.h"

namespace lowrank_kernels {

// Dispatch by token count M (reported by build_info): up to these many tokens the fused linear
// runs its decode kernel (CPU: register-blocked GEMV; CUDA: warp-per-row GEMV), above them the
// GEMM kernel (CPU: dequantized panels + BLAS; CUDA: Triton).
constexpr int64_t kCpuDecodeMaxTokens = 16;
constexpr int64_t kCudaGemvMaxTokens = 8;

LK_HOST_DEVICE float nf4_weight(const uint8_t* packed, const float* absmax, int64_t row, int64_t col, int64_t cols,
                                int64_t blocksize) {
  const int64_t i = row * cols + col;
  return nf4_decode(nf4_nibble(packed, i), absmax[i / blocksize]);
}

// Every row starts a quantization block (so also a byte): rows decode independently, a block at a time.
LK_HOST_DEVICE bool nf4_rows_aligned(int64_t cols, int64_t blocksize) { return cols % blocksize == 0; }

// Nibble of element j (0..7) of the 8 elements in a 32-bit word loaded (little-endian) from
// `packed` at an even element index: nf4_nibble's order (byte j / 2, high nibble first), for
// kernels that read packed a word at a time.
LK_HOST_DEVICE uint8_t nf4_word_nibble(uint32_t word, int j) {
  return static_cast<uint8_t>((word >> (8 * (j >> 1) + 4 * (1 - (j & 1)))) & 0xFu);
}

}  // namespace lowrank_kernels
