// C++ CPU kernels for NF4 quantize/dequantize and blockwise-8-bit (double-quant statistics).
// Parallel over quantization blocks with at::parallel_for (OpenMP); the NF4 inner loops are
// vectorised with AVX2 in the avx2 build and AVX-512 in the avx512 one (isa.h), with a scalar path that shares the
// element math of csrc/include/lowrank_kernels/nf4_math.h (which the CUDA kernels use too).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "lowrank_kernels/checks.h"
#include "lowrank_kernels/nf4_math.h"
#include "output_cache.h"
#include "float_convert.h"
#include "nf4_decode.h"
#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace {

using cpu::dispatch_float;
using cpu::from_float;
using cpu::to_float;

// Blocks per parallel task: enough work per task to amortise scheduling (>= 64 KiB of input).
int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, 16384 / blocksize); }

// ---------------------------------------------------------------------------------------------
// Quantize.

// Largest |x| of a block, or NaN when the block holds a NaN or an infinity.
template <typename T>
float block_absmax(const T* x, int64_t n) {
  float m = 0.0f, probe = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : probe)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(x[i]);
    m = std::max(m, abs_f(v));
    probe += nonfinite_probe(v);
  }
  return probe == 0.0f ? m : probe;
}

// Encodes `n` (even) scaled elements into n/2 bytes. The full-block path multiplies by the
// reciprocal, the tail path divides: see nf4_math.h.
template <typename T, bool kTail>
void encode_block(const T* x, int64_t n, float absmax, uint8_t* out) {
  uint8_t codes[kMaxBlocksize + 2];
  if (kTail) {
    const float clamped = nf4_tail_absmax(absmax);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) codes[i] = nf4_encode_tail_block(to_float(x[i]), clamped);
  } else {
    const float reciprocal = nf4_block_reciprocal(absmax);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) codes[i] = nf4_encode_full_block(to_float(x[i]), reciprocal);
  }
  // bitsandbytes pads an odd element count with 0.0, which encodes to code 7.
  if (n & 1) codes[n & (kMaxBlocksize - 1)] = nf4_encode(0.0f);
  for (int64_t j = 0; j < (n + 1) / 2; ++j) out[j] = nf4_pack(codes[2 * j], codes[2 * j + 1]);
}

#ifdef LK_HAVE_AVX2
// encode_block for a full block on 8 AVX2 lanes: the same products and comparisons as
// nf4_encode (so the same codes), 16 elements -> 8 bytes per step (blocksize >= 32).
class Nf4EncoderAvx2 {
 public:
  Nf4EncoderAvx2() {
    for (int k = 0; k < 15; ++k) boundary_[k] = _mm256_set1_ps((nf4_code(k) + nf4_code(k + 1)) * 0.5f);
  }

  template <typename T>
  void encode(const T* x, int64_t n, float reciprocal, uint8_t* out) const {
    const __m256 scale = _mm256_set1_ps(reciprocal);
    for (int64_t i = 0; i < n; i += 16, out += 8) {
      const __m256i first = _mm256_sllv_epi32(codes(_mm256_mul_ps(cpu::load8(x + i), scale)), kEvenHigh);
      const __m256i second = _mm256_sllv_epi32(codes(_mm256_mul_ps(cpu::load8(x + i + 8), scale)), kEvenHigh);
      // Pairs summed (their bits are disjoint: + is |) within 128-bit halves, then put in order.
      const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(first, second), kPairOrder);
      // The low byte of each 32-bit lane, packed into the low 4 bytes of each half.
      const __m256i packed = _mm256_shuffle_epi8(bytes, kLowBytes);
      const uint32_t low = _mm256_extract_epi32(packed, 0), high = _mm256_extract_epi32(packed, 4);
      std::memcpy(out, &low, 4);
      std::memcpy(out + 4, &high, 4);
    }
  }

 private:
  // nf4_encode: the number of decision boundaries below the value (a true compare is -1).
  __m256i codes(__m256 scaled) const {
    __m256i q = _mm256_setzero_si256();
    for (int k = 0; k < 15; ++k)
      q = _mm256_sub_epi32(q, _mm256_castps_si256(_mm256_cmp_ps(scaled, boundary_[k], _CMP_GT_OQ)));
    return q;
  }

  __m256 boundary_[15];
  const __m256i kEvenHigh = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  const __m256i kPairOrder = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  const __m256i kLowBytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12,
                                             -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
};
#endif

#ifdef LK_HAVE_AVX512
// encode_block for a full block on 16 AVX-512 lanes, 32 elements -> 16 bytes per step
// (blocksize >= 32). nf4_encode's count of the decision boundaries below the value, found by a
// 4-step binary search (the boundaries ascend, so the count is where the search ends): each step
// one vpermps lookup of a boundary and one compare, where the linear count of Nf4EncoderAvx2
// takes 15 compares. The same products and the same comparisons decide, so the same codes.
class Nf4EncoderAvx512 {
 public:
  Nf4EncoderAvx512() {
    alignas(64) float boundary[16];
    for (int k = 0; k < 15; ++k) boundary[k] = (nf4_code(k) + nf4_code(k + 1)) * 0.5f;
    boundary[15] = boundary[14];  // never looked up: the search reads indices 0..14
    boundaries_ = _mm512_load_ps(boundary);
  }

  template <typename T>
  void encode(const T* x, int64_t n, float reciprocal, uint8_t* out) const {
    const __m512 scale = _mm512_set1_ps(reciprocal);
    for (int64_t i = 0; i < n; i += 32, out += 16) {
      const __m128i first = _mm512_cvtepi32_epi8(codes(_mm512_mul_ps(cpu::load16(x + i), scale)));
      const __m128i second = _mm512_cvtepi32_epi8(codes(_mm512_mul_ps(cpu::load16(x + i + 16), scale)));
      // Each 16-bit word holds an (even, odd) pair of codes as even | odd << 8; its low byte
      // becomes the packed byte even << 4 | odd.
      const __m256i pairs = _mm256_set_m128i(second, first);
      const __m256i bytes = _mm256_or_si256(_mm256_slli_epi16(pairs, 4), _mm256_srli_epi16(pairs, 8));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtepi16_epi8(bytes));
    }
  }

 private:
  __m512i codes(__m512 scaled) const {
    __m512i count = _mm512_setzero_si512();
    for (int step = 8; step >= 1; step /= 2) {
      const __m512 boundary = _mm512_permutexvar_ps(_mm512_add_epi32(count, _mm512_set1_epi32(step - 1)), boundaries_);
      const __mmask16 above = _mm512_cmp_ps_mask(scaled, boundary, _CMP_GT_OQ);
      count = _mm512_mask_add_epi32(count, above, count, _mm512_set1_epi32(step));
    }
    return count;
  }

  __m512 boundaries_;
};
using Nf4BlockEncoder = Nf4EncoderAvx512;
#elif defined(LK_HAVE_AVX2)
using Nf4BlockEncoder = Nf4EncoderAvx2;
#endif

template <typename T>
void quantize_nf4_kernel(const T* x, int64_t numel, int64_t blocksize, uint8_t* packed, float* absmax) {
  const int64_t full_blocks = numel / blocksize;
  at::parallel_for(0, full_blocks, grain_blocks(blocksize), [&](int64_t begin, int64_t end) {
#ifdef LK_HAVE_AVX2
    const Nf4BlockEncoder encoder;
#endif
    for (int64_t b = begin; b < end; ++b) {
      const T* block = x + b * blocksize;
      absmax[b] = block_absmax(block, blocksize);
#ifdef LK_HAVE_AVX2
      encoder.encode(block, blocksize, nf4_block_reciprocal(absmax[b]), packed + b * blocksize / 2);
#else
      encode_block<T, false>(block, blocksize, absmax[b], packed + b * blocksize / 2);
#endif
    }
  });
  const int64_t tail = numel - full_blocks * blocksize;
  if (tail > 0) {
    const T* block = x + full_blocks * blocksize;
    const float m = nf4_tail_absmax(block_absmax(block, tail));
    absmax[full_blocks] = m;
    encode_block<T, true>(block, tail, m, packed + full_blocks * blocksize / 2);
  }
}

// ---------------------------------------------------------------------------------------------
// Dequantize.

// Outputs at least this large bypass the cache (stream_block): they exceed it anyway.
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;

#ifdef LK_HAVE_AVX2
// Whole fp32 blocks with non-temporal stores (dst 64-byte aligned): a large dequantize is bound
// by memory bandwidth, and streaming stores skip the read-for-ownership of every output line
// (about a third of the traffic). The caller's thread fences before the results are shared.
void stream_block(const uint8_t* packed, int64_t first, int64_t count, float absmax, float* dst) {
#ifdef LK_HAVE_AVX512
  const cpu::NF4Table16 table;
  const __m512 scale = _mm512_set1_ps(absmax);
  for (int64_t i = 0; i < count; i += 16)
    _mm512_stream_ps(dst + i, cpu::decode16(packed + (first + i) / 2, table, scale));
#else
  const cpu::NF4Table table;
  const __m256 scale = _mm256_set1_ps(absmax);
  for (int64_t i = 0; i < count; i += 8)
    _mm256_stream_ps(dst + i, cpu::decode8(packed + (first + i) / 2, table, scale));
#endif
}
#endif

template <typename T>
bool use_streaming_stores(const T* out, int64_t numel) {
#ifdef LK_HAVE_AVX2
  return std::is_same_v<T, float> && numel * int64_t{sizeof(T)} >= kStreamMinBytes &&
         reinterpret_cast<uintptr_t>(out) % 64 == 0;
#else
  return false;
#endif
}

template <typename T>
void dequantize_nf4_kernel(const uint8_t* packed, const float* absmax, int64_t numel, int64_t blocksize, T* out) {
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  const bool stream = use_streaming_stores(out, numel);
  at::parallel_for(0, blocks, grain_blocks(blocksize), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * blocksize, count = std::min(blocksize, numel - first);
#ifdef LK_HAVE_AVX2
      if constexpr (std::is_same_v<T, float>) {
        if (stream && count == blocksize) {
          stream_block(packed, first, count, absmax[b], out + first);
          continue;
        }
      }
#endif
      cpu::decode_run(packed, first, count, absmax[b], out + first);
    }
#ifdef LK_HAVE_AVX2
    if (stream) _mm_sfence();  // this thread's streaming stores are visible before the join
#endif
  });
}

// ---------------------------------------------------------------------------------------------
// Blockwise 8-bit (the double-quant statistics: small vectors, scalar code is plenty).

void quantize_blockwise8_kernel(const float* x, int64_t numel, const float* code, int64_t blocksize, uint8_t* out,
                                float* absmax) {
  float search_code[256];
  for (int i = 0; i < 256; ++i) search_code[i] = blockwise8_search_code(code, i);
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * blocksize, last = std::min(numel, first + blocksize);
      const float m = block_absmax(x + first, last - first);
      absmax[b] = m;
      for (int64_t i = first; i < last; ++i) out[i] = blockwise8_encode(search_code, x[i] / m);
    }
  });
}

void dequantize_blockwise8_kernel(const uint8_t* q, const float* absmax, const float* code, int64_t numel,
                                  int64_t blocksize, float* out) {
  at::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = blockwise8_decode(code, q[i], absmax[i / blocksize]);
  });
}

// ---------------------------------------------------------------------------------------------
// Op implementations (argument checks live in Python; these re-check what memory safety needs).

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& w, int64_t blocksize) {
  check_blocksize(blocksize);
  check_float_input(w, "w");
  const at::Tensor x = w.contiguous();
  const int64_t numel = x.numel();
  at::Tensor packed = at::empty({(numel + 1) / 2}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(numel + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  dispatch_float(x.scalar_type(), "quantize_nf4", [&](auto tag) {
    using scalar_t = decltype(tag);
    quantize_nf4_kernel(x.data_ptr<scalar_t>(), numel, blocksize, packed.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  });
  return {packed, absmax};
}

void dequantize_nf4_out_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, int64_t numel,
                            at::ScalarType dtype, at::Tensor& out) {
  check_nf4_storage(packed, absmax, blocksize, numel);
  check_nf4_output(out, numel, dtype, packed.device());
  const at::Tensor p = packed.contiguous(), a = absmax.contiguous();
  dispatch_float(dtype, "dequantize_nf4", [&](auto tag) {
    using scalar_t = decltype(tag);
    dequantize_nf4_kernel(p.data_ptr<uint8_t>(), a.data_ptr<float>(), numel, blocksize, out.data_ptr<scalar_t>());
  });
}

at::Tensor dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, int64_t numel,
                              at::ScalarType dtype) {
  check_nf4_storage(packed, absmax, blocksize, numel);  // before allocating numel elements
  at::Tensor out = cpu::empty_output({numel}, packed.options().dtype(dtype));
  dequantize_nf4_out_cpu(packed, absmax, blocksize, numel, dtype, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise8_cpu(const at::Tensor& x, const at::Tensor& code,
                                                           int64_t blocksize) {
  check_blockwise8_args(x, code, blocksize);
  const at::Tensor xc = x.contiguous(), c = code.contiguous();
  at::Tensor out = at::empty({xc.numel()}, xc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(xc.numel() + blocksize - 1) / blocksize}, xc.options());
  quantize_blockwise8_kernel(xc.data_ptr<float>(), xc.numel(), c.data_ptr<float>(), blocksize, out.data_ptr<uint8_t>(),
                             absmax.data_ptr<float>());
  return {out, absmax};
}

at::Tensor dequantize_blockwise8_cpu(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize) {
  check_blockwise8_storage(q, absmax, code, blocksize);
  const at::Tensor qc = q.contiguous(), a = absmax.contiguous(), c = code.contiguous();
  at::Tensor out = at::empty({qc.numel()}, a.options());
  dequantize_blockwise8_kernel(qc.data_ptr<uint8_t>(), a.data_ptr<float>(), c.data_ptr<float>(), qc.numel(), blocksize,
                               out.data_ptr<float>());
  return out;
}

LK_CPU_KERNELS(m) {
  m.impl("quantize_nf4", &quantize_nf4_cpu);
  m.impl("dequantize_nf4", &dequantize_nf4_cpu);
  m.impl("dequantize_nf4.out", &dequantize_nf4_out_cpu);
  m.impl("quantize_blockwise8", &quantize_blockwise8_cpu);
  m.impl("dequantize_blockwise8", &dequantize_blockwise8_cpu);
}

}  // namespace

}  // namespace lowrank_kernels
