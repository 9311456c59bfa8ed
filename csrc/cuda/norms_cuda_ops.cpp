// CUDA implementation of row_col_sq_norms: checks, allocation, launch (kernels in norms_cuda.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "lowrank_kernels/norms_op.h"
#include "norms_cuda.h"
#include "torch_launch.h"

namespace lowrank_kernels {
namespace {

// rows [batch, m], cols [batch, n] fp32 = the squared norms of x [batch, m, n] (contiguous).
void row_col_sq_norms_kernel(const at::Tensor& x, int64_t batch, int64_t m, int64_t n, at::Tensor& rows,
                             at::Tensor& cols) {
  const auto options = rows.options();
  const int64_t row_blocks = cuda::norm_row_blocks(m), col_blocks = cuda::norm_col_blocks(n);
  // Partials are needed only along an axis split into more than one block.
  const at::Tensor row_partial = col_blocks > 1 ? at::empty({batch, col_blocks, m}, options) : at::Tensor();
  const at::Tensor col_partial = row_blocks > 1 ? at::empty({batch, row_blocks, n}, options) : at::Tensor();
  cuda::row_col_sq_norms(x.data_ptr(), float_kind(x.scalar_type()), batch, m, n,
                         row_partial.defined() ? row_partial.data_ptr<float>() : nullptr,
                         col_partial.defined() ? col_partial.data_ptr<float>() : nullptr, rows.data_ptr<float>(),
                         cols.data_ptr<float>(), current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// w [..., m, n] -> fp32 (sum_j w_ij^2 [..., m], sum_i w_ij^2 [..., n]).
std::tuple<at::Tensor, at::Tensor> row_col_sq_norms_cuda(const at::Tensor& w) {
  const c10::cuda::CUDAGuard guard(w.device());  // allocations and the launch on w's device
  return run_row_col_sq_norms(w, row_col_sq_norms_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m) { m.impl("row_col_sq_norms", &row_col_sq_norms_cuda); }

}  // namespace lowrank_kernels
