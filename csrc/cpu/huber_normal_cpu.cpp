// C++ CPU kernels of huber_normal_equations and huber_loss: one IRLS half-step of Robust PiSSA
// in a single read of W, with no m×n temporaries.
//
// For W [..., m, n], A [..., m, r], B [..., r, n] and E = A B − W:
//   huber_normal_equations -> G [..., n, r, r] with G_j = Σ_i ω(E_ij) a_i a_iᵀ,
//                             g [..., n, r]    with g_j = Σ_i ψ(E_ij) a_i,
//                             stats [..., 2]   = [Σ ρ(E) at loss_delta, Σ |E|] (fp64)
//   huber_loss             -> stats only.
// (ω, ψ at weight_delta; element math in huber_math.h.) G_j, g_j are the weighted normal
// equations of column j of B with A fixed: B_j ← B_j − G_j⁻¹ g_j is the exact IRLS step. The
// row half-step is the same kernel on the transposed problem (Wᵀ, Bᵀ, Aᵀ).
//
// Work split: one task per block of kColumns columns of one matrix, over all rows, so every
// G_j is accumulated by exactly one task in a fixed order (bitwise the same for any thread
// count) and only W's block is read. Rows go kChunk at a time:
//   1. E, ω, ψ of the chunk's rows x the block's columns into L1 buffers (E via A's row and B's
//      block columns, r FMAs per element; 4 rows at a time: 8 independent FMA chains, ~11 %
//      faster than 2 rows, measured single-threaded, alternating builds);
//   2. the accumulators (r(r+1)/2 pair products + r, times kColumns, in L1) take the chunk:
//      for 4 pair products at a time, 2·4 vector accumulators stay in registers while the rows
//      stream past (each row's a_k a_l come precomputed from a [m, r(r+1)/2] table).
// The arithmetic is the GEMM an unfused version would run (ωᵀ [a_i a_iᵀ]), without writing ω,
// ψ to memory and reading them back.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "lowrank_kernels/checks.h"
#include "float_convert.h"
#include "horizontal_sum.h"
#include "huber_simd.h"
#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace {

using cpu::HuberDeltas;

constexpr int kColumns = 16;
constexpr int64_t kChunk = 64;

using Column = std::array<float, kColumns>;

// Step 1 for rows [i0, i0 + rows) (portable; AVX2 builds use it for the ragged last block): ω, ψ [rows][kColumns] (zero
// in padding columns >= width) and the chunk's loss / |E| sums added to stats (fp64, per chunk).
template <typename T, bool kWeights>
void residual_chunk(const T* w, const float* a, const float* b, int64_t n, int64_t r, int64_t j0, int width, int64_t i0,
                    int64_t rows, HuberDeltas delta, Column* omega, Column* psi, double* stats) {
  float loss = 0.0f, magnitude_sum = 0.0f;
  for (int64_t q = 0; q < rows; ++q) {
    const int64_t i = i0 + q;
    Column e{};
    for (int64_t k = 0; k < r; ++k) {
      const float aik = a[i * r + k];
      const float* bk = b + k * n + j0;
      for (int c = 0; c < width; ++c) e[c] = std::fma(aik, bk[c], e[c]);
    }
    const T* wi = w + i * n + j0;
    for (int c = 0; c < width; ++c) {
      const float ec = e[c] - cpu::to_float(wi[c]);
      loss += huber_loss(ec, delta.loss);
      magnitude_sum += std::fabs(ec);
      if constexpr (kWeights) {
        omega[q][c] = huber_weight(ec, delta.weight);
        psi[q][c] = huber_psi(ec, delta.weight);
      }
    }
    if constexpr (kWeights) {
      for (int c = width; c < kColumns; ++c) omega[q][c] = psi[q][c] = 0.0f;
    }
  }
  stats[0] += loss;
  stats[1] += magnitude_sum;
}

#ifdef LK_HAVE_AVX2
// Step 1 for a full block (width == kColumns): the same as residual_chunk, kRows rows at a time
// (2·kRows independent r-long FMA chains: one row at a time waits on their latency), with one
// loss / |E| accumulator per vector half; every accumulator takes rows in increasing order, so
// the sums do not depend on kRows.
template <typename T, bool kWeights>
struct ResidualAvx2 {
  const T* w;
  const float* a;
  const float* b;
  int64_t n, r, j0, i0;
  cpu::HuberLanes huber;
  Column* omega;
  Column* psi;
  __m256 loss[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 magnitude_sum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};

  // Rows [q, q + kRows) of the chunk.
  template <int kRows>
  void rows(int64_t q) {
    __m256 e[kRows][2];
    for (int t = 0; t < kRows; ++t) e[t][0] = e[t][1] = _mm256_setzero_ps();
    const float* a0 = a + (i0 + q) * r;
    for (int64_t k = 0; k < r; ++k) {
      const float* bk = b + k * n + j0;
      const __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8);
      for (int t = 0; t < kRows; ++t) {
        const __m256 x = _mm256_broadcast_ss(a0 + t * r + k);
        e[t][0] = _mm256_fmadd_ps(x, b0, e[t][0]);
        e[t][1] = _mm256_fmadd_ps(x, b1, e[t][1]);
      }
    }
    for (int t = 0; t < kRows; ++t)
      for (int h = 0; h < 2; ++h) finish(q + t, h, e[t][h]);
  }

  // Row q's residual vector h (columns j0 + 8h ..) is e: its loss terms, ω and ψ.
  void finish(int64_t q, int h, __m256 e) {
    e = _mm256_sub_ps(e, cpu::load8(w + (i0 + q) * n + j0 + 8 * h));
    const __m256 mag = huber.magnitude(e);
    loss[h] = _mm256_add_ps(loss[h], huber.loss(e, mag));
    magnitude_sum[h] = _mm256_add_ps(magnitude_sum[h], mag);
    if constexpr (kWeights) {
      _mm256_storeu_ps(omega[q].data() + 8 * h, huber.weight(mag));
      _mm256_storeu_ps(psi[q].data() + 8 * h, huber.psi(e));
    }
  }
};

template <typename T, bool kWeights>
void residual_chunk_avx2(const T* w, const float* a, const float* b, int64_t n, int64_t r, int64_t j0, int64_t i0,
                         int64_t rows, HuberDeltas delta, Column* omega, Column* psi, double* stats) {
  ResidualAvx2<T, kWeights> pass{w, a, b, n, r, j0, i0, cpu::HuberLanes(delta), omega, psi};
  int64_t q = 0;
  for (; q + 4 <= rows; q += 4) pass.template rows<4>(q);
  for (; q < rows; ++q) pass.template rows<1>(q);
  stats[0] += cpu::sum_as_double(_mm256_add_ps(pass.loss[0], pass.loss[1]));
  stats[1] += cpu::sum_as_double(_mm256_add_ps(pass.magnitude_sum[0], pass.magnitude_sum[1]));
}
#endif

// Step 2: acc[t][c] += Σ_q weights[q][c] · coef[q][t] for t in [0, terms), rows q in [0, rows).
// coef is row-major with row stride `terms`.
//
// Terms [t, t + U): the U accumulator columns stay in registers while the rows stream past (U = 4:
// 8 vector FMA chains with AVX2; 6 measured ~1.2x slower even without spills, 1.7x with them).
template <int U>
void accumulate_terms(const Column* weights, const float* coef, int64_t rows, int64_t terms, int64_t t, Column* acc) {
#ifdef LK_HAVE_AVX2
  __m256 sum[U][2];
  for (int u = 0; u < U; ++u)
    for (int h = 0; h < 2; ++h) sum[u][h] = _mm256_loadu_ps(acc[t + u].data() + 8 * h);
  for (int64_t q = 0; q < rows; ++q) {
    const __m256 w0 = _mm256_loadu_ps(weights[q].data()), w1 = _mm256_loadu_ps(weights[q].data() + 8);
    for (int u = 0; u < U; ++u) {
      const __m256 c = _mm256_broadcast_ss(coef + q * terms + t + u);
      sum[u][0] = _mm256_fmadd_ps(w0, c, sum[u][0]);
      sum[u][1] = _mm256_fmadd_ps(w1, c, sum[u][1]);
    }
  }
  for (int u = 0; u < U; ++u)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(acc[t + u].data() + 8 * h, sum[u][h]);
#else
  Column sum[U];
  for (int u = 0; u < U; ++u) sum[u] = acc[t + u];
  for (int64_t q = 0; q < rows; ++q)
    for (int u = 0; u < U; ++u)
      for (int c = 0; c < kColumns; ++c) sum[u][c] = std::fma(weights[q][c], coef[q * terms + t + u], sum[u][c]);
  for (int u = 0; u < U; ++u) acc[t + u] = sum[u];
#endif
}

void accumulate(const Column* weights, const float* coef, int64_t rows, int64_t terms, Column* acc) {
  int64_t t = 0;
  for (; t + 4 <= terms; t += 4) accumulate_terms<4>(weights, coef, rows, terms, t, acc);
  for (; t + 2 <= terms; t += 2) accumulate_terms<2>(weights, coef, rows, terms, t, acc);
  for (; t < terms; ++t) accumulate_terms<1>(weights, coef, rows, terms, t, acc);
}

// Pair products a_ik a_il (k <= l, row-major triangle order) of every row: fp32 [m, r(r+1)/2].
at::Tensor pair_products(const float* a, int64_t m, int64_t r) {
  const int64_t pairs = r * (r + 1) / 2;
  at::Tensor out = at::empty({m, pairs}, at::kFloat);
  float* op = out.data_ptr<float>();
  // Grain: a fork costs about as much as a few thousand rows of products, so one matrix runs inline.
  at::parallel_for(0, m, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = op + i * pairs;
      for (int64_t k = 0, t = 0; k < r; ++k)
        for (int64_t l = k; l < r; ++l) row[t++] = a[i * r + k] * a[i * r + l];
    }
  });
  return out;
}

struct Outputs {
  float* gram;    // [n, r, r] of this matrix, or null (huber_loss)
  float* grad;    // [n, r]
  double* stats;  // [2] of this task
};

// One task: columns [j0, j0 + width) of one matrix.
template <typename T, bool kWeights>
void column_block(const T* w, const float* a, const float* pairs, const float* b, int64_t m, int64_t n, int64_t r,
                  int64_t j0, HuberDeltas delta, Outputs out) {
  const int width = static_cast<int>(std::min<int64_t>(kColumns, n - j0));
  const int64_t terms = r * (r + 1) / 2;
  std::vector<Column> omega(kWeights ? kChunk : 0), psi(kWeights ? kChunk : 0);
  std::vector<Column> gram_acc(kWeights ? terms : 0, Column{}), grad_acc(kWeights ? r : 0, Column{});
  out.stats[0] = out.stats[1] = 0.0;
  for (int64_t i0 = 0; i0 < m; i0 += kChunk) {
    const int64_t rows = std::min(kChunk, m - i0);
#ifdef LK_HAVE_AVX2
    if (width == kColumns)
      residual_chunk_avx2<T, kWeights>(w, a, b, n, r, j0, i0, rows, delta, omega.data(), psi.data(), out.stats);
    else
#endif
      residual_chunk<T, kWeights>(w, a, b, n, r, j0, width, i0, rows, delta, omega.data(), psi.data(), out.stats);
    if constexpr (kWeights) {
      accumulate(omega.data(), pairs + i0 * terms, rows, terms, gram_acc.data());
      accumulate(psi.data(), a + i0 * r, rows, r, grad_acc.data());
    }
  }
  if constexpr (kWeights) {
    for (int c = 0; c < width; ++c) {
      float* G = out.gram + (j0 + c) * r * r;
      for (int64_t k = 0, t = 0; k < r; ++k)
        for (int64_t l = k; l < r; ++l, ++t) G[k * r + l] = G[l * r + k] = gram_acc[t][c];
      for (int64_t k = 0; k < r; ++k) out.grad[(j0 + c) * r + k] = grad_acc[k][c];
    }
  }
}

template <bool kWeights>
std::tuple<at::Tensor, at::Tensor, at::Tensor> huber_pass(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b,
                                                          const at::Tensor& weight_delta,
                                                          const at::Tensor& loss_delta) {
  const std::vector<int64_t> stats_shape = check_huber_weights_args(w, a, b, weight_delta, loss_delta);
  const at::Tensor wc = w.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor wd = weight_delta.contiguous(), ld = loss_delta.contiguous();
  const int64_t m = w.size(-2), n = w.size(-1), r = a.size(-1);
  std::vector<int64_t> gram_shape(stats_shape.begin(), stats_shape.end() - 1), grad_shape = gram_shape;
  gram_shape.insert(gram_shape.end(), {n, r, r});
  grad_shape.insert(grad_shape.end(), {n, r});
  const auto options = w.options().dtype(at::kFloat);
  at::Tensor stats = at::zeros(stats_shape, options.dtype(at::kDouble));
  if (w.numel() == 0) {  // no rows: G = 0, g = 0 (no columns: empty)
    return {kWeights ? at::zeros(gram_shape, options) : at::empty({0}, options),
            kWeights ? at::zeros(grad_shape, options) : at::empty({0}, options), stats};
  }
  // Every column block writes its columns' G_j (both triangles) and g_j whole.
  at::Tensor gram = at::empty(kWeights ? gram_shape : std::vector<int64_t>{0}, options);
  at::Tensor grad = at::empty(kWeights ? grad_shape : std::vector<int64_t>{0}, options);

  const int64_t batch = w.numel() / (m * n), blocks = (n + kColumns - 1) / kColumns;
  at::Tensor task_stats = at::empty({batch, blocks, 2}, stats.options());
  double* sp = task_stats.data_ptr<double>();
  const float *ap = ac.data_ptr<float>(), *bp = bc.data_ptr<float>();
  const float *wdp = wd.data_ptr<float>(), *ldp = ld.data_ptr<float>();
  const at::Tensor pairs = kWeights ? pair_products(ap, batch * m, r) : at::Tensor();
  const int64_t terms = r * (r + 1) / 2;
  cpu::dispatch_float(w.scalar_type(), "huber_normal_equations", [&](auto tag) {
    using T = decltype(tag);
    const T* wp = wc.data_ptr<T>();
    at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t mat = task / blocks, j0 = task % blocks * kColumns;
        Outputs out{kWeights ? gram.data_ptr<float>() + mat * n * r * r : nullptr,
                    kWeights ? grad.data_ptr<float>() + mat * n * r : nullptr, sp + 2 * task};
        column_block<T, kWeights>(wp + mat * m * n, ap + mat * m * r,
                                  kWeights ? pairs.data_ptr<float>() + mat * m * terms : nullptr, bp + mat * r * n, m,
                                  n, r, j0, HuberDeltas{wdp[mat], ldp[mat]}, out);
      }
    });
  });
  // Blocks summed in order (not by a parallel reduction): the same bits for any thread count.
  double* total = stats.data_ptr<double>();
  for (int64_t task = 0; task < batch * blocks; ++task)
    for (int s = 0; s < 2; ++s) total[task / blocks * 2 + s] += sp[2 * task + s];
  return {gram, grad, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> huber_normal_equations_cpu(const at::Tensor& w, const at::Tensor& a,
                                                                          const at::Tensor& b,
                                                                          const at::Tensor& weight_delta,
                                                                          const at::Tensor& loss_delta) {
  return huber_pass<true>(w, a, b, weight_delta, loss_delta);
}

at::Tensor huber_loss_cpu(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, const at::Tensor& loss_delta) {
  return std::get<2>(huber_pass<false>(w, a, b, loss_delta, loss_delta));
}

LK_CPU_KERNELS(m) {
  m.impl("huber_normal_equations", &huber_normal_equations_cpu);
  m.impl("huber_loss", &huber_loss_cpu);
}

}  // namespace

}  // namespace lowrank_kernels
