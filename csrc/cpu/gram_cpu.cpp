// C++ CPU kernel of gram: G = Yᵀ Y, fp32 [..., k, k], of a tall-skinny Y [..., m, k] (fp32, bf16
// or fp16, any strides): the Gram product of CholeskyQR2 in the randomized SVD.
//
// - Y is read in blocks of rows. Each block is converted to fp32 (exactly) and packed into
//   panels of 8 columns, each panel `rows x 8` contiguous floats, so bf16/fp16 inputs are
//   converted on the fly and Y is never copied whole. The block stays in L2 while it is used.
// - Outer-product micro-kernels (register-blocked AVX2 FMA: 4 rows of G x 3 panels of 8 columns)
//   accumulate G[8u : 8u+8, 8v : 8v+8] over the block's rows for the panel pairs u <= v only:
//   the upper triangle, about half the multiply-adds of the GEMM that `y.mT @ y` runs. Each
//   element of a part is one FMA chain over that part's rows, in row order.
// - Work items are (matrix, part of its rows); the number of parts depends on the shape only,
//   never on the thread count, and parts are summed in a fixed order, so results are
//   reproducible. Batches of small matrices get one part per matrix (parallel over the batch).
// - The upper triangle is mirrored into the lower one, so G equals G.mT bit for bit.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lowrank_kernels/checks.h"
#include "float_convert.h"
#include "fma_tile.h"
#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace {

constexpr int64_t kPanel = 8;                      // columns per packed panel (one AVX2 vector)
constexpr int64_t kPackBytes = int64_t{64} << 10;  // packed row block, L2-resident
constexpr int64_t kMinBlockRows = 64, kMaxBlockRows = 512;
constexpr int64_t kMaxParts = 8;                    // row parts per matrix: bounds the partial buffers
constexpr int64_t kTargetItems = 16;                // work items that balance common thread counts
constexpr int64_t kMinItemWork = int64_t{1} << 21;  // multiply-adds per task (~tens of µs)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How a [batch, m, k] problem is cut into work items.
struct Plan {
  int64_t padded;      // k rounded up to whole panels
  int64_t block_rows;  // rows per packed block
  int64_t parts;       // row parts per matrix (work items = batch * parts)
  int64_t grain;       // work items per task at least
};

Plan make_plan(int64_t batch, int64_t m, int64_t k) {
  Plan plan;
  plan.padded = ceil_div(k, kPanel) * kPanel;
  plan.block_rows = std::clamp(kPackBytes / (4 * plan.padded), kMinBlockRows, kMaxBlockRows);
  // Multiply-adds of one matrix: m rows times the 8x8 tiles on and above the diagonal.
  const int64_t panels = plan.padded / kPanel;
  const int64_t work = m * panels * (panels + 1) / 2 * kPanel * kPanel;
  // A part costs O(k²) to clear, store and sum besides its O(rows k²) multiply-adds: parts get
  // at least a packed block and k / 2 rows (m ~ k would otherwise drown in that overhead).
  const int64_t min_part_rows = std::max(plan.block_rows, k / 2);
  const int64_t parts =
      std::min({ceil_div(work, kMinItemWork), ceil_div(kTargetItems, batch), kMaxParts, m / min_part_rows});
  // A power of two: splits evenly over the common thread counts.
  plan.parts = 1;
  while (plan.parts * 2 <= parts) plan.parts *= 2;
  plan.grain = std::max<int64_t>(1, kMinItemWork / std::max<int64_t>(1, work / plan.parts));
  return plan;
}

#ifdef LK_HAVE_AVX2
using cpu::load8;
using cpu::widen8;

// The first n < 8 elements from p as fp32, the other lanes 0, reading nothing past p[n - 1].
// Built in registers: scalar stores to a buffer read back as a vector stall store forwarding,
// which costs more than the rest of the row.
inline __m256 load_partial(const float* p, int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane));
}
template <typename T>
inline __m256 load_partial(const T* p, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(p);
  __m128i v = _mm_setzero_si128();
  switch (n) {  // _mm_insert_epi16 takes its lane as an immediate
    case 7: v = _mm_insert_epi16(v, bits[6], 6); [[fallthrough]];
    case 6: v = _mm_insert_epi16(v, bits[5], 5); [[fallthrough]];
    case 5: v = _mm_insert_epi16(v, bits[4], 4); [[fallthrough]];
    case 4: v = _mm_insert_epi16(v, bits[3], 3); [[fallthrough]];
    case 3: v = _mm_insert_epi16(v, bits[2], 2); [[fallthrough]];
    case 2: v = _mm_insert_epi16(v, bits[1], 1); [[fallthrough]];
    default: v = _mm_insert_epi16(v, bits[0], 0);
  }
  return widen8(v, T{});
}

// Micro-kernels: c (row stride ldc) += Σ_r a[r, i] b_v[r, :] for rows i of the a panel and
// vectors v of the b panels (panel v at b + v * panel_size), all [rows, 8] packed panels.
//   tile4xC: rows 0..3 of a, C = 3 panels of b (2 for diagonal groups): fma_tile.h's micro-kernel.
//   tile8x1: all 8 rows of a, 1 panel: 8 independent FMA chains hide the FMA latency.
template <int C>
inline void tile4xC(const float* a, const float* b, int64_t panel_size, int64_t rows, float* c, int64_t ldc) {
  cpu::fma_tile_4x<C>({a, 1, kPanel}, {b, panel_size, kPanel}, rows, cpu::tile_rows(c, ldc), /*accumulate=*/true);
}

inline void tile8x1(const float* a, const float* b, int64_t rows, float* c, int64_t ldc) {
  __m256 c0 = _mm256_loadu_ps(c), c1 = _mm256_loadu_ps(c + ldc), c2 = _mm256_loadu_ps(c + 2 * ldc),
         c3 = _mm256_loadu_ps(c + 3 * ldc), c4 = _mm256_loadu_ps(c + 4 * ldc), c5 = _mm256_loadu_ps(c + 5 * ldc),
         c6 = _mm256_loadu_ps(c + 6 * ldc), c7 = _mm256_loadu_ps(c + 7 * ldc);
  for (int64_t r = 0; r < rows * kPanel; r += kPanel) {
    const __m256 v = _mm256_load_ps(b + r);
    c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r), v, c0);
    c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r + 1), v, c1);
    c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r + 2), v, c2);
    c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r + 3), v, c3);
    c4 = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r + 4), v, c4);
    c5 = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r + 5), v, c5);
    c6 = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r + 6), v, c6);
    c7 = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r + 7), v, c7);
  }
  _mm256_storeu_ps(c, c0), _mm256_storeu_ps(c + ldc, c1), _mm256_storeu_ps(c + 2 * ldc, c2);
  _mm256_storeu_ps(c + 3 * ldc, c3), _mm256_storeu_ps(c + 4 * ldc, c4), _mm256_storeu_ps(c + 5 * ldc, c5);
  _mm256_storeu_ps(c + 6 * ldc, c6), _mm256_storeu_ps(c + 7 * ldc, c7);
}
#else
// Scalar builds: the same tiles as plain loops, multiply then add (not fma_tile.h's FMA chains:
// the last bits differ from the AVX2 build's).
template <int MR, int NV>
void tile_scalar(const float* a, const float* b, int64_t panel_size, int64_t rows, float* c, int64_t ldc) {
  for (int64_t r = 0; r < rows * kPanel; r += kPanel)
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v)
        for (int j = 0; j < kPanel; ++j) c[i * ldc + v * kPanel + j] += a[r + i] * b[v * panel_size + r + j];
}
template <int C>
inline void tile4xC(const float* a, const float* b, int64_t panel_size, int64_t rows, float* c, int64_t ldc) {
  tile_scalar<4, C>(a, b, panel_size, rows, c, ldc);
}
inline void tile8x1(const float* a, const float* b, int64_t rows, float* c, int64_t ldc) {
  tile_scalar<8, 1>(a, b, 0, rows, c, ldc);
}
#endif

// Rows [0, rows) of y (element (r, c) at y[r * row_stride + c * col_stride]) in fp32, packed:
// panel v = pack[v * rows * 8 ...] holds columns [8v, 8v + 8) row after row; columns >= k are 0.
template <typename T>
void pack_block(const T* y, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t k, int64_t padded,
                float* pack) {
  const int64_t panel_size = rows * kPanel;
  if (col_stride == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* src = y + r * row_stride;
#ifdef LK_HAVE_AVX2
      const int64_t full = k / kPanel * kPanel;
      for (int64_t c = 0; c < full; c += kPanel)
        _mm256_store_ps(pack + c / kPanel * panel_size + r * kPanel, load8(src + c));
      if (full < k)  // the last, partial panel, zero-padded, without reading past the row
        _mm256_store_ps(pack + full / kPanel * panel_size + r * kPanel, load_partial(src + full, k - full));
#else
      for (int64_t c = 0; c < padded; ++c)
        pack[c / kPanel * panel_size + r * kPanel + c % kPanel] = c < k ? cpu::to_float(src[c]) : 0.0f;
#endif
    }
    return;
  }
  // Strided columns (e.g. a transposed view, rows contiguous): walk each column down the rows.
  for (int64_t c = 0; c < padded; ++c) {
    float* dst = pack + c / kPanel * panel_size + c % kPanel;
    const T* src = y + c * col_stride;
    for (int64_t r = 0; r < rows; ++r) dst[r * kPanel] = c < k ? cpu::to_float(src[r * row_stride]) : 0.0f;
  }
}

// acc [padded, padded] += the upper-triangle tiles of Yᵀ Y over rows [0, rows) of y.
template <typename T>
void accumulate_rows(const T* y, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t k, const Plan& plan,
                     float* pack, float* acc) {
  const int64_t panels = plan.padded / kPanel;
  for (int64_t row0 = 0; row0 < rows; row0 += plan.block_rows) {
    const int64_t n = std::min(plan.block_rows, rows - row0);
    pack_block(y + row0 * row_stride, row_stride, col_stride, n, k, plan.padded, pack);
    // Groups of 3 column panels outer: their packed rows stay in L1 while the row panels u
    // that meet the upper triangle stream by. Tile (u, v) covers G[8u : 8u+8, 8v : 8v+8].
    const int64_t panel_size = n * kPanel;
    for (int64_t v0 = 0; v0 < panels; v0 += 3) {
      const int64_t group_end = std::min(v0 + 3, panels);
      for (int64_t u = 0; u < group_end; ++u) {
        const int64_t v = std::max(v0, u);  // the first panel of the group on or above the diagonal
        const float* a = pack + u * panel_size;
        const float* b = pack + v * panel_size;
        float* c = acc + u * kPanel * plan.padded + v * kPanel;
        const int64_t lower = 4 * plan.padded;  // rows 4..7 of the tile
        switch (group_end - v) {
          case 1: tile8x1(a, b, n, c, plan.padded); break;
          case 2:
            tile4xC<2>(a, b, panel_size, n, c, plan.padded);
            tile4xC<2>(a + 4, b, panel_size, n, c + lower, plan.padded);
            break;
          default:
            tile4xC<3>(a, b, panel_size, n, c, plan.padded);
            tile4xC<3>(a + 4, b, panel_size, n, c + lower, plan.padded);
        }
      }
    }
  }
}

template <typename T>
void gram_kernel(const at::Tensor& y, int64_t batch, int64_t m, int64_t k, float* out) {
  const Plan plan = make_plan(batch, m, k);
  const T* data = y.data_ptr<T>();
  const int64_t batch_stride = y.stride(0), row_stride = y.stride(1), col_stride = y.stride(2);
  const int64_t kk = k * k;
  // Partial sums (upper triangles) of the parts of each matrix, when there are several.
  at::Tensor partials = plan.parts > 1 ? at::empty({batch, plan.parts, k, k}, at::kFloat) : at::Tensor();
  at::parallel_for(0, batch * plan.parts, plan.grain, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({plan.block_rows * plan.padded + plan.padded * plan.padded}, at::kFloat);
    float* pack = scratch.data_ptr<float>();  // 64-byte aligned: panels take aligned loads
    float* acc = pack + plan.block_rows * plan.padded;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / plan.parts, part = item % plan.parts;
      const int64_t row_begin = m * part / plan.parts, row_end = m * (part + 1) / plan.parts;
      std::fill(acc, acc + plan.padded * plan.padded, 0.0f);
      accumulate_rows(data + b * batch_stride + row_begin * row_stride, row_stride, col_stride, row_end - row_begin, k,
                      plan, pack, acc);
      if (plan.parts > 1) {
        float* dst = partials.data_ptr<float>() + item * kk;
        for (int64_t i = 0; i < k; ++i)
          std::copy(acc + i * plan.padded + i, acc + i * plan.padded + k, dst + i * k + i);
        continue;
      }
      float* g = out + b * kk;
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = i; j < k; ++j) g[i * k + j] = g[j * k + i] = acc[i * plan.padded + j];
    }
  });
  if (plan.parts == 1) return;
  // Sum the parts in order p = 0, 1, ... and mirror; one task per output row i (a row of G's
  // upper triangle and the column below it, disjoint between rows).
  const float* parts = partials.data_ptr<float>();
  const int64_t reduce_grain = std::max<int64_t>(1, (int64_t{1} << 16) / (plan.parts * k));
  at::parallel_for(0, batch * k, reduce_grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / k, i = row % k;
      const float* src = parts + b * plan.parts * kk + i * k;
      float* g = out + b * kk;
      for (int64_t j = i; j < k; ++j) {
        float sum = src[j];
        for (int64_t p = 1; p < plan.parts; ++p) sum += src[p * kk + j];
        g[i * k + j] = g[j * k + i] = sum;
      }
    }
  });
}

at::Tensor gram_cpu(const at::Tensor& y) {
  TORCH_CHECK(y.dim() >= 2, "gram: y must have at least 2 dimensions [..., m, k], got shape ", y.sizes(), " and dtype ",
              y.scalar_type());
  check_float_input(y, "gram: y");
  const int64_t m = y.size(-2), k = y.size(-1);
  std::vector<int64_t> out_shape(y.sizes().begin(), y.sizes().end() - 2);
  const int64_t batch = c10::multiply_integers(out_shape);
  out_shape.insert(out_shape.end(), {k, k});
  if (m == 0) return at::zeros(out_shape, y.options().dtype(at::kFloat));
  at::Tensor out = at::empty(out_shape, y.options().dtype(at::kFloat));
  if (batch == 0 || k == 0) return out;
  const at::Tensor y3 = y.reshape({batch, m, k});  // a view unless the leading dims do not merge
  cpu::dispatch_float(y.scalar_type(), "gram",
                      [&](auto tag) { gram_kernel<decltype(tag)>(y3, batch, m, k, out.data_ptr<float>()); });
  return out;
}

LK_CPU_KERNELS(m) { m.impl("gram", &gram_cpu); }

}  // namespace

}  // namespace lowrank_kernels
