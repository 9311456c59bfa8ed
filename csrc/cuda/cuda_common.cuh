// Device helpers shared by the CUDA kernel files (*.cu; no torch headers): fp32 loads/stores of
// the three float kinds, the FloatKind -> element type dispatch, 1-D grid sizing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "float_kind.h"

namespace lowrank_kernels::cuda {

template <typename T>
__device__ __forceinline__ float load_float(const T* p, int64_t i);
template <>
__device__ __forceinline__ float load_float(const float* p, int64_t i) {
  return p[i];
}
template <>
__device__ __forceinline__ float load_float(const __half* p, int64_t i) {
  return __half2float(p[i]);
}
template <>
__device__ __forceinline__ float load_float(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

// fp32 -> T, rounding to nearest even.
template <typename T>
__device__ __forceinline__ T store_float(float v);
template <>
__device__ __forceinline__ float store_float(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half store_float(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_float(float v) {
  return __float2bfloat16_rn(v);
}

// Calls f(static_cast<T*>(nullptr)) with T the element type of `kind`.
template <typename F>
void dispatch_kind(FloatKind kind, F&& f) {
  switch (kind) {
    case FloatKind::kFloat32: f(static_cast<float*>(nullptr)); break;
    case FloatKind::kFloat16: f(static_cast<__half*>(nullptr)); break;
    case FloatKind::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

// Blocks of `threads` covering `work_items`.
inline unsigned grid_for(int64_t work_items, int threads) {
  return static_cast<unsigned>((work_items + threads - 1) / threads);
}

}  // namespace lowrank_kernels::cuda
