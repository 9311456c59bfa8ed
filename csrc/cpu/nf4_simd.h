// CPU building blocks shared by the NF4 kernels (nf4_cpu.cpp) and the fused linear kernels
// (nf4_linear_cpu.cpp): dtype dispatch, element conversion, and NF4 decoding of runs of
// elements that lie in one quantization block (AVX2 in the avx2 and avx512 builds of the kernels,
// else scalar, both on the element math of nf4_math.h). Compiled once per ISA (isa.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "lowrank_kernels/nf4_math.h"
#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace cpu {
inline namespace LK_CPU_ISA_NAME {  // each ISA's copy of these inline helpers has its own symbols

// Calls f(T{}) with T the C++ type of a float32/float16/bfloat16 dtype.
template <typename F>
void dispatch_float(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, name, ": dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

// Element loads/stores in fp32, exactly as torch converts (bf16/fp16 -> fp32 is exact;
// fp32 -> bf16/fp16 rounds to nearest even).
template <typename T> inline float to_float(T v) { return static_cast<float>(v); }
template <typename T> inline T from_float(float v) { return static_cast<T>(v); }

#ifdef LK_HAVE_AVX2
// 8 16-bit floats (raw bits) widened exactly to fp32 (F16C).
inline __m256 widen8(__m128i bits, c10::Half) { return _mm256_cvtph_ps(bits); }
inline __m256 widen8(__m128i bits, c10::BFloat16) {
  // A bf16 is the high half of the fp32 with the same value: widen the bits and shift them up.
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// 8 consecutive elements as fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
template <typename T>
inline __m256 load8(const T* p) {
  return widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), T{});
}

inline float horizontal_sum(__m256 v) {
  const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

// The 8 lanes' sum, added in fp64.
inline double sum_as_double(__m256 v) {
  const __m256d wide = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                     _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(wide), _mm256_extractf128_pd(wide, 1));
  return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
}

inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
inline void store8(c10::Half* out, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store8(c10::BFloat16* out, __m256 v) {
  // Round to nearest even on the bit pattern (values are finite: inputs were checked).
  __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  bits = _mm256_srli_epi32(bits, 16);
  const __m128i packed16 =
      _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed16);
}

// The 16 NF4 codes as two 8-lane halves, for decode8's table lookup.
// (A user-written constructor: GCC compiles an implicit one without the ISA target of isa.h.)
struct NF4Table {
  __m256 lo, hi;
  NF4Table()
      : lo(_mm256_setr_ps(nf4_code(0), nf4_code(1), nf4_code(2), nf4_code(3), nf4_code(4), nf4_code(5),
                          nf4_code(6), nf4_code(7))),
        hi(_mm256_setr_ps(nf4_code(8), nf4_code(9), nf4_code(10), nf4_code(11), nf4_code(12), nf4_code(13),
                          nf4_code(14), nf4_code(15))) {}
};

// Table lookup of 8 nibbles, one per 32-bit lane, in a (scaled) 16-entry code table held as two
// 8-lane halves: vpermps reads only the low 3 bits of each lane, so `index` may carry garbage
// above them; `select_hi` holds the nibble's top bit in bit 31 (what blendv reads).
inline __m256 lookup8(__m256i index, __m256i select_hi, __m256 table_lo, __m256 table_hi) {
  const __m256 lo = _mm256_permutevar8x32_ps(table_lo, index);
  const __m256 hi = _mm256_permutevar8x32_ps(table_hi, index);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(select_hi));
}

// 8 elements (times `scale`) from 4 packed bytes, in natural order.
inline __m256 decode8(const uint8_t* bytes, const NF4Table& table, __m256 scale) {
  uint32_t word;
  std::memcpy(&word, bytes, 4);
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  __m256i nib = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
  return _mm256_mul_ps(lookup8(nib, _mm256_slli_epi32(nib, 28), table.lo, table.hi), scale);
}

// The 16 NF4 codes as four byte planes (byte j of each fp32 code), for vpshufb lookups.
struct NF4BytePlanes {
  __m256i plane[4];
  NF4BytePlanes() {
    alignas(32) uint8_t bytes[4][32];
    for (int i = 0; i < 32; ++i) {
      const float code = nf4_code(i % 16);
      uint8_t b[4];
      std::memcpy(b, &code, 4);
      for (int j = 0; j < 4; ++j) bytes[j][i] = b[j];
    }
    for (int j = 0; j < 4; ++j) plane[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[j]));
  }
};

// 32 NF4 codes (unscaled) from 16 packed bytes, in *split order*: out[g] holds columns
// 8g .. 8g+7 ordered 8g, 8g+2, 8g+4, 8g+6, 8g+1, 8g+3, 8g+5, 8g+7. Byte-shuffle lookups
// (vpshufb) of the code's four byte planes, reassembled by unpacks, cost far less than
// vpermps-based lookups; the order is the one the in-lane unpacks produce, and the fused
// kernels permute their activations to match (split_columns) instead of reordering here.
inline void decode32_split(const uint8_t* bytes, const NF4BytePlanes& codes, __m256 out[4]) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  // Lane 0: the high nibbles (even columns), lane 1: the low nibbles (odd columns).
  const __m256i index = _mm256_set_m128i(_mm_and_si128(packed, low4), _mm_and_si128(_mm_srli_epi16(packed, 4), low4));
  const __m256i b0 = _mm256_shuffle_epi8(codes.plane[0], index), b1 = _mm256_shuffle_epi8(codes.plane[1], index);
  const __m256i b2 = _mm256_shuffle_epi8(codes.plane[2], index), b3 = _mm256_shuffle_epi8(codes.plane[3], index);
  const __m256i low16_a = _mm256_unpacklo_epi8(b0, b1), high16_a = _mm256_unpacklo_epi8(b2, b3);
  const __m256i low16_b = _mm256_unpackhi_epi8(b0, b1), high16_b = _mm256_unpackhi_epi8(b2, b3);
  out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low16_a, high16_a));
  out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low16_a, high16_a));
  out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low16_b, high16_b));
  out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low16_b, high16_b));
}
#endif

#ifdef LK_HAVE_AVX512
// 16 consecutive fp32 values stored as T (the same roundings as store8).
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(c10::Half* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store16(c10::BFloat16* out, __m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(bits));
}

// The 16 NF4 codes in one register: vpermps on 16 lanes is the whole table lookup.
struct NF4Table16 {
  __m512 codes;
  NF4Table16()
      : codes(_mm512_setr_ps(nf4_code(0), nf4_code(1), nf4_code(2), nf4_code(3), nf4_code(4), nf4_code(5),
                             nf4_code(6), nf4_code(7), nf4_code(8), nf4_code(9), nf4_code(10), nf4_code(11),
                             nf4_code(12), nf4_code(13), nf4_code(14), nf4_code(15))) {}
};

// 16 elements (times `scale`) from 8 packed bytes, in natural order (high nibble first).
inline __m512 decode16(const uint8_t* bytes, const NF4Table16& table, __m512 scale) {
  const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i nibbles = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(packed, 4), low4), _mm_and_si128(packed, low4));
  return _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles), table.codes), scale);
}
#endif

// Decodes the `count` elements starting at flat index `first`, all in one quantization block
// with the given absmax, into dst[0 .. count). `first` may be odd (a run starting mid-byte).
template <typename T>
void decode_run(const uint8_t* packed, int64_t first, int64_t count, float absmax, T* dst) {
  int64_t i = 0;
  if ((first & 1) && count > 0) {
    dst[0] = from_float<T>(nf4_decode(nf4_nibble(packed, first), absmax));
    i = 1;
  }
#ifdef LK_HAVE_AVX512
  const NF4Table16 table16;
  const __m512 scale16 = _mm512_set1_ps(absmax);
  for (; i + 16 <= count; i += 16) store16(dst + i, decode16(packed + (first + i) / 2, table16, scale16));
#endif
#ifdef LK_HAVE_AVX2
  const NF4Table table;
  const __m256 scale = _mm256_set1_ps(absmax);
  for (; i + 8 <= count; i += 8) store8(dst + i, decode8(packed + (first + i) / 2, table, scale));
#endif
  for (; i < count; ++i) dst[i] = from_float<T>(nf4_decode(nf4_nibble(packed, first + i), absmax));
}

// Calls f(col, count, first, absmax) for each run of row `row` of an NF4 matrix [rows, cols]
// that lies in one quantization block: columns [col, col + count), flat indices from `first`.
template <typename F>
inline void for_each_block_run(int64_t row, int64_t cols, int64_t blocksize, const float* absmax, F&& f) {
  const int64_t row_first = row * cols, row_end = row_first + cols;
  int64_t block = row_first / blocksize;  // one division per row: it costs as much as a run's decode
  for (int64_t i = row_first; i < row_end; ++block) {
    const int64_t stop = std::min(row_end, (block + 1) * blocksize);
    f(i - row_first, stop - i, i, absmax[block]);
    i = stop;
  }
}

// Row `row` of the NF4 matrix [rows, cols], dequantized into dst[0 .. cols).
template <typename T>
void decode_row(const uint8_t* packed, const float* absmax, int64_t row, int64_t cols, int64_t blocksize, T* dst) {
  for_each_block_run(row, cols, blocksize, absmax, [&](int64_t col, int64_t count, int64_t first, float a) {
    decode_run(packed, first, count, a, dst + col);
  });
}

// Split order of a row whose length is a multiple of 8 (see decode32_split): within each group
// of 8 columns, the even ones first, then the odd ones. merge_columns inverts it.
inline void split_columns(const float* src, int64_t cols, float* dst) {
  for (int64_t g = 0; g < cols; g += 8)
    for (int j = 0; j < 4; ++j) {
      dst[g + j] = src[g + 2 * j];
      dst[g + 4 + j] = src[g + 2 * j + 1];
    }
}

inline void merge_columns(const float* src, int64_t cols, float* dst) {
  for (int64_t g = 0; g < cols; g += 8)
    for (int j = 0; j < 4; ++j) {
      dst[g + 2 * j] = src[g + j];
      dst[g + 2 * j + 1] = src[g + 4 + j];
    }
}

}  // namespace LK_CPU_ISA_NAME
}  // namespace cpu
}  // namespace lowrank_kernels
