// CUDA implementation of row_col_sq_norms: checks, allocation, launch (kernels in norms_cuda.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "lowrank_kernels/checks.h"
#include "norms_cuda.h"
#include "torch_launch.h"

namespace lowrank_kernels {
namespace {

// w [..., m, n] -> fp32 (sum_j w_ij^2 [..., m], sum_i w_ij^2 [..., n]).
std::tuple<at::Tensor, at::Tensor> row_col_sq_norms_cuda(const at::Tensor& w) {
  const auto [row_shape, col_shape] = row_col_norm_shapes(w);
  // A transposed contiguous matrix (w = v.mT) is read as v: v's row norms are w's column norms.
  if (!w.is_contiguous() && w.mT().is_contiguous()) {
    auto [rows, cols] = row_col_sq_norms_cuda(w.mT());
    return {cols, rows};
  }
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor x = w.contiguous();
  const int64_t m = x.size(-2), n = x.size(-1);
  const auto options = x.options().dtype(at::kFloat);
  if (x.numel() == 0) return {at::zeros(row_shape, options), at::zeros(col_shape, options)};

  at::Tensor rows = at::empty(row_shape, options), cols = at::empty(col_shape, options);
  const int64_t batch = x.numel() / (m * n);
  const int64_t row_blocks = cuda::norm_row_blocks(m), col_blocks = cuda::norm_col_blocks(n);
  // Partials are needed only along an axis split into more than one block.
  const at::Tensor row_partial = col_blocks > 1 ? at::empty({batch, col_blocks, m}, options) : at::Tensor();
  const at::Tensor col_partial = row_blocks > 1 ? at::empty({batch, row_blocks, n}, options) : at::Tensor();
  cuda::row_col_sq_norms(x.data_ptr(), float_kind(x.scalar_type()), batch, m, n,
                         row_partial.defined() ? row_partial.data_ptr<float>() : nullptr,
                         col_partial.defined() ? col_partial.data_ptr<float>() : nullptr, rows.data_ptr<float>(),
                         cols.data_ptr<float>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rows, cols};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m) { m.impl("row_col_sq_norms", &row_col_sq_norms_cuda); }

}  // namespace lowrank_kernels
