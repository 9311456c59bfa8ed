// fp32 / fp16 / bf16 elements for the CPU kernels: dtype dispatch, element conversion, and loads
// and stores of 8 (AVX2) or 16 (AVX-512) elements as fp32 lanes, with torch's roundings.
// Compiled once per ISA (isa.h).
#pragma once

#include <ATen/ATen.h>

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
template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}
template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);
}

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

// 8 fp32 lanes stored as 8 consecutive elements.
inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
inline void store8(c10::Half* out, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store8(c10::BFloat16* out, __m256 v) {
  // Round to nearest even on the bit pattern (values are finite: inputs were checked).
  __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  bits = _mm256_srli_epi32(bits, 16);
  const __m128i packed16 = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), packed16);
}
#endif

#ifdef LK_HAVE_AVX512
// 16 consecutive elements as fp32 (the same exact widenings as load8).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {
  const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}

// 16 consecutive fp32 values stored as T (the same roundings as store8).
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(c10::Half* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store16(c10::BFloat16* out, __m512 v) {
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(bits));
}
#endif

}  // namespace LK_CPU_ISA_NAME
}  // namespace cpu
}  // namespace lowrank_kernels
