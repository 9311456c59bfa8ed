// Per-element Huber math shared by the CPU (C++) kernel and, as the formula the Triton kernel
// mirrors, the GPU path of `huber_weights`. For a residual e = (A B)_ij − W_ij and δ > 0:
//   loss   ρ(e) = e²/2 if |e| <= δ, else δ (|e| − δ/2)
//   psi    ρ'(e) = clamp(e, −δ, δ)                      (the gradient of the loss in e)
//   weight ω(e) = ρ'(e) / e = min(1, δ / |e|)          (the IRLS weight; 1 at e = 0)
// ω is what makes IRLS a majorize-minimize method: ρ(e) <= ρ(e0) + ψ(e0)(e − e0) + ω(e0)(e − e0)²/2
// for every e, so a weighted least-squares step never increases the Huber loss.
#pragma once

#include <cmath>

#include "lowrank_kernels/nf4_math.h"  // LK_HOST_DEVICE

namespace lowrank_kernels {

LK_HOST_DEVICE float huber_loss(float e, float delta) {
  const float a = fabsf(e);
  return a <= delta ? 0.5f * e * e : delta * (a - 0.5f * delta);
}

LK_HOST_DEVICE float huber_psi(float e, float delta) { return fminf(fmaxf(e, -delta), delta); }

// delta / max(|e|, delta) is exactly 1 for |e| <= delta, and never divides by zero.
LK_HOST_DEVICE float huber_weight(float e, float delta) { return delta / fmaxf(fabsf(e), delta); }

}  // namespace lowrank_kernels
