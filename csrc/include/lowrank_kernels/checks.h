// Argument checks shared by the CPU and CUDA op implementations. The Python API validates
// first with friendlier messages; these guard memory safety for direct torch.ops callers.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lowrank_kernels {

inline void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "blocksize must be a power of two in [32, 4096], got ", blocksize);
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type(), " with shape ",
              t.sizes());
}

inline void check_nf4_storage(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              int64_t numel) {
  check_blocksize(blocksize);
  TORCH_CHECK(numel >= 0, "numel must be non-negative, got ", numel);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ", absmax.scalar_type());
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, "packed must hold ", (numel + 1) / 2,
              " bytes for ", numel, " elements, got shape ", packed.sizes());
  TORCH_CHECK(absmax.numel() == (numel + blocksize - 1) / blocksize, "absmax must hold ",
              (numel + blocksize - 1) / blocksize, " values for ", numel,
              " elements at blocksize ", blocksize, ", got shape ", absmax.sizes());
  TORCH_CHECK(packed.device() == absmax.device(), "packed is on ", packed.device(),
              " but absmax is on ", absmax.device());
}

inline void check_nf4_output(const at::Tensor& out, int64_t numel, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(out.scalar_type() == dtype && out.numel() == numel && out.is_contiguous() && out.device() == device,
              "out must be a contiguous ", dtype, " tensor of ", numel, " elements on ", device, ", got ",
              out.scalar_type(), " with shape ", out.sizes(), " on ", out.device());
}

inline void check_code(const at::Tensor& code) {
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256,
              "code must be a float32 tensor of 256 values, got ", code.scalar_type(), " with shape ",
              code.sizes());
}

inline void check_blockwise8_args(const at::Tensor& x, const at::Tensor& code, int64_t blocksize) {
  TORCH_CHECK(blocksize > 0, "blocksize must be positive, got ", blocksize);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  check_code(code);
  TORCH_CHECK(x.device() == code.device(), "x is on ", x.device(), " but code is on ", code.device());
}

inline void check_blockwise8_storage(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize) {
  TORCH_CHECK(blocksize > 0, "blocksize must be positive, got ", blocksize);
  TORCH_CHECK(q.scalar_type() == at::kByte, "q must be uint8, got ", q.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ", absmax.scalar_type());
  check_code(code);
  TORCH_CHECK(absmax.numel() == (q.numel() + blocksize - 1) / blocksize, "absmax must hold ",
              (q.numel() + blocksize - 1) / blocksize, " values for ", q.numel(),
              " elements at blocksize ", blocksize, ", got shape ", absmax.sizes());
  TORCH_CHECK(q.device() == absmax.device() && q.device() == code.device(),
              "q, absmax and code must be on one device, got ", q.device(), ", ", absmax.device(), ", ",
              code.device());
}

// ---- fused NF4 linear: y = x @ W^T + scale * left @ right^T (+ bias), W [rows, cols] in NF4 ----

inline void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, at::ScalarType dtype,
                         const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && (cols < 0 || t.size(1) == cols), name,
              " must be a matrix of shape [", rows < 0 ? std::string("*") : std::to_string(rows), ", ",
              cols < 0 ? std::string("*") : std::to_string(cols), "], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, " (the activation dtype), got ",
              t.scalar_type(), " with shape ", t.sizes());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the activations are on ", device);
}

inline void check_activations(const at::Tensor& a, const char* name, const at::Tensor& packed) {
  check_float_input(a, name);
  TORCH_CHECK(a.dim() == 2, name, " must be a matrix [tokens, features], got shape ", a.sizes());
  TORCH_CHECK(packed.device() == a.device(), "packed is on ", packed.device(), " but ", name, " is on ", a.device());
}

// x [M, K] @ W^T, W [out_features, K]; lowrank_x [M, r]; up [out_features, r]; bias [out_features].
inline void check_nf4_lowrank_linear_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                          int64_t blocksize, int64_t out_features, const at::Tensor& lowrank_x,
                                          const at::Tensor& up, const std::optional<at::Tensor>& bias) {
  check_activations(x, "x", packed);
  TORCH_CHECK(out_features >= 0, "out_features must be non-negative, got ", out_features);
  check_nf4_storage(packed, absmax, blocksize, out_features * x.size(1));
  check_matrix(lowrank_x, "lowrank_x", x.size(0), -1, x.scalar_type(), x.device());
  check_matrix(up, "up", out_features, lowrank_x.size(1), x.scalar_type(), x.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "bias must be a ", x.scalar_type(), " vector of ", out_features, " values on ", x.device(), ", got ",
                bias->scalar_type(), " with shape ", bias->sizes(), " on ", bias->device());
  }
}

// grad_y [M, N] @ W, W [N, in_features]; lowrank_grad [M, r]; down [r, in_features].
inline void check_nf4_lowrank_grad_input_args(const at::Tensor& grad_y, const at::Tensor& packed,
                                              const at::Tensor& absmax, int64_t blocksize, int64_t in_features,
                                              const at::Tensor& lowrank_grad, const at::Tensor& down) {
  check_activations(grad_y, "grad_y", packed);
  TORCH_CHECK(in_features >= 0, "in_features must be non-negative, got ", in_features);
  check_nf4_storage(packed, absmax, blocksize, grad_y.size(1) * in_features);
  check_matrix(lowrank_grad, "lowrank_grad", grad_y.size(0), -1, grad_y.scalar_type(), grad_y.device());
  check_matrix(down, "down", lowrank_grad.size(1), in_features, grad_y.scalar_type(), grad_y.device());
}

// ---- row/column squared norms ----

// Checks w [..., m, n] and returns the result shapes (rows [..., m], cols [..., n]).
inline std::pair<std::vector<int64_t>, std::vector<int64_t>> row_col_norm_shapes(const at::Tensor& w) {
  check_float_input(w, "w");
  TORCH_CHECK(w.dim() >= 2, "w must have at least 2 dimensions [..., m, n], got shape ", w.sizes(), " and dtype ",
              w.scalar_type());
  std::vector<int64_t> rows(w.sizes().begin(), w.sizes().end() - 1);
  std::vector<int64_t> cols(rows.begin(), rows.end() - 1);
  cols.push_back(w.size(-1));
  return {rows, cols};
}

}  // namespace lowrank_kernels
