// Per-element NF4 and blockwise-8-bit math shared by the CPU (C++) and CUDA kernels.
//
// Everything here is bit-exact with bitsandbytes 0.50 (CPU path); keep the operation order as
// written: the kernels are compiled without floating-point contraction (-ffp-contract=off,
// nvcc --fmad=false) so that `a * b + c` is never fused into an FMA behind our back.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LK_HOST_DEVICE inline
#endif

namespace lowrank_kernels {

constexpr int kNF4Codes = 16;
constexpr int kMaxBlocksize = 4096;

// Smallest divisor bitsandbytes uses when scaling a block (`absmax.clamp(min=1e-38)`).
constexpr float kMinAbsmax = 1e-38f;

// The 16 NF4 code values (QLoRA, Dettmers et al. 2023), index 0..15, as fp32 literals.
#define LK_NF4_C0 -1.0f
#define LK_NF4_C1 -0.6961928009986877f
#define LK_NF4_C2 -0.5250730514526367f
#define LK_NF4_C3 -0.39491748809814453f
#define LK_NF4_C4 -0.28444138169288635f
#define LK_NF4_C5 -0.18477343022823334f
#define LK_NF4_C6 -0.09105003625154495f
#define LK_NF4_C7 0.0f
#define LK_NF4_C8 0.07958029955625534f
#define LK_NF4_C9 0.16093020141124725f
#define LK_NF4_C10 0.24611230194568634f
#define LK_NF4_C11 0.33791524171829224f
#define LK_NF4_C12 0.44070982933044434f
#define LK_NF4_C13 0.5626170039176941f
#define LK_NF4_C14 0.7229568362236023f
#define LK_NF4_C15 1.0f

// Decision boundary between codes i and i+1: the fp32 midpoint, (c[i] + c[i+1]) / 2 rounded to
// fp32 exactly as bitsandbytes computes it (constant-folded in IEEE single precision).
#define LK_NF4_MID(a, b) ((LK_NF4_C##a + LK_NF4_C##b) * 0.5f)

LK_HOST_DEVICE float nf4_code(int index) {
  // A switch rather than a table: no __constant__/static array is needed on either side. The
  // hot loops use their own vector/shared-memory tables filled from this function.
  switch (index & 0xF) {
    case 0: return LK_NF4_C0;
    case 1: return LK_NF4_C1;
    case 2: return LK_NF4_C2;
    case 3: return LK_NF4_C3;
    case 4: return LK_NF4_C4;
    case 5: return LK_NF4_C5;
    case 6: return LK_NF4_C6;
    case 7: return LK_NF4_C7;
    case 8: return LK_NF4_C8;
    case 9: return LK_NF4_C9;
    case 10: return LK_NF4_C10;
    case 11: return LK_NF4_C11;
    case 12: return LK_NF4_C12;
    case 13: return LK_NF4_C13;
    case 14: return LK_NF4_C14;
    default: return LK_NF4_C15;
  }
}

// Nearest NF4 code of a value already scaled into [-1, 1]. A value exactly on a boundary takes
// the lower code (torch.bucketize(right=False), which bitsandbytes uses on CPU). Branch-free:
// the count of boundaries strictly below x, so it vectorises on the CPU.
LK_HOST_DEVICE uint8_t nf4_encode(float scaled) {
  int q = (scaled > LK_NF4_MID(0, 1)) + (scaled > LK_NF4_MID(1, 2)) + (scaled > LK_NF4_MID(2, 3)) +
          (scaled > LK_NF4_MID(3, 4)) + (scaled > LK_NF4_MID(4, 5)) + (scaled > LK_NF4_MID(5, 6)) +
          (scaled > LK_NF4_MID(6, 7)) + (scaled > LK_NF4_MID(7, 8)) + (scaled > LK_NF4_MID(8, 9)) +
          (scaled > LK_NF4_MID(9, 10)) + (scaled > LK_NF4_MID(10, 11)) + (scaled > LK_NF4_MID(11, 12)) +
          (scaled > LK_NF4_MID(12, 13)) + (scaled > LK_NF4_MID(13, 14)) + (scaled > LK_NF4_MID(14, 15));
  return static_cast<uint8_t>(q);
}

// 0 for a finite x, NaN for +-Inf or NaN: summed over a block it flags non-finite input without
// a branch (the kernels then store a NaN absmax, which the Python API reports as an error).
LK_HOST_DEVICE float nonfinite_probe(float x) { return x - x; }

LK_HOST_DEVICE float abs_f(float x) { return x < 0.0f ? -x : x; }

// Scale of a complete block: bitsandbytes multiplies by the reciprocal of the clamped absmax.
LK_HOST_DEVICE float nf4_block_reciprocal(float absmax) { return 1.0f / (absmax < kMinAbsmax ? kMinAbsmax : absmax); }

// A complete block element: bitsandbytes encodes clamp(x * (1 / max(absmax, 1e-38)), -1, 1).
// The clamp cannot change the code (every boundary lies inside (-1, 1)), so it is left out:
// that keeps the loop free of control flow and vectorisable.
LK_HOST_DEVICE uint8_t nf4_encode_full_block(float x, float reciprocal) { return nf4_encode(x * reciprocal); }

// The trailing partial block divides instead (and stores the clamped absmax).
LK_HOST_DEVICE uint8_t nf4_encode_tail_block(float x, float clamped_absmax) { return nf4_encode(x / clamped_absmax); }

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

// bitsandbytes' quantizer searches the dynamic code book with its first entry (-0.993) replaced
// by -1.0, so that every normed value in [-1, 1] has a left neighbour; kernels build such a
// "search code" with this, while the stored code book keeps the original first entry.
LK_HOST_DEVICE float blockwise8_search_code(const float* code, int i) { return i == 0 ? -1.0f : code[i]; }

// Index of the code value nearest to `normed` in the sorted 256-entry search code: the largest
// i with code[i] <= normed, moved one step right only if that neighbour is strictly closer.
LK_HOST_DEVICE uint8_t blockwise8_encode(const float* code, float normed) {
  int lo = 0, hi = 255;  // invariant: code[lo] <= normed (or lo == 0), code[hi + 1] > normed
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (code[mid] <= normed)
      lo = mid;
    else
      hi = mid - 1;
  }
  if (lo < 255) {
    const float dist_left = abs_f(normed - code[lo]);
    const float dist_right = abs_f(normed - code[lo + 1]);
    if (dist_right < dist_left) ++lo;
  }
  return static_cast<uint8_t>(lo);
}

LK_HOST_DEVICE float blockwise8_decode(const float* code, uint8_t q, float absmax) { return code[q] * absmax; }

}  // namespace lowrank_kernels
