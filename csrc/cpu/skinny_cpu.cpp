// C++ CPU kernel of skinny_matmul: Y = W @ X or P = Wᵀ @ X, fp32 [..., M|N, l], for a big W
// [..., M, N] (fp32, bf16 or fp16) and a thin fp32 X (l columns, l <= ~128): the "passes" of the
// randomized SVD. MKL is slow at these widths; this kernel reads W once from memory and runs
// register-blocked AVX2 FMA micro-kernels with X (and the Wᵀ result) held in L1/L2.
//
// - X is packed once in fp32 with l padded to whole 8-float vectors (zeros).
// - w @ x (transpose_w = false): work items are (matrix, block of 64 rows of W). For 4 rows of W
//   at a time, each element W[i, j] is broadcast and multiplied into X[j, chunk] (a chunk is 1-3
//   vectors of the padded l, X packed chunk-major so each chunk is contiguous): 4 x 3 named
//   accumulators. The columns j are cut into blocks so the X block stays in L2; bf16/fp16 rows of
//   the block are widened into an fp32 buffer (L1) reused by every chunk.
// - wᵀ @ x (transpose_w = true): computes Pᵀ = Xᵀ W. Work items are (matrix, block of up to
//   1536 (l <= 32) or 768 columns of W, whole 24-column panels, as many blocks as balance the
//   threads); each sweeps all M rows in blocks of 32 (or 64): the W block is packed (widened)
//   row by row into fp32 panels of 24 columns, then for each panel, 4 columns of X are broadcast
//   against 3 W vectors (4 x 3 accumulators). Pᵀ of the block lives in a per-item buffer,
//   transposed into the result at the end.
// - Every output element is one FMA chain over the reduction index in increasing order, whatever
//   the blocking or thread count: results are deterministic and independent of the thread count.
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

constexpr int64_t kVec = 8;
constexpr int64_t kRowsPerItem = 64;         // w @ x: rows of W per work item
constexpr int64_t kXBlockBytes = 256 << 10;  // w @ x: the block of X kept in L2
constexpr int64_t kPanelT = 24;              // wᵀ @ x: columns of W per packed panel
// wᵀ @ x: columns of W per work item at most, and rows of W per packed block, for narrow
// (l <= 32) and wide x: long row segments keep the hardware prefetchers effective (64 rows x
// 192 columns measured 2x slower than 32 x 1536 at l = 16), the wide case keeps Pᵀ in L2.
constexpr int64_t kMaxColsNarrowT = 1536, kRowBlockNarrowT = 32;
constexpr int64_t kMaxColsWideT = 768, kRowBlockWideT = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 1..3 vector chunks covering `vecs` vectors as evenly as possible: (offset, width) pairs.
std::vector<std::pair<int64_t, int64_t>> make_chunks(int64_t vecs) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  const int64_t n = ceil_div(vecs, 3);
  int64_t off = 0;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t width = vecs / n + (c < vecs % n ? 1 : 0);
    chunks.emplace_back(off, width);
    off += width;
  }
  return chunks;
}

// Widening of n elements to fp32.
template <typename T>
inline void widen_row(const T* src, int64_t n, float* dst) {
  int64_t j = 0;
#ifdef LK_HAVE_AVX2
  for (; j + kVec <= n; j += kVec) _mm256_storeu_ps(dst + j, cpu::load8(src + j));
#endif
  for (; j < n; ++j) dst[j] = cpu::to_float(src[j]);
}

// Both products run fma_tile.h's 4 x C micro-kernel.
// y_r[offset : offset + 8C) (+)= Σ_{j < k} a_r[j] xc[j, 0 : 8C) for the 4 rows r (a_r = a + r * lda,
// y_r = y[r]), xc packed [k, 8C]. `first`: start from 0 instead of y.
template <int C>
inline void fwd_tile(const float* a, int64_t lda, const float* xc, int64_t k, float* const y[4], int64_t offset,
                     bool first) {
  const cpu::TileRows rows{{y[0] + offset, y[1] + offset, y[2] + offset, y[3] + offset}};
  cpu::fma_tile_4x<C>({a, lda, 1}, {xc, kVec, kVec * C}, k, rows, /*accumulate=*/!first);
}

// acc[r, 0:24) += Σ_{i < k} x[i, r] panel[i, 0:24) for r = 0..3 (x row stride ldx, acc row
// stride lda), panel packed [k, 24].
inline void tr_tile(const float* x, int64_t ldx, const float* panel, int64_t k, float* acc, int64_t lda) {
  cpu::fma_tile_4x<kPanelT / kVec>({x, 1, ldx}, {panel, kVec, kPanelT}, k, cpu::tile_rows(acc, lda),
                                   /*accumulate=*/true);
}

// y [batch, M, lp] = w [batch, M, N] @ x, x packed chunk-major: chunk (off, C) at xp + b * N * lp
// + off * 8 * N, laid out [N, 8C].
template <typename T>
void forward_kernel(const T* w, int64_t M, int64_t N, int64_t batch, const float* xp, int64_t lp, float* y) {
  const auto chunks = make_chunks(lp / kVec);
  const int64_t blocks = ceil_div(M, kRowsPerItem);
  const int64_t kc = std::max<int64_t>(256, kXBlockBytes / (4 * lp));
  constexpr bool kWide = std::is_same_v<T, float>;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kWide ? 0 : 4 * kc);
    std::vector<float> sink(lp);  // stores of the rows past M in a partial group of 4
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, row_begin = item % blocks * kRowsPerItem;
      const int64_t row_end = std::min(M, row_begin + kRowsPerItem);
      const T* wb = w + b * M * N;
      const float* xb = xp + b * N * lp;
      float* yb = y + b * M * lp;
      for (int64_t k0 = 0; k0 < N; k0 += kc) {
        const int64_t k = std::min(kc, N - k0);
        for (int64_t r0 = row_begin; r0 < row_end; r0 += 4) {
          const int64_t rows = std::min<int64_t>(4, row_end - r0);
          const float* a;
          int64_t lda;
          if constexpr (kWide) {
            a = reinterpret_cast<const float*>(wb) + r0 * N + k0;
            lda = N;
            if (rows < 4) {  // point the missing rows at row r0 (their results go to the sink)
              buf.assign(4 * k, 0.0f);
              for (int64_t r = 0; r < rows; ++r) std::copy(a + r * N, a + r * N + k, buf.data() + r * k);
              a = buf.data();
              lda = k;
            }
          } else {
            for (int64_t r = 0; r < 4; ++r)
              widen_row(wb + (r0 + std::min(r, rows - 1)) * N + k0, k, buf.data() + r * k);
            a = buf.data();
            lda = k;
          }
          float* ys[4];
          for (int64_t r = 0; r < 4; ++r) ys[r] = r < rows ? yb + (r0 + r) * lp : sink.data();
          for (const auto& [off, width] : chunks) {
            const float* xc = xb + off * kVec * N + k0 * width * kVec;
            const int64_t o = off * kVec;
            const bool first = k0 == 0;
            switch (width) {
              case 1: fwd_tile<1>(a, lda, xc, k, ys, o, first); break;
              case 2: fwd_tile<2>(a, lda, xc, k, ys, o, first); break;
              default: fwd_tile<3>(a, lda, xc, k, ys, o, first);
            }
          }
        }
      }
    }
  });
}

// p [batch, N, l] = w [batch, M, N]ᵀ @ x, x packed [batch, M, lp4] (lp4: l padded to 4 columns).
template <typename T>
void transposed_kernel(const T* w, int64_t M, int64_t N, int64_t batch, const float* xp, int64_t lp4, int64_t l,
                       float* p) {
  const bool narrow = lp4 <= 32;
  const int64_t row_block = narrow ? kRowBlockNarrowT : kRowBlockWideT;
  // Column blocks (whole panels) per matrix: a multiple of the thread count when the batch does
  // not balance the threads. The split does not change any result (each element is one chain).
  const int64_t threads = at::get_num_threads();
  int64_t blocks = ceil_div(N, narrow ? kMaxColsNarrowT : kMaxColsWideT);
  if (batch % threads != 0 && batch < 4 * threads) blocks = ceil_div(blocks * batch, threads) * threads / batch;
  blocks = std::max<int64_t>(1, blocks);
  const int64_t width = ceil_div(ceil_div(N, blocks), kPanelT) * kPanelT;
  blocks = ceil_div(N, width);
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({row_block * width + lp4 * width}, at::kFloat);
    float* pack = scratch.data_ptr<float>();  // 64-byte aligned: panels take aligned loads
    float* acc = pack + row_block * width;    // Pᵀ block [lp4, width]
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, col_begin = item % blocks * width;
      const int64_t cols = std::min(width, N - col_begin);
      const int64_t panels = ceil_div(cols, kPanelT);
      const T* wb = w + b * M * N + col_begin;
      const float* xb = xp + b * M * lp4;
      std::fill(acc, acc + lp4 * width, 0.0f);
      for (int64_t i0 = 0; i0 < M; i0 += row_block) {
        const int64_t k = std::min(row_block, M - i0);
        // Pack rows [i0, i0 + k) of the column block into panels [k, 24], zero past `cols`.
        // Row by row (each row's segment is read contiguously: friendly to the prefetchers).
        for (int64_t i = 0; i < k; ++i) {
          const T* src = wb + (i0 + i) * N;
          for (int64_t q = 0; q < panels; ++q) {
            const int64_t c0 = q * kPanelT, n = std::min(kPanelT, cols - c0);
            float* dst = pack + q * row_block * kPanelT + i * kPanelT;
            if (n == kPanelT) {
              widen_row(src + c0, kPanelT, dst);
            } else {
              widen_row(src + c0, n, dst);
              std::fill(dst + n, dst + kPanelT, 0.0f);
            }
          }
        }
        for (int64_t q = 0; q < panels; ++q) {
          const float* panel = pack + q * row_block * kPanelT;
          for (int64_t c = 0; c < lp4; c += 4)
            tr_tile(xb + i0 * lp4 + c, lp4, panel, k, acc + c * width + q * kPanelT, width);
        }
      }
      float* pb = p + (b * N + col_begin) * l;
      for (int64_t j = 0; j < cols; ++j)
        for (int64_t c = 0; c < l; ++c) pb[j * l + c] = acc[c * width + j];
    }
  });
}

at::Tensor skinny_matmul_cpu(const at::Tensor& w, const at::Tensor& x, bool transpose_w) {
  TORCH_CHECK(w.dim() >= 2, "skinny_matmul: w must have at least 2 dimensions [..., M, N], got shape ", w.sizes(),
              " and dtype ", w.scalar_type());
  check_float_input(w, "skinny_matmul: w");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "skinny_matmul: x must be float32, got ", x.scalar_type(), " with shape ",
              x.sizes());
  TORCH_CHECK(x.dim() == w.dim(), "skinny_matmul: x must have the same number of dimensions as w (", w.dim(),
              "), got shape ", x.sizes(), " for w of shape ", w.sizes());
  TORCH_CHECK(w.device().is_cpu() && x.device().is_cpu(), "skinny_matmul: w and x must be on the CPU, got ", w.device(),
              " and ", x.device());
  const int64_t M = w.size(-2), N = w.size(-1);
  const int64_t K = transpose_w ? M : N;  // the reduction length
  const int64_t R = transpose_w ? N : M;  // rows of the result
  TORCH_CHECK(x.sizes().slice(0, x.dim() - 2) == w.sizes().slice(0, w.dim() - 2) && x.size(-2) == K,
              "skinny_matmul: x must have shape [..., ", K, ", l] with the batch dims of w (shape ", w.sizes(),
              ", transpose_w=", transpose_w, "), got shape ", x.sizes());
  const int64_t l = x.size(-1);
  std::vector<int64_t> out_shape(w.sizes().begin(), w.sizes().end() - 2);
  const int64_t batch = c10::multiply_integers(out_shape);
  out_shape.insert(out_shape.end(), {R, l});
  if (K == 0) return at::zeros(out_shape, x.options());
  if (batch == 0 || R == 0 || l == 0) return at::empty(out_shape, x.options());
  const at::Tensor w3 = w.reshape({batch, M, N}).contiguous();
  const at::Tensor x3 = x.reshape({batch, K, l});
  if (!transpose_w) {
    const int64_t lp = ceil_div(l, kVec) * kVec;
    // X packed chunk-major: chunk (off, C) of matrix b at b * N * lp + off * 8 * N, [N, 8C].
    at::Tensor xp = at::zeros({batch, N * lp}, x.options());
    for (const auto& [off, width] : make_chunks(lp / kVec)) {
      const int64_t c_begin = off * kVec, c_end = std::min(l, (off + width) * kVec);
      xp.narrow(1, off * kVec * N, N * width * kVec)
          .view({batch, N, width * kVec})
          .narrow(2, 0, c_end - c_begin)
          .copy_(x3.narrow(2, c_begin, c_end - c_begin));
    }
    at::Tensor y = at::empty({batch, M, lp}, x.options());
    cpu::dispatch_float(w.scalar_type(), "skinny_matmul", [&](auto tag) {
      using T = decltype(tag);
      forward_kernel<T>(w3.data_ptr<T>(), M, N, batch, xp.data_ptr<float>(), lp, y.data_ptr<float>());
    });
    if (lp != l) y = y.narrow(2, 0, l).contiguous();
    return y.view(out_shape);
  }
  const int64_t lp4 = ceil_div(l, 4) * 4;
  at::Tensor xp = at::zeros({batch, M, lp4}, x.options());
  xp.narrow(2, 0, l).copy_(x3);
  at::Tensor out = at::empty(out_shape, x.options());
  cpu::dispatch_float(w.scalar_type(), "skinny_matmul", [&](auto tag) {
    using T = decltype(tag);
    transposed_kernel<T>(w3.data_ptr<T>(), M, N, batch, xp.data_ptr<float>(), lp4, l, out.data_ptr<float>());
  });
  return out;
}

LK_CPU_KERNELS(m) { m.impl("skinny_matmul", &skinny_matmul_cpu); }

}  // namespace

}  // namespace lowrank_kernels
