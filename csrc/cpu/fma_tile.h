// The register-blocked FMA micro-kernel of gram (gram_cpu.cpp) and skinny_matmul (skinny_cpu.cpp):
// a tile of 4 rows by C vectors of 8 fp32 accumulators,
//   out_i[8v : 8v + 8] (+)= Σ_t a_i(t) · b_v(t)       rows i = 0..3, vectors v < C, steps t,
// where a_i(t) is one float broadcast to the 8 lanes and b_v(t) 8 consecutive floats. Each output
// element is one FMA chain over t in increasing order, so the results do not depend on how a
// kernel cuts its work into tiles. Compiled once per ISA (isa.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace cpu {
inline namespace LK_CPU_ISA_NAME {  // each ISA's copy of these inline helpers has its own symbols

// The broadcast operand: a_i(t) = data[i * row_stride + t * step].
struct BroadcastRows {
  const float* data;
  int64_t row_stride, step;
};

// The vector operand: b_v(t) = data[v * vector_stride + t * step + (0 .. 8)].
struct VectorSteps {
  const float* data;
  int64_t vector_stride, step;
};

// The 4 accumulator rows, 8C floats each. Rows whose results the caller drops may all point at
// one scratch buffer.
struct TileRows {
  float* row[4];
};

// Rows of a row-major matrix with leading dimension ld, from row 0 at c.
inline TileRows tile_rows(float* c, int64_t ld) { return {{c, c + ld, c + 2 * ld, c + 3 * ld}}; }

#ifdef LK_HAVE_AVX2
// The accumulators of one tile row are named variables, not an array: GCC keeps an __m256 array
// on the stack and stores it back every step (measured: 2.5x slower).
template <int C>
inline void load_tile_row(const float* p, bool accumulate, __m256& r0, __m256& r1, __m256& r2) {
  if (!accumulate) return;  // the accumulators start at 0
  r0 = _mm256_loadu_ps(p);
  if constexpr (C > 1) r1 = _mm256_loadu_ps(p + 8);
  if constexpr (C > 2) r2 = _mm256_loadu_ps(p + 16);
}

template <int C>
inline void fma_tile_row(__m256 x, __m256 v0, __m256 v1, __m256 v2, __m256& r0, __m256& r1, __m256& r2) {
  r0 = _mm256_fmadd_ps(x, v0, r0);
  if constexpr (C > 1) r1 = _mm256_fmadd_ps(x, v1, r1);
  if constexpr (C > 2) r2 = _mm256_fmadd_ps(x, v2, r2);
}

template <int C>
inline void store_tile_row(float* p, __m256 r0, __m256 r1, __m256 r2) {
  _mm256_storeu_ps(p, r0);
  if constexpr (C > 1) _mm256_storeu_ps(p + 8, r1);
  if constexpr (C > 2) _mm256_storeu_ps(p + 16, r2);
}
#endif

// The tile over `steps` steps: out rows += (accumulate) or = the sums above. 4 x 3 is the fastest
// shape on AVX2 (12 FMAs per 4 broadcasts and 3 loads: ~80% of the FMA peak on packed operands,
// 12 accumulators + 3 operands + 1 broadcast fill the 16 registers); 4 x 1 and 4 x 2 serve the
// edges. The scalar build computes the same FMA chains with std::fma, so its bits are the same.
template <int C>
inline void fma_tile_4x(BroadcastRows a, VectorSteps b, int64_t steps, TileRows out, bool accumulate) {
  static_assert(C >= 1 && C <= 3, "4 x C tiles of 1 to 3 vectors: their accumulators fit the registers");
#ifdef LK_HAVE_AVX2
  __m256 c00, c01, c02, c10, c11, c12, c20, c21, c22, c30, c31, c32;
  c00 = c01 = c02 = c10 = c11 = c12 = c20 = c21 = c22 = c30 = c31 = c32 = _mm256_setzero_ps();
  load_tile_row<C>(out.row[0], accumulate, c00, c01, c02);
  load_tile_row<C>(out.row[1], accumulate, c10, c11, c12);
  load_tile_row<C>(out.row[2], accumulate, c20, c21, c22);
  load_tile_row<C>(out.row[3], accumulate, c30, c31, c32);
  for (int64_t t = 0; t < steps; ++t) {
    const float* bt = b.data + t * b.step;
    const __m256 v0 = _mm256_loadu_ps(bt);
    const __m256 v1 = C > 1 ? _mm256_loadu_ps(bt + b.vector_stride) : v0;  // (unused below when C = 1)
    const __m256 v2 = C > 2 ? _mm256_loadu_ps(bt + 2 * b.vector_stride) : v0;
    const float* at = a.data + t * a.step;
    fma_tile_row<C>(_mm256_broadcast_ss(at), v0, v1, v2, c00, c01, c02);
    fma_tile_row<C>(_mm256_broadcast_ss(at + a.row_stride), v0, v1, v2, c10, c11, c12);
    fma_tile_row<C>(_mm256_broadcast_ss(at + 2 * a.row_stride), v0, v1, v2, c20, c21, c22);
    fma_tile_row<C>(_mm256_broadcast_ss(at + 3 * a.row_stride), v0, v1, v2, c30, c31, c32);
  }
  store_tile_row<C>(out.row[0], c00, c01, c02);
  store_tile_row<C>(out.row[1], c10, c11, c12);
  store_tile_row<C>(out.row[2], c20, c21, c22);
  store_tile_row<C>(out.row[3], c30, c31, c32);
#else
  for (int i = 0; i < 4; ++i) {
    float acc[8 * C];
    for (int c = 0; c < 8 * C; ++c) acc[c] = accumulate ? out.row[i][c] : 0.0f;
    for (int64_t t = 0; t < steps; ++t) {
      const float x = a.data[i * a.row_stride + t * a.step];
      for (int v = 0; v < C; ++v)
        for (int j = 0; j < 8; ++j)
          acc[8 * v + j] = std::fma(x, b.data[v * b.vector_stride + t * b.step + j], acc[8 * v + j]);
    }
    for (int c = 0; c < 8 * C; ++c) out.row[i][c] = acc[c];
  }
#endif
}

}  // namespace LK_CPU_ISA_NAME
}  // namespace cpu
}  // namespace lowrank_kernels
