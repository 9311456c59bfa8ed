// The split-order NF4 decoder of the fused linear's decode kernels (nf4_linear_cpu.cpp), one per
// ISA, and the fp32 vector operations those kernels are written in.
//
// SplitDecoder turns 16 packed bytes (32 codes, unscaled) into kSplitVectors registers of
// SplitVec in *split order*: within each group of kSplitGroup columns, the even columns first,
// then the odd ones (the high nibbles of a group's bytes, then the low ones). That is the order
// the cheapest lookups produce; the kernels permute their activations to match (split_columns)
// and their grad-input results back (merge_columns) instead of reordering the codes.
//   AVX-512: one vpermps over the 16 codes per 16 lanes, indexed by the zero-extended bytes
//            (vpermps reads only the low 4 bits of each index lane), group 32.
//   AVX2:    vpshufb lookups of the codes' four byte planes, reassembled by in-lane unpacks,
//            group 8 (far cheaper than vpermps-based lookups on 8 lanes).
// Without AVX2 there is no split decoder (kHaveSplitDecode is false). Compiled once per ISA (isa.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "lowrank_kernels/nf4_math.h"
#include "horizontal_sum.h"  // project SIMD headers after the library ones: they start the ISA target
#include "nf4_decode.h"
#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace cpu {
inline namespace LK_CPU_ISA_NAME {  // each ISA's copy of these inline helpers has its own symbols

#if defined(LK_HAVE_AVX512)
constexpr bool kHaveSplitDecode = true;
constexpr int kSplitGroup = 32;
constexpr int kSplitVectors = 2;
using SplitVec = __m512;

inline __m512 vzero() { return _mm512_setzero_ps(); }
inline __m512 vbroadcast(float a) { return _mm512_set1_ps(a); }
inline __m512 vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline __m512 vadd(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline __m512 vmul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
inline __m512 vfmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(__m512 v) { return _mm512_reduce_add_ps(v); }

struct SplitDecoder {
  NF4Table16 table;
  void operator()(const uint8_t* bytes, __m512 out[2]) const {
    const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    out[0] = _mm512_permutexvar_ps(_mm512_srli_epi32(index, 4), table.codes);  // high nibbles: even columns
    out[1] = _mm512_permutexvar_ps(index, table.codes);                        // low nibbles: odd columns
  }
};
#elif defined(LK_HAVE_AVX2)
constexpr bool kHaveSplitDecode = true;
constexpr int kSplitGroup = 8;
constexpr int kSplitVectors = 4;
using SplitVec = __m256;

inline __m256 vzero() { return _mm256_setzero_ps(); }
inline __m256 vbroadcast(float a) { return _mm256_set1_ps(a); }
inline __m256 vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline __m256 vadd(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 vmul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 vfmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(__m256 v) { return horizontal_sum(v); }

// The 16 NF4 codes as four byte planes (byte j of each fp32 code), both 128-bit lanes alike.
struct SplitDecoder {
  __m256i plane[4];
  SplitDecoder() {
    alignas(32) uint8_t bytes[4][32];
    for (int i = 0; i < 32; ++i) {
      const float code = nf4_code(i % 16);
      uint8_t b[4];
      std::memcpy(b, &code, 4);
      for (int j = 0; j < 4; ++j) bytes[j][i] = b[j];
    }
    for (int j = 0; j < 4; ++j) plane[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[j]));
  }
  void operator()(const uint8_t* bytes, __m256 out[4]) const {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    // Lane 0: the high nibbles (even columns), lane 1: the low nibbles (odd columns).
    const __m256i index = _mm256_set_m128i(_mm_and_si128(packed, low4), _mm_and_si128(_mm_srli_epi16(packed, 4), low4));
    const __m256i b0 = _mm256_shuffle_epi8(plane[0], index), b1 = _mm256_shuffle_epi8(plane[1], index);
    const __m256i b2 = _mm256_shuffle_epi8(plane[2], index), b3 = _mm256_shuffle_epi8(plane[3], index);
    const __m256i low16_a = _mm256_unpacklo_epi8(b0, b1), high16_a = _mm256_unpacklo_epi8(b2, b3);
    const __m256i low16_b = _mm256_unpackhi_epi8(b0, b1), high16_b = _mm256_unpackhi_epi8(b2, b3);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low16_a, high16_a));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low16_a, high16_a));
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low16_b, high16_b));
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low16_b, high16_b));
  }
};
#else
constexpr bool kHaveSplitDecode = false;
constexpr int kSplitGroup = 8;  // unused: no split decoder
#endif

// Split order of a row whose length is a multiple of kSplitGroup: within each group, the even
// columns first, then the odd ones. merge_columns inverts it.
inline void split_columns(const float* src, int64_t cols, float* dst) {
  constexpr int half = kSplitGroup / 2;
  for (int64_t g = 0; g < cols; g += kSplitGroup)
    for (int j = 0; j < half; ++j) {
      dst[g + j] = src[g + 2 * j];
      dst[g + half + j] = src[g + 2 * j + 1];
    }
}

inline void merge_columns(const float* src, int64_t cols, float* dst) {
  constexpr int half = kSplitGroup / 2;
  for (int64_t g = 0; g < cols; g += kSplitGroup)
    for (int j = 0; j < half; ++j) {
      dst[g + 2 * j] = src[g + j];
      dst[g + 2 * j + 1] = src[g + half + j];
    }
}

}  // namespace LK_CPU_ISA_NAME
}  // namespace cpu
}  // namespace lowrank_kernels
