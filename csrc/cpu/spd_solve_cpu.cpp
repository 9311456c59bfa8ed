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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lowrank_kernels/checks.h"
#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace {

constexpr int64_t kSystemsPerTask = 64;
// Systems factored side by side, one per lane: each step of a small Cholesky is one vector
// instruction for kLanes systems (the loops over lanes compile to AVX2 fp64 vectors). Lanes are
// independent and run the one-system arithmetic, so a system's result does not depend on the
// group it falls in.
constexpr int kLanes = 4;

template <int N>
struct Lanes {
  double v[N];
};

// In-place Cholesky of the lower triangles of L [r, r] (row-major, N systems) after adding
// `ridge` to the diagonal; ok[lane] is false where a pivot was not positive (that lane's L is
// then garbage).
template <int N>
void cholesky(Lanes<N>* L, int64_t r, double ridge, bool* ok) {
  for (int l = 0; l < N; ++l) ok[l] = true;
  for (int64_t j = 0; j < r; ++j) {
    Lanes<N> root = L[j * r + j];
    for (int l = 0; l < N; ++l) root.v[l] += ridge;
    for (int64_t k = 0; k < j; ++k)
      for (int l = 0; l < N; ++l) root.v[l] -= L[j * r + k].v[l] * L[j * r + k].v[l];
    for (int l = 0; l < N; ++l) {
      ok[l] = ok[l] && root.v[l] > 0;
      root.v[l] = std::sqrt(root.v[l]);
    }
    L[j * r + j] = root;
    for (int64_t i = j + 1; i < r; ++i) {
      Lanes<N> v = L[i * r + j];
      for (int64_t k = 0; k < j; ++k)
        for (int l = 0; l < N; ++l) v.v[l] -= L[i * r + k].v[l] * L[j * r + k].v[l];
      for (int l = 0; l < N; ++l) L[i * r + j].v[l] = v.v[l] / root.v[l];
    }
  }
}

// x = (L Lᵀ)⁻¹ b by forward and back substitution, in place in b (N systems).
template <int N>
void cholesky_solve(const Lanes<N>* L, int64_t r, Lanes<N>* b) {
  for (int64_t i = 0; i < r; ++i) {
    Lanes<N> v = b[i];
    for (int64_t k = 0; k < i; ++k)
      for (int l = 0; l < N; ++l) v.v[l] -= L[i * r + k].v[l] * b[k].v[l];
    for (int l = 0; l < N; ++l) b[i].v[l] = v.v[l] / L[i * r + i].v[l];
  }
  for (int64_t i = r - 1; i >= 0; --i) {
    Lanes<N> v = b[i];
    for (int64_t k = i + 1; k < r; ++k)
      for (int l = 0; l < N; ++l) v.v[l] -= L[k * r + i].v[l] * b[k].v[l];
    for (int l = 0; l < N; ++l) b[i].v[l] = v.v[l] / L[i * r + i].v[l];
  }
}

struct Workspace {
  std::vector<Lanes<kLanes>> L, b;
  std::vector<Lanes<1>> L1, b1;
  explicit Workspace(int64_t r) : L(r * r), b(r), L1(r * r), b1(r) {}
};

// One system with the ridge search: the path of systems whose plain Cholesky failed.
void solve_with_ridge(const float* gram, const float* rhs, int64_t r, Workspace& ws, float* x) {
  double mean_diagonal = 0;
  for (int64_t i = 0; i < r; ++i) mean_diagonal += gram[i * r + i];
  mean_diagonal = std::max(mean_diagonal / r, 1e-300);
  for (double ridge = 1e-12 * mean_diagonal;; ridge *= 1e4) {
    for (int64_t i = 0; i < r * r; ++i) ws.L1[i].v[0] = gram[i];
    bool ok;
    cholesky(ws.L1.data(), r, ridge, &ok);
    if (ok || !(ridge < mean_diagonal)) break;  // also ends on a NaN diagonal (the result is NaN)
  }
  for (int64_t i = 0; i < r; ++i) ws.b1[i].v[0] = rhs[i];
  cholesky_solve(ws.L1.data(), r, ws.b1.data());
  for (int64_t i = 0; i < r; ++i) x[i] = static_cast<float>(ws.b1[i].v[0]);
}

// Systems [0, count) of gram / rhs / x (count <= kLanes; the missing lanes solve I x = 0).
void solve_group(const float* gram, const float* rhs, int64_t r, int64_t count, Workspace& ws, float* x) {
  for (int64_t i = 0; i < r * r; ++i)
    for (int l = 0; l < kLanes; ++l) ws.L[i].v[l] = l < count ? gram[l * r * r + i] : (i % (r + 1) == 0);
  for (int64_t i = 0; i < r; ++i)
    for (int l = 0; l < kLanes; ++l) ws.b[i].v[l] = l < count ? rhs[l * r + i] : 0.0;
  bool ok[kLanes];
  cholesky(ws.L.data(), r, 0.0, ok);
  cholesky_solve(ws.L.data(), r, ws.b.data());
  for (int l = 0; l < count; ++l) {
    if (ok[l]) {
      for (int64_t i = 0; i < r; ++i) x[l * r + i] = static_cast<float>(ws.b[i].v[l]);
    } else {
      solve_with_ridge(gram + l * r * r, rhs + l * r, r, ws, x + l * r);
    }
  }
}

at::Tensor spd_solve_cpu(const at::Tensor& gram, const at::Tensor& rhs) {
  check_spd_solve_args(gram, rhs);
  const at::Tensor g = gram.contiguous(), b = rhs.contiguous();
  at::Tensor x = at::empty(rhs.sizes(), rhs.options());
  const int64_t r = rhs.size(-1), systems = r == 0 ? 0 : rhs.numel() / r;
  const int64_t groups = (systems + kLanes - 1) / kLanes;
  const float *gp = g.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* xp = x.data_ptr<float>();
  at::parallel_for(0, groups, kSystemsPerTask / kLanes, [&](int64_t begin, int64_t end) {
    Workspace ws(r);
    for (int64_t group = begin; group < end; ++group) {
      const int64_t s = group * kLanes;
      solve_group(gp + s * r * r, bp + s * r, r, std::min<int64_t>(kLanes, systems - s), ws, xp + s * r);
    }
  });
  return x;
}

LK_CPU_KERNELS(m) { m.impl("spd_solve", &spd_solve_cpu); }

}  // namespace

}  // namespace lowrank_kernels
