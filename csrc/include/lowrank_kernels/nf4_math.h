// Per-element NF4 and blockwise-8-bit math shared by the CPU (C++) and CUDA kernels.
//
// Everything here is bit-exact with bitsandbytes 0.50 (CPU path); keep the operation order as
// written: the kernels are compiled without floating-point contraction (-ffp-contract=off,
// nvcc --fmad=false) so that `a * b + c` is never fused into an FMA behind our back.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#define LK_UNROLL _Pragma("unroll")
#else
#define LK_HOST_DEVICE inline
#define LK_UNROLL _Pragma("GCC unroll 16")
#endif

namespace lowrank_kernels {

constexpr int kNF4Codes = 16;
constexpr int kMaxBlocksize = 4096;

// Smallest divisor bitsandbytes uses when scaling a block (`absmax.clamp(min=1e-38)`).
constexpr float kMinAbsmax = 1e-38f;

LK_HOST_DEVICE float nf4_code(int index) {
  // A switch compiles to a constant-table load on both host and device and needs no
  // __constant__ memory declaration.
  switch (index & 0xF) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

// Decision boundary between code i and code i+1: the fp32 midpoint, computed exactly as
// bitsandbytes does ((c[i] + c[i+1]) / 2 in fp32).
LK_HOST_DEVICE float nf4_boundary(int i) { return (nf4_code(i) + nf4_code(i + 1)) * 0.5f; }

// Nearest NF4 code of a value already scaled into [-1, 1]. A value exactly on a boundary takes
// the lower code (torch.bucketize(right=False) semantics, which bitsandbytes uses on CPU).
// Branch-free: the count of boundaries strictly below x.
LK_HOST_DEVICE uint8_t nf4_encode(float scaled) {
  int q = 0;
  LK_UNROLL
  for (int i = 0; i < kNF4Codes - 1; ++i) q += scaled > nf4_boundary(i) ? 1 : 0;
  return static_cast<uint8_t>(q);
}

LK_HOST_DEVICE float abs_f(float x) { return x < 0.0f ? -x : x; }

LK_HOST_DEVICE float clamp_unit(float x) { return x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x); }

// Scale of a complete block: bitsandbytes multiplies by the reciprocal of the clamped absmax.
LK_HOST_DEVICE float nf4_block_reciprocal(float absmax) {
  return 1.0f / (absmax < kMinAbsmax ? kMinAbsmax : absmax);
}

// A complete block element: clamp(x * (1 / max(absmax, 1e-38)), -1, 1).
LK_HOST_DEVICE uint8_t nf4_encode_full_block(float x, float reciprocal) {
  return nf4_encode(clamp_unit(x * reciprocal));
}

// The trailing partial block divides instead (and stores the clamped absmax).
LK_HOST_DEVICE uint8_t nf4_encode_tail_block(float x, float clamped_absmax) {
  return nf4_encode(clamp_unit(x / clamped_absmax));
}

LK_HOST_DEVICE float nf4_tail_absmax(float absmax) { return absmax < kMinAbsmax ? kMinAbsmax : absmax; }

// Two codes per byte, first element in the high nibble.
LK_HOST_DEVICE uint8_t nf4_pack(uint8_t first, uint8_t second) {
  return static_cast<uint8_t>((first << 4) | (second & 0xF));
}

LK_HOST_DEVICE float nf4_decode(uint8_t nibble, float absmax) { return nf4_code(nibble) * absmax; }

// Element i of a flat NF4 array: the nibble, then the value.
LK_HOST_DEVICE uint8_t nf4_nibble(const uint8_t* packed, int64_t i) {
  const uint8_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 0xF) : (byte >> 4);
}

// ---- blockwise 8-bit ("dynamic" map) quantization, used for double-quant statistics ----

// Index of the code value nearest to `normed` in the sorted 256-entry `code`. bitsandbytes'
// CPU kernel finds the largest i with code[i] <= normed (code[0] is forced to -1.0) and moves
// one step right only if that is strictly closer.
LK_HOST_DEVICE uint8_t blockwise8_encode(const float* code, float normed) {
  int lo = 0, hi = 255;  // invariant: code[lo] <= normed (or lo == 0), code[hi + 1] > normed
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (code[mid] <= normed) lo = mid; else hi = mid - 1;
  }
  if (lo < 255) {
    const float dist_left = abs_f(normed - code[lo]);
    const float dist_right = abs_f(normed - code[lo + 1]);
    if (dist_right < dist_left) ++lo;
  }
  return static_cast<uint8_t>(lo);
}

LK_HOST_DEVICE float blockwise8_decode(const float* code, uint8_t q, float absmax) {
  return code[q] * absmax;
}

}  // namespace lowrank_kernels
