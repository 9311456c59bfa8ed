// CUDA kernels for NF4 and blockwise-8-bit storage. Element math comes from nf4_math.h, shared
// with the CPU kernels; this file is compiled with --fmad=false so results are bit-exact with
// the CPU path and bitsandbytes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lowrank_kernels/nf4_math.h"
#include "cuda_common.cuh"
#include "nf4_cuda.h"

namespace lowrank_kernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One warp per quantization block: a max-reduction, then each lane encodes pairs of elements
// into bytes. The trailing partial block divides by its clamped absmax, as on the CPU.
template <typename T>
__global__ void quantize_nf4_kernel(const T* __restrict__ x, int64_t numel, int64_t blocksize,
                                    uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  const int64_t block = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t first = block * blocksize;
  if (first >= numel) return;
  const int64_t count = numel - first < blocksize ? numel - first : blocksize;
  float m = 0.0f, probe = 0.0f;
  for (int64_t i = lane; i < count; i += kWarp) {
    const float v = load_float(x, first + i);
    m = fmaxf(m, abs_f(v));
    probe += nonfinite_probe(v);
  }
  probe = warp_sum(probe);
  m = probe == 0.0f ? warp_max(m) : probe;  // NaN absmax flags non-finite input
  const bool tail = count < blocksize;
  const float stored = tail ? nf4_tail_absmax(m) : m;
  const float reciprocal = nf4_block_reciprocal(m);
  if (lane == 0) absmax[block] = stored;
  for (int64_t j = lane; j < (count + 1) / 2; j += kWarp) {
    uint8_t codes[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int64_t i = 2 * j + k;
      if (i >= count)
        codes[k] = nf4_encode(0.0f);
      else if (tail)
        codes[k] = nf4_encode_tail_block(load_float(x, first + i), stored);
      else
        codes[k] = nf4_encode_full_block(load_float(x, first + i), reciprocal);
    }
    packed[first / 2 + j] = nf4_pack(codes[0], codes[1]);
  }
}

// Each thread decodes 8 consecutive elements (4 bytes, one 32-bit load) through a code table in
// shared memory. 8 divides every blocksize, so the 8 share one absmax.
template <typename T>
__global__ void dequantize_nf4_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                      int64_t numel, int64_t blocksize, T* __restrict__ out) {
  __shared__ float lut[kNF4Codes];
  if (threadIdx.x < kNF4Codes) lut[threadIdx.x] = nf4_code(threadIdx.x);
  __syncthreads();
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (first >= numel) return;
  const float scale = absmax[first / blocksize];
  if (first + 8 <= numel) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(packed + first / 2);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint8_t byte = static_cast<uint8_t>(word >> (8 * k));
      out[first + 2 * k] = store_float<T>(lut[byte >> 4] * scale);
      out[first + 2 * k + 1] = store_float<T>(lut[byte & 0xF] * scale);
    }
  } else {
    for (int64_t i = first; i < numel; ++i) out[i] = store_float<T>(lut[nf4_nibble(packed, i)] * scale);
  }
}

__global__ void quantize_blockwise8_kernel(const float* __restrict__ x, int64_t numel, const float* __restrict__ code,
                                           int64_t blocksize, uint8_t* __restrict__ q, float* __restrict__ absmax) {
  __shared__ float search_code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) search_code[i] = blockwise8_search_code(code, i);
  __syncthreads();
  const int64_t block = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t first = block * blocksize;
  if (first >= numel) return;
  const int64_t count = numel - first < blocksize ? numel - first : blocksize;
  float m = 0.0f;
  for (int64_t i = lane; i < count; i += kWarp) m = fmaxf(m, abs_f(x[first + i]));
  m = warp_max(m);
  if (lane == 0) absmax[block] = m;
  for (int64_t i = lane; i < count; i += kWarp) q[first + i] = blockwise8_encode(search_code, x[first + i] / m);
}

__global__ void dequantize_blockwise8_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                                             const float* __restrict__ code, int64_t numel, int64_t blocksize,
                                             float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < numel) out[i] = blockwise8_decode(code, q[i], absmax[i / blocksize]);
}

}  // namespace

void quantize_nf4(const void* x, FloatKind kind, int64_t numel, int64_t blocksize, uint8_t* packed, float* absmax,
                  cudaStream_t stream) {
  if (numel == 0) return;
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  dispatch_kind(kind, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    quantize_nf4_kernel<T><<<grid_for(blocks * kWarp, kThreads), kThreads, 0, stream>>>(static_cast<const T*>(x), numel,
                                                                                        blocksize, packed, absmax);
  });
}

void dequantize_nf4(const uint8_t* packed, const float* absmax, int64_t numel, int64_t blocksize, void* out,
                    FloatKind kind, cudaStream_t stream) {
  if (numel == 0) return;
  dispatch_kind(kind, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dequantize_nf4_kernel<T><<<grid_for((numel + 7) / 8, kThreads), kThreads, 0, stream>>>(
        packed, absmax, numel, blocksize, static_cast<T*>(out));
  });
}

void quantize_blockwise8(const float* x, int64_t numel, const float* code, int64_t blocksize, uint8_t* q, float* absmax,
                         cudaStream_t stream) {
  if (numel == 0) return;
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  quantize_blockwise8_kernel<<<grid_for(blocks * kWarp, kThreads), kThreads, 0, stream>>>(x, numel, code, blocksize, q,
                                                                                          absmax);
}

void dequantize_blockwise8(const uint8_t* q, const float* absmax, const float* code, int64_t numel, int64_t blocksize,
                           float* out, cudaStream_t stream) {
  if (numel == 0) return;
  dequantize_blockwise8_kernel<<<grid_for(numel, kThreads), kThreads, 0, stream>>>(q, absmax, code, numel, blocksize,
                                                                                   out);
}

}  // namespace lowrank_kernels::cuda
