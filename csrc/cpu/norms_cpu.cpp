// C++ CPU kernel of row_col_sq_norms: for W [..., m, n], the squared row norms sum_j W_ij^2
// [..., m] and the squared column norms sum_i W_ij^2 [..., n], in fp32, reading W once.
//
// The op is bound by memory bandwidth (two flops per element), so the design is about reading W
// exactly once:
// - Each matrix's rows are cut into chunks of whole rows; one chunk is one task of
//   at::parallel_for. The chunking depends on (m, n) only, never on the thread count, so
//   results are bitwise identical however many threads run.
// - A task streams its rows kRowGroup at a time: for every 8 columns it loads the running column
//   sums once, adds the squares of the group's rows to them and to the rows' own vector
//   accumulators (FMA), and stores them back. The column sums are the chunk's row of a
//   [batch, chunks, n] fp32 scratch buffer (written in place, cache resident while the chunk
//   runs: columns are processed in tiles of kColumnTile for very wide matrices).
// - The chunk partials are then summed in chunk order (fixed, so deterministic). A matrix
//   that is a single chunk writes its column sums straight into the result.
// bf16/fp16 elements are widened to fp32 exactly (AVX2: shift / F16C) and squared in fp32.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "lowrank_kernels/norms_op.h"
#include "float_convert.h"
#include "horizontal_sum.h"
#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace {

// Rows whose squares are added to the column sums per load/store of those sums: fewer column
// sum round trips through the cache, and as many independent FMA chains (one per row).
constexpr int kRowGroup = 4;
// A chunk has at least this many rows, so that writing its column partial (n floats) and
// reading it back in the reduction costs at most a few percent of reading the chunk...
constexpr int64_t kMinChunkRows = 64;
// ...and at least about this many elements, so that small matrices are not split into tasks
// too small to pay for themselves.
constexpr int64_t kChunkElements = int64_t{1} << 17;
// Column sums live in L2 while a chunk runs: 64 KB of fp32 per tile.
constexpr int64_t kColumnTile = 16384;
// Columns per task of the partial reduction.
constexpr int64_t kReduceColumns = 2048;

#ifdef LK_HAVE_AVX2
using cpu::horizontal_sum;
using cpu::load8;
#endif

// Adds the squares of ROWS consecutive rows of w (row stride ld), columns [begin, end), to the
// column sums col[begin, end) and the rows' sums over those columns to row_sums[0, ROWS).
template <int ROWS, typename T>
void accumulate_rows(const T* w, int64_t ld, int64_t begin, int64_t end, float* col, float* row_sums) {
  float sums[ROWS] = {};
  int64_t j = begin;
#ifdef LK_HAVE_AVX2
  __m256 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
  for (; j + 8 <= end; j += 8) {
    __m256 c = _mm256_loadu_ps(col + j);
    for (int r = 0; r < ROWS; ++r) {
      const __m256 x = load8(w + r * ld + j);
      acc[r] = _mm256_fmadd_ps(x, x, acc[r]);
      c = _mm256_fmadd_ps(x, x, c);
    }
    _mm256_storeu_ps(col + j, c);
  }
  for (int r = 0; r < ROWS; ++r) sums[r] = horizontal_sum(acc[r]);
#endif
  for (; j < end; ++j) {
    float c = col[j];
    for (int r = 0; r < ROWS; ++r) {
      const float x = cpu::to_float(w[r * ld + j]);
      sums[r] += x * x;
      c += x * x;
    }
    col[j] = c;
  }
  for (int r = 0; r < ROWS; ++r) row_sums[r] += sums[r];
}

// One chunk: rows [0, rows) of w [rows, n] -> row_sums[0, rows) and column partial col[0, n).
template <typename T>
void chunk_norms(const T* w, int64_t rows, int64_t n, float* row_sums, float* col) {
  std::fill(row_sums, row_sums + rows, 0.0f);
  std::fill(col, col + n, 0.0f);
  for (int64_t begin = 0; begin < n; begin += kColumnTile) {
    const int64_t end = std::min(n, begin + kColumnTile);
    int64_t r = 0;
    for (; r + kRowGroup <= rows; r += kRowGroup)
      accumulate_rows<kRowGroup>(w + r * n, n, begin, end, col, row_sums + r);
    for (; r < rows; ++r) accumulate_rows<1>(w + r * n, n, begin, end, col, row_sums + r);
  }
}

// Rows per chunk: a multiple of kRowGroup (only a matrix's last chunk has leftover rows).
int64_t chunk_rows(int64_t m, int64_t n) {
  const int64_t by_elements = (kChunkElements + n - 1) / n;
  const int64_t rows = (std::max(kMinChunkRows, by_elements) + kRowGroup - 1) / kRowGroup * kRowGroup;
  return std::min(rows, m);
}

// out[b, :] = sum over c (in order) of partial[b, c, :], for partial [batch, chunks, n].
void reduce_partials(const float* partial, int64_t batch, int64_t chunks, int64_t n, float* out) {
  const int64_t blocks = (n + kReduceColumns - 1) / kReduceColumns;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, first = task % blocks * kReduceColumns;
      const int64_t count = std::min(kReduceColumns, n - first);
      float* dst = out + b * n + first;
      const float* src = partial + b * chunks * n + first;
      std::copy(src, src + count, dst);
      for (int64_t c = 1; c < chunks; ++c)
        for (int64_t j = 0; j < count; ++j) dst[j] += src[c * n + j];
    }
  });
}

// rows [batch, m], cols [batch, n] fp32 = the squared norms of x [batch, m, n] (contiguous).
void row_col_sq_norms_kernel(const at::Tensor& x, int64_t batch, int64_t m, int64_t n, at::Tensor& rows,
                             at::Tensor& cols) {
  const int64_t step = chunk_rows(m, n), chunks = (m + step - 1) / step;
  // A single chunk per matrix accumulates its column sums directly in the result.
  at::Tensor partial = chunks == 1 ? cols : at::empty({batch, chunks, n}, cols.options());
  float* row_data = rows.data_ptr<float>();
  float* partial_data = partial.data_ptr<float>();
  cpu::dispatch_float(x.scalar_type(), "row_col_sq_norms", [&](auto tag) {
    using T = decltype(tag);
    const T* data = x.data_ptr<T>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, first = task % chunks * step;
        const int64_t count = std::min(step, m - first);
        chunk_norms(data + (b * m + first) * n, count, n, row_data + b * m + first, partial_data + task * n);
      }
    });
  });
  if (chunks > 1) reduce_partials(partial_data, batch, chunks, n, cols.data_ptr<float>());
}

std::tuple<at::Tensor, at::Tensor> row_col_sq_norms_cpu(const at::Tensor& w) {
  return run_row_col_sq_norms(w, row_col_sq_norms_kernel);
}

LK_CPU_KERNELS(m) { m.impl("row_col_sq_norms", &row_col_sq_norms_cpu); }

}  // namespace

}  // namespace lowrank_kernels
