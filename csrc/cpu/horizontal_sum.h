// Horizontal sums of the 8 fp32 lanes of an AVX2 vector, in fp32 or fp64, for the CPU kernels'
// reductions (norms, huber). Compiled once per ISA (isa.h).
#pragma once

#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace cpu {
inline namespace LK_CPU_ISA_NAME {  // each ISA's copy of these inline helpers has its own symbols

#ifdef LK_HAVE_AVX2
// The 8 lanes' sum in fp32: halves, then pairs, then the last two lanes.
inline float horizontal_sum(__m256 v) {
  const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

// The 8 lanes' sum, added in fp64.
inline double sum_as_double(__m256 v) {
  const __m256d wide =
      _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(wide), _mm256_extractf128_pd(wide, 1));
  return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
}
#endif

}  // namespace LK_CPU_ISA_NAME
}  // namespace cpu
}  // namespace lowrank_kernels
