// The Huber element math of huber_math.h for the CPU kernels (huber_cpu.cpp, huber_normal_cpu.cpp):
// the per-matrix deltas, and the same formulas on 8 AVX2 lanes. Compiled once per ISA (isa.h).
#pragma once

#include "lowrank_kernels/huber_math.h"
#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace cpu {
inline namespace LK_CPU_ISA_NAME {

// δ of the IRLS weights ω, ψ and δ of the reported loss (they differ during δ continuation).
struct HuberDeltas {
  float weight;
  float loss;
};

#ifdef LK_HAVE_AVX2
struct HuberLanes {
  __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f);
  __m256 weight_delta, neg_weight_delta, loss_delta, half_loss_delta;

  explicit HuberLanes(HuberDeltas delta)
      : weight_delta(_mm256_set1_ps(delta.weight)),
        neg_weight_delta(_mm256_set1_ps(-delta.weight)),
        loss_delta(_mm256_set1_ps(delta.loss)),
        half_loss_delta(_mm256_set1_ps(0.5f * delta.loss)) {}

  __m256 magnitude(__m256 e) const { return _mm256_andnot_ps(sign, e); }
  // ω = δ / max(|e|, δ)
  __m256 weight(__m256 mag) const { return _mm256_div_ps(weight_delta, _mm256_max_ps(mag, weight_delta)); }
  // ψ = clamp(e, −δ, δ)
  __m256 psi(__m256 e) const { return _mm256_min_ps(_mm256_max_ps(e, neg_weight_delta), weight_delta); }
  // ρ(e) = e²/2 inside δ, δ (|e| − δ/2) beyond (at the loss δ)
  __m256 loss(__m256 e, __m256 mag) const {
    const __m256 quadratic = _mm256_mul_ps(half, _mm256_mul_ps(e, e));
    const __m256 linear = _mm256_mul_ps(loss_delta, _mm256_sub_ps(mag, half_loss_delta));
    return _mm256_blendv_ps(linear, quadratic, _mm256_cmp_ps(mag, loss_delta, _CMP_LE_OQ));
  }
};
#endif

}  // namespace LK_CPU_ISA_NAME
}  // namespace cpu
}  // namespace lowrank_kernels
