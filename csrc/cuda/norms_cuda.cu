// CUDA kernels of row_col_sq_norms: squared row and column norms of W [batch, m, n], reading W
// once, accumulated in fp32.
//
// Pass 1, tile kernel: one thread block per tile of kRows x kNormColsPerBlock of one matrix.
// Thread t owns the tile columns t, t + 256, t + 512, t + 768 (a warp's loads of a row are
// coalesced) and walks the tile's rows, adding each square to its column's sum and to that
// row's sum: kRows + kColsPerThread register accumulators, and a fully unrolled loop whose
// loads are all independent, so many are in flight per thread. The row sums are then reduced
// across the block: a reduce-scatter inside each warp (lane l ends with row l's total over the
// warp, 31 shuffles for 32 rows) and the warps' totals summed in warp order through shared
// memory. The tile's row sums go to row_partial[b, col_block, rows], its column sums to
// col_partial[b, row_block, cols]; a matrix that is one tile wide (or tall) writes its row
// (column) sums straight into the result.
// Pass 2, reduce kernel: the partials summed over the block axis, sequentially in block order.
// No atomics: the result is deterministic. Squares are accumulated with fmaf (one rounding per
// term; the file is compiled with --fmad=false, so nothing else is contracted behind our back).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda_common.cuh"
#include "norms_cuda.h"

namespace lowrank_kernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kRows = static_cast<int>(kNormRowsPerBlock);
constexpr int kColsPerThread = static_cast<int>(kNormColsPerBlock) / kThreads;
static_assert(kRows == kWarp, "the warp reduce-scatter leaves row l's sum in lane l");
static_assert(kColsPerThread * kThreads == kNormColsPerBlock, "a tile's columns split evenly over the threads");

// One step of warp_reduce_scatter: v[0 .. 2 HALF) -> v[0 .. HALF). A lane keeps the half its
// lane bit HALF selects and adds its partner's (lane ^ HALF) copy of that half.
template <int HALF>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[kWarp], int lane) {
  const bool upper = (lane & HALF) != 0;
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    const float send = upper ? v[i] : v[i + HALF];
    const float keep = upper ? v[i + HALF] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, HALF);
  }
}

// v[0 .. 32) in every lane -> lane l returns the sum over the warp's lanes of their v[l]
// (after the five steps, a lane's v[0] stands for index l). Steps with compile-time widths keep
// v in registers.
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[kWarp], int lane) {
  reduce_scatter_step<16>(v, lane);
  reduce_scatter_step<8>(v, lane);
  reduce_scatter_step<4>(v, lane);
  reduce_scatter_step<2>(v, lane);
  reduce_scatter_step<1>(v, lane);
  return v[0];
}

// One tile of W [batch, m, n]: row sums -> row_out[b, cb, rows] ([batch, col_blocks, m]),
// column sums -> col_out[b, rb, cols] ([batch, row_blocks, n]).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    norms_tile_kernel(const T* __restrict__ w, int64_t m, int64_t n, int64_t row_blocks, int64_t col_blocks,
                      float* __restrict__ row_out, float* __restrict__ col_out) {
  const int64_t tile = blockIdx.x;
  const int64_t cb = tile % col_blocks, rb = tile / col_blocks % row_blocks, b = tile / (col_blocks * row_blocks);
  const int64_t row0 = rb * kRows, col0 = cb * kNormColsPerBlock + threadIdx.x;
  const int64_t rows_here = m - row0 < kRows ? m - row0 : kRows;
  const T* tile_w = w + (b * m + row0) * n;

  float row_acc[kRows], col_acc[kColsPerThread];
#pragma unroll
  for (int r = 0; r < kRows; ++r) row_acc[r] = 0.0f;
#pragma unroll
  for (int k = 0; k < kColsPerThread; ++k) col_acc[k] = 0.0f;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      const int64_t col = col0 + k * kThreads;
      const float x = r < rows_here && col < n ? load_float(tile_w, r * n + col) : 0.0f;
      row_acc[r] = fmaf(x, x, row_acc[r]);
      col_acc[k] = fmaf(x, x, col_acc[k]);
    }
  }

  float* col_dst = col_out + (b * row_blocks + rb) * n;
#pragma unroll
  for (int k = 0; k < kColsPerThread; ++k) {
    const int64_t col = col0 + k * kThreads;
    if (col < n) col_dst[col] = col_acc[k];
  }

  __shared__ float warp_rows[kWarps][kRows];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  warp_rows[warp][lane] = warp_reduce_scatter(row_acc, lane);
  __syncthreads();
  if (threadIdx.x < rows_here) {
    float sum = warp_rows[0][threadIdx.x];
#pragma unroll
    for (int i = 1; i < kWarps; ++i) sum += warp_rows[i][threadIdx.x];
    row_out[(b * col_blocks + cb) * m + row0 + threadIdx.x] = sum;
  }
}

// out[b, l] = sum over p = 0, 1, ... (in order) of partial[b, p, l], partial [batch, parts, len].
__global__ void sum_parts_kernel(const float* __restrict__ partial, int64_t batch, int64_t parts, int64_t len,
                                 float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * len) return;
  const float* p = partial + i / len * parts * len + i % len;
  float sum = 0.0f;
  for (int64_t part = 0; part < parts; ++part) sum += p[part * len];
  out[i] = sum;
}

}  // namespace

void row_col_sq_norms(const void* w, FloatKind kind, int64_t batch, int64_t m, int64_t n, float* row_partial,
                      float* col_partial, float* rows, float* cols, cudaStream_t stream) {
  if (batch == 0) return;
  const int64_t row_blocks = norm_row_blocks(m), col_blocks = norm_col_blocks(n);
  float* row_out = col_blocks == 1 ? rows : row_partial;
  float* col_out = row_blocks == 1 ? cols : col_partial;
  dispatch_kind(kind, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    norms_tile_kernel<T><<<static_cast<unsigned>(batch * row_blocks * col_blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(w), m, n, row_blocks, col_blocks, row_out, col_out);
  });
  if (col_blocks > 1)
    sum_parts_kernel<<<grid_for(batch * m, kThreads), kThreads, 0, stream>>>(row_partial, batch, col_blocks, m, rows);
  if (row_blocks > 1)
    sum_parts_kernel<<<grid_for(batch * n, kThreads), kThreads, 0, stream>>>(col_partial, batch, row_blocks, n, cols);
}

}  // namespace lowrank_kernels::cuda
