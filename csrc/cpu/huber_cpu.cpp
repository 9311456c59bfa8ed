// C++ CPU kernel of huber_weights: for W [..., m, n], A [..., m, r], B [..., r, n] it forms the
// residual E = A B − W tile by tile in registers and writes the IRLS weights ω(E) and the Huber
// gradient ψ(E) at the matrix's `weight_delta` ([..., m, n] fp32 each: the two matrices the
// weighted least-squares solve needs), and per matrix Σ ρ(E) at its `loss_delta` and Σ |E|
// (fp64 [..., 2]). The deltas are fp32 tensors of the batch shape [...].
// E itself is never stored.
//
// - Rows go kRowGroup at a time: for 8 columns, each of B's r rows is loaded once and feeds
//   kRowGroup independent FMA chains (one per row of A), so B is read from cache once per group.
// - Loss and |E| sums: fp32 vector partials for kFlushColumns columns, then fp64 per row, then
//   the per-row fp64 sums are added in row order: the result is bitwise the same for any thread
//   count, and accurate enough to see relative loss changes of 1e-9 between IRLS sweeps.
// Element math: huber_math.h (the AVX2 lanes compute the same formulas).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "lowrank_kernels/checks.h"
#include "float_convert.h"
#include "horizontal_sum.h"
#include "huber_simd.h"
#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace {

using cpu::HuberDeltas;

constexpr int kRowGroup = 4;
constexpr int64_t kFlushColumns = 128;
// Rows per parallel task: at least this many elements, so small matrices are not split into
// tasks too small to pay for themselves.
constexpr int64_t kTaskElements = int64_t{1} << 15;

// Scalar path for columns [begin, n) of ROWS rows (all of them without AVX2).
template <int ROWS, typename T>
void rows_tail(const T* w, const float* a, const float* b, int64_t n, int64_t r, int64_t begin, HuberDeltas delta,
               float* omega, float* psi, double* stats) {
  for (int64_t j = begin; j < n; ++j) {
    for (int q = 0; q < ROWS; ++q) {
      float dot = 0.0f;
      for (int64_t k = 0; k < r; ++k) dot += a[q * r + k] * b[k * n + j];
      const float e = dot - cpu::to_float(w[q * n + j]);
      omega[q * n + j] = huber_weight(e, delta.weight);
      psi[q * n + j] = huber_psi(e, delta.weight);
      stats[2 * q] += huber_loss(e, delta.loss);
      stats[2 * q + 1] += std::fabs(e);
    }
  }
}

#ifdef LK_HAVE_AVX2
using cpu::sum_as_double;

// Columns [0, n - n % 8) of ROWS rows; returns the first column left for rows_tail.
template <int ROWS, typename T>
int64_t rows_avx2(const T* w, const float* a, const float* b, int64_t n, int64_t r, HuberDeltas delta, float* omega,
                  float* psi, double* stats) {
  const cpu::HuberLanes huber(delta);
  __m256 loss[ROWS], absum[ROWS];
  for (int q = 0; q < ROWS; ++q) loss[q] = absum[q] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 dot[ROWS];
    for (int q = 0; q < ROWS; ++q) dot[q] = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m256 bk = _mm256_loadu_ps(b + k * n + j);
      for (int q = 0; q < ROWS; ++q) dot[q] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + q * r + k), bk, dot[q]);
    }
    for (int q = 0; q < ROWS; ++q) {
      const __m256 e = _mm256_sub_ps(dot[q], cpu::load8(w + q * n + j));
      const __m256 mag = huber.magnitude(e);
      _mm256_storeu_ps(omega + q * n + j, huber.weight(mag));
      _mm256_storeu_ps(psi + q * n + j, huber.psi(e));
      loss[q] = _mm256_add_ps(loss[q], huber.loss(e, mag));
      absum[q] = _mm256_add_ps(absum[q], mag);
    }
    if ((j + 8) % kFlushColumns == 0) {
      for (int q = 0; q < ROWS; ++q) {
        stats[2 * q] += sum_as_double(loss[q]);
        stats[2 * q + 1] += sum_as_double(absum[q]);
        loss[q] = absum[q] = _mm256_setzero_ps();
      }
    }
  }
  for (int q = 0; q < ROWS; ++q) {
    stats[2 * q] += sum_as_double(loss[q]);
    stats[2 * q + 1] += sum_as_double(absum[q]);
  }
  return j;
}
#endif

template <int ROWS, typename T>
void huber_rows(const T* w, const float* a, const float* b, int64_t n, int64_t r, HuberDeltas delta, float* omega,
                float* psi, double* stats) {
  std::fill(stats, stats + 2 * ROWS, 0.0);
  int64_t done = 0;
#ifdef LK_HAVE_AVX2
  done = rows_avx2<ROWS>(w, a, b, n, r, delta, omega, psi, stats);
#endif
  rows_tail<ROWS>(w, a, b, n, r, done, delta, omega, psi, stats);
}

// Rows [first, first + count) of one matrix (all offsets already applied to the pointers).
template <typename T>
void huber_row_range(const T* w, const float* a, const float* b, int64_t count, int64_t n, int64_t r, HuberDeltas delta,
                     float* omega, float* psi, double* stats) {
  int64_t i = 0;
  for (; i + kRowGroup <= count; i += kRowGroup)
    huber_rows<kRowGroup>(w + i * n, a + i * r, b, n, r, delta, omega + i * n, psi + i * n, stats + 2 * i);
  for (; i < count; ++i) huber_rows<1>(w + i * n, a + i * r, b, n, r, delta, omega + i * n, psi + i * n, stats + 2 * i);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> huber_weights_cpu(const at::Tensor& w, const at::Tensor& a,
                                                                 const at::Tensor& b, const at::Tensor& weight_delta,
                                                                 const at::Tensor& loss_delta) {
  const std::vector<int64_t> stats_shape = check_huber_weights_args(w, a, b, weight_delta, loss_delta);
  const at::Tensor wc = w.contiguous(), ac = a.contiguous(), bc = b.contiguous();
  const int64_t m = w.size(-2), n = w.size(-1), r = a.size(-1);
  const auto options = w.options().dtype(at::kFloat);
  at::Tensor omega = at::empty(w.sizes(), options), psi = at::empty(w.sizes(), options);
  at::Tensor stats = at::zeros(stats_shape, options.dtype(at::kDouble));
  if (w.numel() == 0) return {omega, psi, stats};

  const int64_t batch = w.numel() / (m * n);
  at::Tensor row_stats = at::empty({batch, m, 2}, stats.options());
  const at::Tensor weight_deltas = weight_delta.contiguous(), loss_deltas = loss_delta.contiguous();
  const float *wd = weight_deltas.data_ptr<float>(), *ld = loss_deltas.data_ptr<float>();
  // Tasks are groups of whole rows of one matrix, sized by elements only (not thread count).
  const int64_t task_rows =
      std::min(m, (std::max<int64_t>(1, kTaskElements / n) + kRowGroup - 1) / kRowGroup * kRowGroup);
  const int64_t tasks_per_matrix = (m + task_rows - 1) / task_rows;
  double* sp = row_stats.data_ptr<double>();
  cpu::dispatch_float(w.scalar_type(), "huber_weights", [&](auto tag) {
    using T = decltype(tag);
    const T* wp = wc.data_ptr<T>();
    const float *ap = ac.data_ptr<float>(), *bp = bc.data_ptr<float>();
    float *op = omega.data_ptr<float>(), *pp = psi.data_ptr<float>();
    at::parallel_for(0, batch * tasks_per_matrix, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t mat = task / tasks_per_matrix, first = task % tasks_per_matrix * task_rows;
        const int64_t row = mat * m + first;
        huber_row_range(wp + row * n, ap + row * r, bp + mat * r * n, std::min(task_rows, m - first), n, r,
                        HuberDeltas{wd[mat], ld[mat]}, op + row * n, pp + row * n, sp + 2 * row);
      }
    });
  });
  // Rows summed in order (not by a parallel reduction): the same bits for any thread count.
  double* out = stats.data_ptr<double>();
  for (int64_t mat = 0; mat < batch; ++mat)
    for (int64_t i = 0; i < m; ++i)
      for (int s = 0; s < 2; ++s) out[2 * mat + s] += sp[2 * (mat * m + i) + s];
  return {omega, psi, stats};
}

LK_CPU_KERNELS(m) { m.impl("huber_weights", &huber_weights_cpu); }

}  // namespace

}  // namespace lowrank_kernels
