// Argument checks shared by the CPU and CUDA op implementations. The Python API validates
// first with friendlier messages; these guard memory safety for direct torch.ops callers.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace lowrank_kernels {

inline void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "blocksize must be a power of two in [32, 4096], got ", blocksize);
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type(), " with shape ", t.sizes());
}

inline void check_nf4_storage(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, int64_t numel) {
  check_blocksize(blocksize);
  TORCH_CHECK(numel >= 0, "numel must be non-negative, got ", numel);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32, got ", absmax.scalar_type());
  TORCH_CHECK(packed.numel() == (numel + 1) / 2, "packed must hold ", (numel + 1) / 2, " bytes for ", numel,
              " elements, got shape ", packed.sizes());
  TORCH_CHECK(absmax.numel() == (numel + blocksize - 1) / blocksize, "absmax must hold ",
              (numel + blocksize - 1) / blocksize, " values for ", numel, " elements at blocksize ", blocksize,
              ", got shape ", absmax.sizes());
  TORCH_CHECK(packed.device() == absmax.device(), "packed is on ", packed.device(), " but absmax is on ",
              absmax.device());
}

inline void check_nf4_output(const at::Tensor& out, int64_t numel, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(out.scalar_type() == dtype && out.numel() == numel && out.is_contiguous() && out.device() == device,
              "out must be a contiguous ", dtype, " tensor of ", numel, " elements on ", device, ", got ",
              out.scalar_type(), " with shape ", out.sizes(), " on ", out.device());
}

inline void check_code(const at::Tensor& code) {
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256,
              "code must be a float32 tensor of 256 values, got ", code.scalar_type(), " with shape ", code.sizes());
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
              (q.numel() + blocksize - 1) / blocksize, " values for ", q.numel(), " elements at blocksize ", blocksize,
              ", got shape ", absmax.sizes());
  TORCH_CHECK(q.device() == absmax.device() && q.device() == code.device(),
              "q, absmax and code must be on one device, got ", q.device(), ", ", absmax.device(), ", ", code.device());
}

// ---- fused NF4 linear: y = x @ W^T + scale * left @ right^T (+ bias), W [rows, cols] in NF4 ----

inline void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols, at::ScalarType dtype,
                         const at::Device& device) {
  TORCH_CHECK(t.dim() == 2 && (rows < 0 || t.size(0) == rows) && (cols < 0 || t.size(1) == cols), name,
              " must be a matrix of shape [", rows < 0 ? std::string("*") : std::to_string(rows), ", ",
              cols < 0 ? std::string("*") : std::to_string(cols), "], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, " (the activation dtype), got ", t.scalar_type(),
              " with shape ", t.sizes());
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

// huber_weights(w [..., m, n], a [..., m, r] fp32, b [..., r, n] fp32, deltas fp32 [...] > 0);
// returns the shape of its stats output [..., 2].
inline std::vector<int64_t> check_huber_weights_args(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b,
                                                     const at::Tensor& weight_delta, const at::Tensor& loss_delta) {
  check_float_input(w, "w");
  TORCH_CHECK(w.dim() >= 2, "w must have at least 2 dimensions [..., m, n], got shape ", w.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "a and b must be float32, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.dim() == w.dim() && b.dim() == w.dim(), "a and b must have w's ", w.dim(), " dimensions, got shapes ",
              a.sizes(), " and ", b.sizes());
  const int64_t d = w.dim();
  TORCH_CHECK(a.sizes().slice(0, d - 1) == w.sizes().slice(0, d - 1) &&
                  b.sizes().slice(0, d - 2) == w.sizes().slice(0, d - 2) && b.size(-2) == a.size(-1) &&
                  b.size(-1) == w.size(-1),
              "a must be [..., m, r] and b [..., r, n] for w [..., m, n] = ", w.sizes(), ", got a ", a.sizes(),
              " and b ", b.sizes());
  TORCH_CHECK(a.device() == w.device() && b.device() == w.device(), "w, a, b must be on one device, got ", w.device(),
              ", ", a.device(), ", ", b.device());
  const auto batch = w.sizes().slice(0, d - 2);
  for (const at::Tensor* delta : {&weight_delta, &loss_delta}) {
    TORCH_CHECK(delta->scalar_type() == at::kFloat && delta->sizes() == batch && delta->device() == w.device(),
                "weight_delta and loss_delta must be float32 tensors of w's batch shape ", batch, " on ", w.device(),
                ", got ", delta->scalar_type(), " with shape ", delta->sizes(), " on ", delta->device());
    if (delta->is_cpu()) {  // a plain loop: tensor ops here cost more than a small matrix's kernel
      const at::Tensor values = delta->contiguous();
      const float* p = values.data_ptr<float>();
      for (int64_t i = 0; i < values.numel(); ++i)
        TORCH_CHECK(p[i] > 0 && std::isfinite(p[i]), "weight_delta and loss_delta must be positive and finite");
    }
  }
  std::vector<int64_t> stats(batch.begin(), batch.end());
  stats.push_back(2);
  return stats;
}

// spd_solve(gram [..., r, r] fp32, rhs [..., r] fp32).
inline void check_spd_solve_args(const at::Tensor& gram, const at::Tensor& rhs) {
  TORCH_CHECK(gram.scalar_type() == at::kFloat && rhs.scalar_type() == at::kFloat, "gram and rhs must be float32, got ",
              gram.scalar_type(), " and ", rhs.scalar_type());
  TORCH_CHECK(rhs.dim() >= 1 && gram.dim() == rhs.dim() + 1 && gram.size(-1) == rhs.size(-1) &&
                  gram.size(-2) == rhs.size(-1) &&
                  gram.sizes().slice(0, rhs.dim() - 1) == rhs.sizes().slice(0, rhs.dim() - 1),
              "gram must be [..., r, r] and rhs [..., r], got shapes ", gram.sizes(), " and ", rhs.sizes());
  TORCH_CHECK(gram.device() == rhs.device(), "gram is on ", gram.device(), " but rhs is on ", rhs.device());
}

}  // namespace lowrank_kernels
