// The device-independent part of the row_col_sq_norms op, shared by its CPU (cpu/norms_cpu.cpp)
// and CUDA (cuda/norms_cuda_ops.cpp) implementations: argument checks, the transposed-input
// shortcut, empty inputs and the results' allocation, around a device kernel.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "lowrank_kernels/checks.h"

namespace lowrank_kernels {

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

// w [..., m, n] (fp32, fp16 or bf16) -> fp32 (sum_j w_ij^2 [..., m], sum_i w_ij^2 [..., n]).
// kernel(x, batch, m, n, rows, cols) fills rows [batch, m] and cols [batch, n] (contiguous fp32,
// on x's device) from x, the contiguous w as [batch, m, n] with batch, m, n >= 1.
template <typename Kernel>
std::tuple<at::Tensor, at::Tensor> run_row_col_sq_norms(const at::Tensor& w, const Kernel& kernel) {
  const auto [row_shape, col_shape] = row_col_norm_shapes(w);
  // A transposed contiguous matrix (w = v.mT) is read as v: v's row norms are w's column norms.
  if (!w.is_contiguous() && w.mT().is_contiguous()) {
    auto [rows, cols] = run_row_col_sq_norms(w.mT(), kernel);
    return {cols, rows};
  }
  const at::Tensor x = w.contiguous();
  const int64_t m = x.size(-2), n = x.size(-1);
  const auto options = x.options().dtype(at::kFloat);
  if (x.numel() == 0) return {at::zeros(row_shape, options), at::zeros(col_shape, options)};

  at::Tensor rows = at::empty(row_shape, options), cols = at::empty(col_shape, options);
  kernel(x, x.numel() / (m * n), m, n, rows, cols);
  return {rows, cols};
}

}  // namespace lowrank_kernels
