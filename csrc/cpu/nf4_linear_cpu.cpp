// C++ CPU kernels of the fused QPiSSA linear, W = NF4 residual [N, K] (ARCHITECTURE.md, notation):
//   forward      y  = x @ W^T + scale * lowrank_x @ up^T (+ bias)
//   grad-input   dx = grad_y @ W + scale * lowrank_grad @ down
// Two paths, chosen by token count M:
// - decode (few tokens): stream the packed nibbles once, dequantize 8 at a time in registers and
//   multiply-accumulate every token against them; the low-rank term and bias are added per
//   output in the same pass. OpenMP across output rows.
// - GEMM (many tokens): dequantize a cache-sized panel of W into fp32 and hand it to the BLAS
//   GEMM (MKL), panel by panel. Only one panel ever exists: W is never materialised.
// Activations are computed in fp32 whatever their dtype, and the result is rounded once to the
// activation dtype; except bf16 activations on the GEMM path of CPUs with bf16 dot products
// (AVX512-BF16, AMX; cpu::bf16_gemm_enabled), whose panels are bf16 and multiplied in bf16 by
// oneDNN (fp32 accumulation), as a dense bf16 F.linear is (see "bf16 GEMM path").
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "lowrank_kernels/checks.h"
#include "lowrank_kernels/nf4_linear_math.h"
#include "float_convert.h"
#include "isa_dispatch.h"
#include "nf4_decode.h"
#include "nf4_split_decode.h"
#include "isa.h"  // last: the per-ISA target starts here

namespace lowrank_kernels {
namespace {

using cpu::decode_row_segment;
using cpu::for_each_block_run;

// Tokens multiplied against one decoded register of weights (accumulators live in registers).
constexpr int kTokenGroup = 8;
// How far ahead of its decode the split kernel prefetches packed codes (bytes; a row of 8192
// codes). Rows of a thread are consecutive, so this runs into the next rows. On a 2-core Xeon
// with AVX-512, 4096 x 4096, 1 token, from DRAM: 0.95 ms without, 0.84 ms at 256, 0.72 ms at
// 1024, 0.65-0.73 ms at 2048 and 4096 (in cache: 0.66 -> 0.50 ms).
constexpr int64_t kPrefetchBytes = 4096;
// Most bytes of fp32 weights dequantized per GEMM panel (the op's only workspace, reused panel
// after panel; see for_each_panel). On a 2-core Xeon with AVX-512 (MKL sgemm), 512 tokens x
// 4096 x 4096 forward: 512-column panels (8 MiB) decoded in parallel took 1.03x the dense GEMM
// + LoRA; decoded on the calling thread 1.13x; 8 MiB and 32 MiB panels alike (1.02x). Dense
// GEMMs alone, cut along the inner dimension: 1.00x at 256-1024 columns; along the output: 1.03x
// (1024 rows) to 1.07x (512 rows).
constexpr int64_t kPanelBytes = int64_t{16} << 20;
constexpr int64_t kMinPanelDepth = 256;

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Operands of a call in fp32, contiguous: the kernels below index them directly.
struct LinearOperands {
  at::Tensor a;      // activations [M, inner]
  at::Tensor left;   // low-rank activations [M, r]
  at::Tensor right;  // low-rank weight: up [N, r] (forward) or down [r, K] (grad-input)
};

// ---------------------------------------------------------------------------------------------
// Decode path, forward.

// Adds dot(W[row, :], x[t, :]) for TOKENS tokens starting at x (row stride `cols`) into acc.
template <int TOKENS>
void dot_row(const uint8_t* packed, const float* absmax, int64_t row, int64_t cols, int64_t blocksize, const float* x,
             float* acc) {
#ifdef LK_HAVE_AVX2
  const cpu::NF4Table table;
  __m256 vacc[TOKENS];
  for (int t = 0; t < TOKENS; ++t) vacc[t] = _mm256_setzero_ps();
#endif
  for_each_block_run(row, cols, 0, cols, blocksize, absmax, [&](int64_t col, int64_t count, int64_t first, float a) {
    int64_t i = 0;
    // Elements before the first byte boundary and after the last whole group of 8: scalar.
    auto scalar = [&](int64_t j) {
      const float w = nf4_decode(nf4_nibble(packed, first + j), a);
      for (int t = 0; t < TOKENS; ++t) acc[t] += w * x[t * cols + col + j];
    };
    if (first & 1) scalar(i++);
#ifdef LK_HAVE_AVX2
    const __m256 scale = _mm256_set1_ps(a);
    for (; i + 8 <= count; i += 8) {
      const __m256 w = cpu::decode8(packed + (first + i) / 2, table, scale);
      for (int t = 0; t < TOKENS; ++t) vacc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * cols + col + i), vacc[t]);
    }
#endif
    for (; i < count; ++i) scalar(i);
  });
#ifdef LK_HAVE_AVX2
  for (int t = 0; t < TOKENS; ++t) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vacc[t]);
    for (float v : lanes) acc[t] += v;
  }
#endif
}

#ifdef LK_HAVE_AVX2
// dot_row for rows that start a quantization block (nf4_rows_aligned) with x in split order
// (cpu::split_columns): 32 codes per 16 bytes. Few tokens fold the block's absmax into
// per-block sums (one FMA per block instead of a multiply per code vector) and keep CHAINS
// independent accumulators per token, so the FMA latency does not serialise the loop; more
// tokens scale the decoded codes instead (their accumulators fill the registers).
template <int TOKENS>
void dot_row_split(const uint8_t* packed, const float* absmax, int64_t row, int64_t cols, int64_t blocksize,
                   const float* x, float* acc) {
  using cpu::SplitVec, cpu::kSplitVectors, cpu::vfmadd, cpu::vzero;
  constexpr bool FOLD = TOKENS <= 2;
  constexpr int CHAINS = TOKENS == 1 ? kSplitVectors : TOKENS == 2 ? kSplitVectors / 2 : 1;
  constexpr int LANES = 32 / kSplitVectors;
  static const cpu::SplitDecoder decode;  // built once: the table costs as much as a row
  // Walking pointers and a shift (blocksize is a power of two): in a loop of ~10 instructions
  // per 32 codes, signed index halving and two divisions per row cost ~15 %.
  const int64_t blocks = cols >> __builtin_ctzll(static_cast<uint64_t>(blocksize));
  const uint8_t* bytes = packed + row * (cols / 2);
  const float* row_absmax = absmax + row * blocks;
  SplitVec total[TOKENS], sum[TOKENS][CHAINS];
  for (int t = 0; t < TOKENS; ++t) total[t] = vzero();
  for (int64_t block = 0; block < blocks; ++block) {
    const SplitVec scale = cpu::vbroadcast(row_absmax[block]);
    for (int t = 0; t < TOKENS; ++t)
      for (int c = 0; c < CHAINS; ++c) sum[t][c] = FOLD ? vzero() : total[t];
    for (const uint8_t* const block_end = bytes + blocksize / 2; bytes < block_end; bytes += 16, x += 32) {
      SplitVec w[kSplitVectors];  // blocksize >= 32: whole steps of 32 codes
      _mm_prefetch(reinterpret_cast<const char*>(bytes) + kPrefetchBytes, _MM_HINT_T0);
      decode(bytes, w);
      for (int j = 0; j < kSplitVectors; ++j) {
        if (!FOLD) w[j] = cpu::vmul(w[j], scale);
        for (int t = 0; t < TOKENS; ++t)
          sum[t][j % CHAINS] = vfmadd(w[j], cpu::vload(x + t * cols + LANES * j), sum[t][j % CHAINS]);
      }
    }
    for (int t = 0; t < TOKENS; ++t) {
      if (!FOLD) {
        total[t] = sum[t][0];
        continue;
      }
      SplitVec block_sum = sum[t][0];
      for (int c = 1; c < CHAINS; ++c) block_sum = cpu::vadd(block_sum, sum[t][c]);
      total[t] = vfmadd(scale, block_sum, total[t]);
    }
  }
  for (int t = 0; t < TOKENS; ++t) acc[t] += cpu::vsum(total[t]);
}
#endif

// The decode kernels use split order when every row starts a quantization block (the common
// case: in_features a multiple of the blocksize), natural order otherwise.
bool use_split_order(int64_t cols, int64_t blocksize) {
  return cpu::kHaveSplitDecode && nf4_rows_aligned(cols, blocksize);
}

// Activations [M, K] in split order (a copy), or the input itself for natural order.
at::Tensor in_order(const at::Tensor& a, bool split) {
  if (!split) return a;
  at::Tensor out = at::empty_like(a);
  for (int64_t t = 0; t < a.size(0); ++t)
    cpu::split_columns(a.data_ptr<float>() + t * a.size(1), a.size(1), out.data_ptr<float>() + t * a.size(1));
  return out;
}

using DotRowFn = void (*)(const uint8_t*, const float*, int64_t, int64_t, int64_t, const float*, float*);

template <int... TOKENS>
DotRowFn dot_row_for(int tokens, bool split, std::integer_sequence<int, TOKENS...>) {
  static constexpr DotRowFn natural[] = {&dot_row<TOKENS + 1>...};
#ifdef LK_HAVE_AVX2
  static constexpr DotRowFn split_order[] = {&dot_row_split<TOKENS + 1>...};
  if (split) return split_order[tokens - 1];
#endif
  return natural[tokens - 1];
}

template <typename T>
void decode_forward(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t rows, int64_t cols,
                    const LinearOperands& in, float scale, const float* bias, T* y) {
  const int64_t tokens = in.a.size(0), rank = in.left.size(1);
  const bool split = use_split_order(cols, blocksize);
  const at::Tensor x_ordered = in_order(in.a, split);
  const float* x = x_ordered.data_ptr<float>();
  const float* left = in.left.data_ptr<float>();
  const float* up = in.right.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t t0 = 0; t0 < tokens; t0 += kTokenGroup) {
        const int group = static_cast<int>(std::min<int64_t>(kTokenGroup, tokens - t0));
        float acc[kTokenGroup] = {};
        dot_row_for(group, split, std::make_integer_sequence<int, kTokenGroup>{})(packed, absmax, row, cols, blocksize,
                                                                                  x + t0 * cols, acc);
        for (int t = 0; t < group; ++t) {
          float lowrank = 0.0f;
          for (int64_t j = 0; j < rank; ++j) lowrank += left[(t0 + t) * rank + j] * up[row * rank + j];
          float v = acc[t] + scale * lowrank;
          if (bias != nullptr) v += bias[row];
          y[(t0 + t) * rows + row] = cpu::from_float<T>(v);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Decode path, grad-input: dx = grad_y @ W for few tokens.

// y[0 .. n) += a * x[0 .. n), fused multiply-adds (the build disables implicit contraction).
void axpy(int64_t n, float a, const float* x, float* y) {
  int64_t i = 0;
#ifdef LK_HAVE_AVX2
  const __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
}

#ifdef LK_HAVE_AVX2
// Split-order grad-input for TOKENS tokens and the 32 columns [col, col + 32) of dx: sweeps all
// rows of W, whose 16 bytes per row decode to exactly those columns, with the accumulators in
// registers; grad_y[t, row] * absmax is one broadcast coefficient per row and token.
template <int TOKENS>
void grad_input_columns(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t rows, int64_t cols,
                        const float* gy, int64_t col, float* dx) {
  using cpu::SplitVec, cpu::kSplitVectors;
  constexpr int LANES = 32 / kSplitVectors;
  static const cpu::SplitDecoder decode;  // built once: the table costs as much as a row
  const int64_t blocks_per_row = cols / blocksize, block = col / blocksize;
  SplitVec acc[TOKENS][kSplitVectors];
  for (int t = 0; t < TOKENS; ++t)
    for (int j = 0; j < kSplitVectors; ++j) acc[t][j] = cpu::vzero();
  for (int64_t row = 0; row < rows; ++row) {
    SplitVec w[kSplitVectors];
    decode(packed + (row * cols + col) / 2, w);
    const float a = absmax[row * blocks_per_row + block];
    for (int t = 0; t < TOKENS; ++t) {
      const SplitVec coefficient = cpu::vbroadcast(gy[t * rows + row] * a);
      for (int j = 0; j < kSplitVectors; ++j) acc[t][j] = cpu::vfmadd(coefficient, w[j], acc[t][j]);
    }
  }
  for (int t = 0; t < TOKENS; ++t)
    for (int j = 0; j < kSplitVectors; ++j) cpu::vstore(dx + t * cols + col + LANES * j, acc[t][j]);
}

// Aligned rows: threads own disjoint 32-column slices of dx (no reduction), two tokens per sweep.
at::Tensor decode_grad_input_split(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t rows,
                                   int64_t cols, const at::Tensor& grad_y) {
  const int64_t tokens = grad_y.size(0);
  const float* gy = grad_y.data_ptr<float>();
  at::Tensor dx = at::empty({tokens, cols}, grad_y.options());
  float* out = dx.data_ptr<float>();
  at::parallel_for(0, cols / 32, 4, [&](int64_t begin, int64_t end) {
    for (int64_t slice = begin; slice < end; ++slice)
      for (int64_t t = 0; t < tokens; t += 2) {
        auto sweep = tokens - t >= 2 ? &grad_input_columns<2> : &grad_input_columns<1>;
        sweep(packed, absmax, blocksize, rows, cols, gy + t * rows, slice * 32, out + t * cols);
      }
  });
  at::Tensor natural = at::empty_like(dx);
  for (int64_t t = 0; t < tokens; ++t) cpu::merge_columns(out + t * cols, cols, natural.data_ptr<float>() + t * cols);
  return natural;
}
#endif

// Rows in natural order: each thread accumulates grad_y[:, rows] @ W[rows, :] for its rows into
// a private [M, K] fp32 buffer (M is small), then the buffers are summed.
at::Tensor decode_grad_input(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t rows, int64_t cols,
                             const at::Tensor& grad_y) {
#ifdef LK_HAVE_AVX2
  if (use_split_order(cols, blocksize)) return decode_grad_input_split(packed, absmax, blocksize, rows, cols, grad_y);
#endif
  const int64_t tokens = grad_y.size(0);
  const float* gy = grad_y.data_ptr<float>();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  at::Tensor partial = at::zeros({chunks, tokens, cols}, grad_y.options());
  float* partial_data = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> w(cols);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      float* acc = partial_data + chunk * tokens * cols;
      for (int64_t row = rows * chunk / chunks; row < rows * (chunk + 1) / chunks; ++row) {
        decode_row_segment(packed, absmax, row, cols, 0, cols, blocksize, w.data());
        for (int64_t t = 0; t < tokens; ++t) axpy(cols, gy[t * rows + row], w.data(), acc + t * cols);
      }
    }
  });
  return partial.sum(0);
}

// ---------------------------------------------------------------------------------------------
// GEMM path: W dequantized to fp32 one panel at a time, each panel multiplied by the BLAS GEMM
// (MKL). Panels cut the GEMM's inner dimension, so every call keeps the whole output width, which
// MKL splits across threads, and accumulates into the output: the forward takes columns
// [first, first + n) of W (y += x[:, first : first + n] @ panel^T), the grad-input rows
// (dx += grad_y[:, first : first + n] @ panel). Cutting the output dimension instead (panels of
// W's rows in the forward) narrows each GEMM and costs more the more threads share it.

// Extent of a panel along the dimension of W it cuts (`length` long), `width` elements across,
// of `element_bytes` elements: kPanelBytes' worth but at most an eighth of W's fp32 bytes (the
// workspace stays a small fraction of the dense W_res: 8 MiB for 4096 x 4096), a multiple of 64,
// at least kMinPanelDepth (a shallow GEMM re-reads and re-writes its output per panel) and at
// most `length`.
int64_t panel_depth(int64_t length, int64_t width, int64_t element_bytes) {
  const int64_t by_bytes =
      std::min(kPanelBytes / (element_bytes * std::max<int64_t>(width, 1)), length / (2 * element_bytes)) / 64 * 64;
  return std::min(std::max(by_bytes, kMinPanelDepth), std::max<int64_t>(length, 1));
}

// W[row0 : row0 + rows, col0 : col0 + cols] of the NF4 matrix W [*, width] dequantized into dst
// (row stride `ld`), in parallel: decoding is bound by the stores, and one thread's share of the
// bandwidth is half the machine's.
template <typename T>
void decode_panel(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t width, int64_t row0,
                  int64_t rows, int64_t col0, int64_t cols, T* dst, int64_t ld) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      decode_row_segment(packed, absmax, row0 + r, width, col0, col0 + cols, blocksize, dst + r * ld);
  });
}

// Calls f(first, panel) for consecutive panels of the NF4 matrix W [rows, cols] in fp32 along
// its columns (panel = W[:, first : first + n], for the forward) or its rows (panel =
// W[first : first + n, :], for the grad-input). One workspace serves every panel.
template <typename F>
void for_each_panel(const uint8_t* packed, const float* absmax, int64_t blocksize, int64_t rows, int64_t cols,
                    bool along_columns, F&& f) {
  const int64_t inner = along_columns ? cols : rows, outer = along_columns ? rows : cols;
  const int64_t step = panel_depth(inner, outer, sizeof(float));
  at::Tensor workspace = at::empty({step * outer}, at::TensorOptions().dtype(at::kFloat));
  for (int64_t first = 0; first < inner; first += step) {
    const int64_t n = std::min(step, inner - first);
    const int64_t panel_rows = along_columns ? rows : n, panel_cols = along_columns ? n : cols;
    at::Tensor panel = workspace.narrow(0, 0, panel_rows * panel_cols).view({panel_rows, panel_cols});
    decode_panel(packed, absmax, blocksize, cols, along_columns ? 0 : first, panel_rows, along_columns ? first : 0,
                 panel_cols, panel.data_ptr<float>(), panel_cols);
    f(first, panel);
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 GEMM path: bf16 activations, many tokens, a CPU with bf16 dot products. Both products are
// one bf16 GEMM over an extended inner dimension, so every output is a single fp32-accumulated
// dot product rounded once to bf16 (oneDNN behind at::mm; torch's CPU mm has no fp32 output):
//   forward      y  = [x, s lowrank_x, 1] @ [W, up, bias]^T
//   grad-input   dx = [grad_y, s lowrank_grad] @ [W; down]
// W is dequantized to bf16 (each weight rounded, as in a bf16 model or bitsandbytes' bf16
// compute), s lowrank_x likewise; up, down, bias are bf16 already. Panels cut the *output*
// dimension (each GEMM needs the whole extended inner dimension): rows of W in the forward,
// columns in the grad-input; the workspace is one bf16 panel, at most W's fp32 bytes / 8.

// out = [a, scale * left, ones] @ E^T for E = [W, extra] (forward: W [outer, inner] = the NF4
// matrix [rows, cols], extra = [up, bias] [rows, r (+1)]) or E = [W; extra]^T (grad-input: W^T,
// extra = down [r, cols]); `ones` columns (extra's beyond left's) pair with bias.
at::Tensor bf16_extended_gemm(const at::Tensor& a, const uint8_t* packed, const float* absmax, int64_t blocksize,
                              int64_t rows, int64_t cols, const at::Tensor& left, double scale, const at::Tensor& extra,
                              bool forward) {
  const int64_t inner = forward ? cols : rows, outer = forward ? rows : cols, rank = left.size(1);
  const at::Tensor extra_rows = forward ? extra : extra.t();                 // [outer, e]
  const int64_t e = extra_rows.size(1), depth = (inner + e + 31) / 32 * 32;  // 64-byte rows
  at::Tensor a_ext = at::zeros({a.size(0), depth}, a.options());
  a_ext.narrow(1, 0, inner).copy_(a);
  a_ext.narrow(1, inner, rank).copy_(left.to(at::kFloat).mul(scale));  // rounds s * left once
  a_ext.narrow(1, inner + rank, e - rank).fill_(1);
  at::Tensor out = at::empty({a.size(0), outer}, a.options());
  const int64_t step = panel_depth(outer, depth, sizeof(c10::BFloat16));
  at::Tensor workspace = at::empty({step * depth}, a.options());
  for (int64_t first = 0; first < outer; first += step) {
    const int64_t n = std::min(step, outer - first);
    // E's rows [first, first + n) as [n, depth]: stored row-major in the forward (W's rows are
    // contiguous), column-major in the grad-input (W's column segments are).
    const at::Tensor stored = workspace.narrow(0, 0, n * depth);
    const at::Tensor panel = forward ? stored.view({n, depth}) : stored.view({depth, n}).t();
    auto* data = stored.data_ptr<c10::BFloat16>();
    if (forward)
      decode_panel(packed, absmax, blocksize, cols, first, n, 0, cols, data, depth);
    else
      decode_panel(packed, absmax, blocksize, cols, 0, rows, first, n, data, n);
    panel.narrow(1, inner, e).copy_(extra_rows.narrow(0, first, n));
    panel.narrow(1, inner + e, depth - inner - e).zero_();
    out.narrow(1, first, n).copy_(at::mm(a_ext, panel.t()));
  }
  return out;
}

bool use_bf16_gemm(const at::Tensor& a, bool decode) {
  return !decode && a.scalar_type() == at::kBFloat16 && cpu::bf16_gemm_enabled();
}

// ---------------------------------------------------------------------------------------------
// Ops.

bool use_decode_path(int64_t tokens) { return tokens <= kCpuDecodeMaxTokens; }

at::Tensor forward(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                   int64_t out_features, const at::Tensor& lowrank_x, const at::Tensor& up, double scale,
                   const std::optional<at::Tensor>& bias, bool decode) {
  check_nf4_lowrank_linear_args(x, packed, absmax, blocksize, out_features, lowrank_x, up, bias);
  const int64_t tokens = x.size(0), cols = x.size(1);
  const at::Tensor p = packed.contiguous(), a = absmax.contiguous();
  if (use_bf16_gemm(x, decode)) {
    const at::Tensor extra = bias ? at::cat({up, bias->unsqueeze(1)}, 1) : up;
    return bf16_extended_gemm(x, p.data_ptr<uint8_t>(), a.data_ptr<float>(), blocksize, out_features, cols, lowrank_x,
                              scale, extra, /*forward=*/true);
  }
  const LinearOperands in{as_float(x), as_float(lowrank_x), as_float(up)};
  const std::optional<at::Tensor> bias32 = bias.has_value() ? std::optional(as_float(*bias)) : std::nullopt;
  if (decode) {
    at::Tensor y = at::empty({tokens, out_features}, x.options());
    cpu::dispatch_float(x.scalar_type(), "nf4_lowrank_linear", [&](auto tag) {
      decode_forward(p.data_ptr<uint8_t>(), a.data_ptr<float>(), blocksize, out_features, cols, in,
                     static_cast<float>(scale), bias32 ? bias32->data_ptr<float>() : nullptr,
                     y.data_ptr<decltype(tag)>());
    });
    return y;
  }
  at::Tensor y =
      bias32 ? bias32->expand({tokens, out_features}).contiguous() : at::zeros({tokens, out_features}, in.a.options());
  y.addmm_(in.left, in.right.t(), 1.0, scale);
  for_each_panel(
      p.data_ptr<uint8_t>(), a.data_ptr<float>(), blocksize, out_features, cols, /*along_columns=*/true,
      [&](int64_t first, const at::Tensor& panel) { y.addmm_(in.a.narrow(1, first, panel.size(1)), panel.t()); });
  return y.to(x.scalar_type());
}

at::Tensor nf4_lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                  int64_t blocksize, int64_t out_features, const at::Tensor& lowrank_x,
                                  const at::Tensor& up, double scale, const std::optional<at::Tensor>& bias) {
  return forward(x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias,
                 use_decode_path(x.dim() == 2 ? x.size(0) : 0));
}

at::Tensor nf4_lowrank_gemv_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                int64_t blocksize, int64_t out_features, const at::Tensor& lowrank_x,
                                const at::Tensor& up, double scale, const std::optional<at::Tensor>& bias) {
  return forward(x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias, /*decode=*/true);
}

at::Tensor nf4_lowrank_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& packed,
                                             const at::Tensor& absmax, int64_t blocksize, int64_t in_features,
                                             const at::Tensor& lowrank_grad, const at::Tensor& down, double scale) {
  check_nf4_lowrank_grad_input_args(grad_y, packed, absmax, blocksize, in_features, lowrank_grad, down);
  const int64_t tokens = grad_y.size(0), rows = grad_y.size(1);
  const at::Tensor p = packed.contiguous(), a = absmax.contiguous();
  const bool decode = use_decode_path(tokens);
  if (use_bf16_gemm(grad_y, decode))
    return bf16_extended_gemm(grad_y, p.data_ptr<uint8_t>(), a.data_ptr<float>(), blocksize, rows, in_features,
                              lowrank_grad, scale, down, /*forward=*/false);
  const LinearOperands in{as_float(grad_y), as_float(lowrank_grad), as_float(down)};
  at::Tensor dx;
  if (decode) {
    dx = decode_grad_input(p.data_ptr<uint8_t>(), a.data_ptr<float>(), blocksize, rows, in_features, in.a);
  } else {
    dx = at::zeros({tokens, in_features}, in.a.options());
    for_each_panel(p.data_ptr<uint8_t>(), a.data_ptr<float>(), blocksize, rows, in_features,
                   /*along_columns=*/false, [&](int64_t first, const at::Tensor& panel) {
                     dx.addmm_(in.a.narrow(1, first, panel.size(0)), panel);
                   });
  }
  dx.addmm_(in.left, in.right, 1.0, scale);
  return dx.to(grad_y.scalar_type());
}

LK_CPU_KERNELS(m) {
  m.impl("nf4_lowrank_linear", &nf4_lowrank_linear_cpu);
  m.impl("nf4_lowrank_gemv", &nf4_lowrank_gemv_cpu);
  m.impl("nf4_lowrank_linear_grad_input", &nf4_lowrank_linear_grad_input_cpu);
}

}  // namespace

}  // namespace lowrank_kernels
