// CUDA kernel of the few-token (decode) fused NF4 linear:
//   y = x @ W^T + scale * lowrank_x @ up^T (+ bias),   W [rows, cols] in NF4,
// accumulated in fp32 and rounded once (round-to-nearest-even) to the activation dtype.
// The NF4 element math (code values, nibble order, weight of element (row, col)) comes from the
// shared headers, which the CPU kernels and tests exercise.
//
// A warp computes kRowsPerWarp output rows for a group of up to kMaxTokens tokens, the partial
// sums in registers; lanes split the columns, a shuffle reduction joins them. The low-rank term
// is added by the same lanes before that reduction.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "lowrank_kernels/nf4_linear_math.h"
#include "cuda_common.cuh"
#include "nf4_linear_cuda.h"

namespace lowrank_kernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
// Two rows per warp: each x value a lane loads and converts feeds both rows, halving the x
// traffic through L1, which at several tokens is many times the weight traffic from DRAM.
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kRowsPerWarp * kWarpsPerBlock;
// Tokens per launch group, accumulated in registers: the dispatch sends up to this many here.
constexpr int kMaxTokens = static_cast<int>(kCudaGemvMaxTokens);
// Vectorised path: one 16-byte load of packed is 32 elements. A 32-aligned run of 32 elements
// never straddles a quantization block (every blocksize is a multiple of 32), so one absmax
// scales the whole chunk.
constexpr int kChunk = 32;
constexpr int kWordsPerChunk = 4;
constexpr int64_t kMaxGridY = 65535;  // CUDA limit on gridDim.y; blockIdx.y strides beyond it

static_assert(kRowsPerWarp * kMaxTokens <= kWarp, "each output of a warp is stored by its own lane");

// 8 consecutive values from a 16-byte aligned address, as fp32.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 lo = *reinterpret_cast<const float4*>(p);
  const float4 hi = *reinterpret_cast<const float4*>(p + 4);
  v[0] = lo.x;
  v[1] = lo.y;
  v[2] = lo.z;
  v[3] = lo.w;
  v[4] = hi.x;
  v[5] = hi.y;
  v[6] = hi.z;
  v[7] = hi.w;
}

// Two 16-bit floats widened exactly to fp32.
__device__ __forceinline__ float2 widen2(__half2 pair) { return __half22float2(pair); }
__device__ __forceinline__ float2 widen2(__nv_bfloat162 pair) { return __bfloat1622float2(pair); }

// 8 consecutive 16-bit floats (T = __half or __nv_bfloat16) from a 16-byte aligned address, as fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
  const uint4 bits = *reinterpret_cast<const uint4*>(p);
  const Pair* pairs = reinterpret_cast<const Pair*>(&bits);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = widen2(pairs[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The dot products below use explicit fmaf: --fmad=false (which keeps the quantizers bit-exact)
// only forbids implicit contraction, and a dot product has no bit-exact target anyway (its
// summation order differs between devices); the fused form is faster and rounds less.

// Vectorised path (cols % 32 == 0, packed and x 16-byte aligned): lane-strided 32-element chunks.
// The codes of a chunk are summed against x unscaled, then multiplied by the chunk's absmax once.
template <typename T, int kTokens>
__device__ __forceinline__ void accumulate_chunks(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                                  const float* __restrict__ absmax, int block_shift,
                                                  const int64_t (&row)[kRowsPerWarp], int64_t cols, const float* lut,
                                                  int lane, float (&acc)[kRowsPerWarp][kTokens]) {
  const int64_t chunks = cols / kChunk;
  for (int64_t c = lane; c < chunks; c += kWarp) {
    uint4 bits[kRowsPerWarp];
    float chunk_absmax[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t first = row[r] * cols + c * kChunk;  // even, and a multiple of 32
      bits[r] = *reinterpret_cast<const uint4*>(packed + first / 2);
      chunk_absmax[r] = absmax[first >> block_shift];
    }
    float dot[kRowsPerWarp][kTokens] = {};
#pragma unroll
    for (int word = 0; word < kWordsPerChunk; ++word) {
      float w[kRowsPerWarp][8];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const uint32_t packed_word = word_of(bits[r], word);
#pragma unroll
        for (int j = 0; j < 8; ++j) w[r][j] = lut[nf4_word_nibble(packed_word, j)];
      }
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        float xv[8];
        load8(x + t * cols + c * kChunk + word * 8, xv);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
          for (int j = 0; j < 8; ++j) dot[r][t] = fmaf(w[r][j], xv[j], dot[r][t]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int t = 0; t < kTokens; ++t) acc[r][t] = fmaf(dot[r][t], chunk_absmax[r], acc[r][t]);
    }
  }
}

// General path (any cols, blocks straddling rows, rows starting mid-byte): one element per lane
// per step through the shared nf4_weight.
template <typename T, int kTokens>
__device__ __forceinline__ void accumulate_elements(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                                    const float* __restrict__ absmax, int64_t blocksize,
                                                    const int64_t (&row)[kRowsPerWarp], int64_t cols, int lane,
                                                    float (&acc)[kRowsPerWarp][kTokens]) {
  for (int64_t k = lane; k < cols; k += kWarp) {
    float w[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) w[r] = nf4_weight(packed, absmax, row[r], k, cols, blocksize);
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      const float xv = load_float(x, t * cols + k);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[r][t] = fmaf(w[r], xv, acc[r][t]);
    }
  }
}

// scale * lowrank_x @ up^T, lanes over the rank, added to the per-lane partial sums.
template <typename T, int kTokens>
__device__ __forceinline__ void accumulate_lowrank(const T* __restrict__ lowrank_x, const T* __restrict__ up,
                                                   int64_t rank, float scale, const int64_t (&row)[kRowsPerWarp],
                                                   int lane, float (&acc)[kRowsPerWarp][kTokens]) {
  for (int64_t j = lane; j < rank; j += kWarp) {
    float u[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) u[r] = load_float(up, row[r] * rank + j);
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      const float scaled = scale * load_float(lowrank_x, t * rank + j);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[r][t] = fmaf(scaled, u[r], acc[r][t]);
    }
  }
}

// grid (ceil(rows / kRowsPerBlock), min(groups, 65535)), block kThreads. blockIdx.y strides over
// the `groups` groups of kTokens tokens; x, lowrank_x and y start at the first group's first token.
// fp32 instances ask for 2 resident blocks per SM (<= 255 registers, the same cap as 1, but
// another allocation heuristic): with only the block size, ptxas 13.0 gave <float, 4, true> 96
// registers on sm_80 and spilled 8 B. bf16/fp16 pass 0, no minimum, as if omitted (<= 144
// registers, 3 blocks per SM; an explicit 1 raised them to 182-191). make gpu-fit checks every
// instance for spills.
template <typename T, int kTokens, bool kVectorised>
__global__ void __launch_bounds__(kThreads, std::is_same_v<T, float> ? 2 : 0)
    nf4_lowrank_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                            const float* __restrict__ absmax, int64_t blocksize, int block_shift, int64_t rows,
                            int64_t cols, const T* __restrict__ lowrank_x, const T* __restrict__ up, int64_t rank,
                            float scale, const T* __restrict__ bias, int64_t groups, T* __restrict__ y) {
  __shared__ float lut[kNF4Codes];
  if (threadIdx.x < kNF4Codes) lut[threadIdx.x] = nf4_code(threadIdx.x);
  __syncthreads();

  const int lane = threadIdx.x % kWarp;
  const int64_t first_row = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp) * kRowsPerWarp;
  if (first_row >= rows) return;  // a whole warp leaves: the shuffles below keep all 32 lanes
  // A row past the end repeats the last row, which keeps the loops free of row checks; its sums
  // are not stored.
  int64_t row[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) row[r] = first_row + r < rows ? first_row + r : rows - 1;

  for (int64_t group = blockIdx.y; group < groups; group += gridDim.y) {
    const int64_t token0 = group * kTokens;
    float acc[kRowsPerWarp][kTokens] = {};
    if constexpr (kVectorised) {
      accumulate_chunks<T, kTokens>(x + token0 * cols, packed, absmax, block_shift, row, cols, lut, lane, acc);
    } else {
      accumulate_elements<T, kTokens>(x + token0 * cols, packed, absmax, blocksize, row, cols, lane, acc);
    }
    accumulate_lowrank<T, kTokens>(lowrank_x + token0 * rank, up, rank, scale, row, lane, acc);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        float total = warp_sum(acc[r][t]);
        if (lane == r * kTokens + t && first_row + r < rows) {
          if (bias != nullptr) total += load_float(bias, row[r]);
          y[(token0 + t) * rows + row[r]] = store_float<T>(total);
        }
      }
    }
  }
}

// The launch inputs, type-erased (see nf4_linear_cuda.h for shapes).
struct Gemv {
  const void* x;
  const uint8_t* packed;
  const float* absmax;
  int64_t blocksize;
  int64_t rows, cols;
  const void* lowrank_x;
  const void* up;
  int64_t rank;
  float scale;
  const void* bias;
  void* y;
};

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int log2_of_power_of_two(int64_t v) {
  int shift = 0;
  while ((int64_t{1} << shift) < v) ++shift;
  return shift;
}

// `groups` groups of kTokens tokens starting at token `token0`.
template <typename T, int kTokens>
void launch(const Gemv& g, int64_t token0, int64_t groups, cudaStream_t stream) {
  const T* x = static_cast<const T*>(g.x) + token0 * g.cols;
  const T* lowrank_x = static_cast<const T*>(g.lowrank_x) + token0 * g.rank;
  T* y = static_cast<T*>(g.y) + token0 * g.rows;
  const T* up = static_cast<const T*>(g.up);
  const T* bias = static_cast<const T*>(g.bias);
  const dim3 grid(static_cast<unsigned>((g.rows + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(groups < kMaxGridY ? groups : kMaxGridY));
  const int block_shift = log2_of_power_of_two(g.blocksize);
  // Every row then starts on a 16-byte boundary of packed and of x (cols / 2 bytes is a multiple
  // of 16), so each chunk is a single aligned vector load.
  if (g.cols % kChunk == 0 && aligned16(g.packed) && aligned16(x)) {
    nf4_lowrank_gemv_kernel<T, kTokens, true><<<grid, kThreads, 0, stream>>>(x, g.packed, g.absmax, g.blocksize,
                                                                             block_shift, g.rows, g.cols, lowrank_x, up,
                                                                             g.rank, g.scale, bias, groups, y);
  } else {
    nf4_lowrank_gemv_kernel<T, kTokens, false><<<grid, kThreads, 0, stream>>>(x, g.packed, g.absmax, g.blocksize,
                                                                              block_shift, g.rows, g.cols, lowrank_x,
                                                                              up, g.rank, g.scale, bias, groups, y);
  }
}

// Calls f(std::integral_constant<int, count>{}) for a runtime count in [1, kMaxTokens).
template <typename F>
void with_token_count(int64_t count, F&& f) {
  switch (count) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    default: f(std::integral_constant<int, 7>{}); break;
  }
}
static_assert(kMaxTokens == 8, "with_token_count covers the remainders 1..kMaxTokens-1");

}  // namespace

void nf4_lowrank_gemv(const void* x, FloatKind kind, const uint8_t* packed, const float* absmax, int64_t blocksize,
                      int64_t tokens, int64_t rows, int64_t cols, const void* lowrank_x, const void* up, int64_t rank,
                      float scale, const void* bias, void* y, cudaStream_t stream) {
  if (tokens == 0 || rows == 0) return;
  const Gemv g{x, packed, absmax, blocksize, rows, cols, lowrank_x, up, rank, scale, bias, y};
  // Whole groups of kMaxTokens in one launch, then at most one launch for the remaining tokens,
  // each with its exact token count compiled in (a decode step of M <= 8 is a single launch).
  const int64_t full_groups = tokens / kMaxTokens, rest = tokens % kMaxTokens;
  dispatch_kind(kind, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (full_groups > 0) launch<T, kMaxTokens>(g, 0, full_groups, stream);
    if (rest > 0) {
      with_token_count(rest,
                       [&](auto count) { launch<T, decltype(count)::value>(g, full_groups * kMaxTokens, 1, stream); });
    }
  });
}

}  // namespace lowrank_kernels::cuda
