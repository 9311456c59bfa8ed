// NF4 decoding for the CPU kernels of the NF4 ops (nf4_cpu.cpp) and the fused linear
// (nf4_linear_cpu.cpp): runs of elements that lie in one quantization block decoded by table
// lookups (AVX2 in the avx2 and avx512 builds of the kernels, AVX-512 in the avx512 one, else
// scalar, all on the element math of nf4_math.h) and row walks by quantization block. The fused
// kernels' split-order decoder is in nf4_split_decode.h. Compiled once per ISA (isa.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "lowrank_kernels/nf4_math.h"
#include "float_convert.h"  // project SIMD headers after the library ones: they start the ISA target
#include "isa.h"            // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace cpu {
inline namespace LK_CPU_ISA_NAME {  // each ISA's copy of these inline helpers has its own symbols

#ifdef LK_HAVE_AVX2
// The 16 NF4 codes as two 8-lane halves, for decode8's table lookup.
// (A user-written constructor: GCC compiles an implicit one without the ISA target of isa.h.)
struct NF4Table {
  __m256 lo, hi;
  NF4Table()
      : lo(_mm256_setr_ps(nf4_code(0), nf4_code(1), nf4_code(2), nf4_code(3), nf4_code(4), nf4_code(5), nf4_code(6),
                          nf4_code(7))),
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

#endif

#ifdef LK_HAVE_AVX512
// The 16 NF4 codes in one register: vpermps on 16 lanes is the whole table lookup.
struct NF4Table16 {
  __m512 codes;
  NF4Table16()
      : codes(_mm512_setr_ps(nf4_code(0), nf4_code(1), nf4_code(2), nf4_code(3), nf4_code(4), nf4_code(5), nf4_code(6),
                             nf4_code(7), nf4_code(8), nf4_code(9), nf4_code(10), nf4_code(11), nf4_code(12),
                             nf4_code(13), nf4_code(14), nf4_code(15))) {}
};

// 16 elements (times `scale`) from 8 packed bytes, in natural order (high nibble first).
inline __m512 decode16(const uint8_t* bytes, const NF4Table16& table, __m512 scale) {
  const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i nibbles =
      _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(packed, 4), low4), _mm_and_si128(packed, low4));
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

// Calls f(col, count, first, absmax) for each run of columns [begin, end) of row `row` of an NF4
// matrix [rows, cols] that lies in one quantization block: columns [col, col + count), flat
// indices from `first`.
template <typename F>
inline void for_each_block_run(int64_t row, int64_t cols, int64_t begin, int64_t end, int64_t blocksize,
                               const float* absmax, F&& f) {
  const int64_t row_first = row * cols, segment_end = row_first + end;
  int64_t block = (row_first + begin) / blocksize;  // one division per segment: it costs as much as a run's decode
  for (int64_t i = row_first + begin; i < segment_end; ++block) {
    const int64_t stop = std::min(segment_end, (block + 1) * blocksize);
    f(i - row_first, stop - i, i, absmax[block]);
    i = stop;
  }
}

// Columns [begin, end) of row `row` of the NF4 matrix [rows, cols], dequantized into
// dst[0 .. end - begin).
template <typename T>
void decode_row_segment(const uint8_t* packed, const float* absmax, int64_t row, int64_t cols, int64_t begin,
                        int64_t end, int64_t blocksize, T* dst) {
  for_each_block_run(row, cols, begin, end, blocksize, absmax, [&](int64_t col, int64_t count, int64_t first, float a) {
    decode_run(packed, first, count, a, dst + col - begin);
  });
}

}  // namespace LK_CPU_ISA_NAME
}  // namespace cpu
}  // namespace lowrank_kernels
