// C++ CPU kernel of spd_solve: x = (G + λ I)⁻¹ g for a batch of small symmetric positive
// semi-definite G [..., r, r] and right-hand sides g [..., r] (fp32 in and out, fp64 inside).
// Robust PiSSA's IRLS solves one r×r weighted normal equation per row of W (thousands of tiny
// systems per sweep): LAPACK's batched Cholesky pays a per-matrix call overhead larger than the
// r³/3 flops, so each system is factored here in registers/L1, one task per chunk of systems.
//
// λ = 0 unless Cholesky meets a pivot <= 0 (G singular to working precision, e.g. a rank-deficient
// factor): then λ = 1e-12 · mean(diag G), multiplied by 1e4 until the factorization succeeds.
// A ridge keeps the IRLS step a descent step (Levenberg–Marquardt), so the loss still cannot rise.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "lowrank_kernels/checks.h"

namespace lowrank_kernels {
namespace {

constexpr int64_t kSystemsPerTask = 64;

// In-place Cholesky of the lower triangle of L [r, r] (row-major) after adding `ridge` to its
// diagonal; false if a pivot is not positive.
bool cholesky(double* L, int64_t r, double ridge) {
  for (int64_t j = 0; j < r; ++j) {
    double pivot = L[j * r + j] + ridge;
    for (int64_t k = 0; k < j; ++k) pivot -= L[j * r + k] * L[j * r + k];
    if (!(pivot > 0)) return false;
    const double root = std::sqrt(pivot);
    L[j * r + j] = root;
    for (int64_t i = j + 1; i < r; ++i) {
      double v = L[i * r + j];
      for (int64_t k = 0; k < j; ++k) v -= L[i * r + k] * L[j * r + k];
      L[i * r + j] = v / root;
    }
  }
  return true;
}

// x = (L Lᵀ)⁻¹ b by forward and back substitution, in place in b.
void cholesky_solve(const double* L, int64_t r, double* b) {
  for (int64_t i = 0; i < r; ++i) {
    double v = b[i];
    for (int64_t k = 0; k < i; ++k) v -= L[i * r + k] * b[k];
    b[i] = v / L[i * r + i];
  }
  for (int64_t i = r - 1; i >= 0; --i) {
    double v = b[i];
    for (int64_t k = i + 1; k < r; ++k) v -= L[k * r + i] * b[k];
    b[i] = v / L[i * r + i];
  }
}

void solve_one(const float* gram, const float* rhs, int64_t r, double* L, double* b, float* x) {
  double mean_diagonal = 0;
  for (int64_t i = 0; i < r; ++i) mean_diagonal += gram[i * r + i];
  mean_diagonal = std::max(mean_diagonal / r, 1e-300);
  for (double ridge = 0;; ridge = ridge == 0 ? 1e-12 * mean_diagonal : ridge * 1e4) {
    for (int64_t i = 0; i < r * r; ++i) L[i] = gram[i];
    if (cholesky(L, r, ridge) || ridge >= mean_diagonal) break;
  }
  for (int64_t i = 0; i < r; ++i) b[i] = rhs[i];
  cholesky_solve(L, r, b);
  for (int64_t i = 0; i < r; ++i) x[i] = static_cast<float>(b[i]);
}

at::Tensor spd_solve_cpu(const at::Tensor& gram, const at::Tensor& rhs) {
  check_spd_solve_args(gram, rhs);
  const at::Tensor g = gram.contiguous(), b = rhs.contiguous();
  at::Tensor x = at::empty(rhs.sizes(), rhs.options());
  const int64_t r = rhs.size(-1), systems = r == 0 ? 0 : rhs.numel() / r;
  const float *gp = g.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* xp = x.data_ptr<float>();
  at::parallel_for(0, systems, kSystemsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<double> L(r * r), work(r);
    for (int64_t s = begin; s < end; ++s) solve_one(gp + s * r * r, bp + s * r, r, L.data(), work.data(), xp + s * r);
  });
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) { m.impl("spd_solve", &spd_solve_cpu); }

}  // namespace lowrank_kernels
