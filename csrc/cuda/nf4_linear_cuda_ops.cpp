// CUDA implementation of the fused NF4 linear ops: checks, allocation, launch (kernels in
// nf4_linear_cuda.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "lowrank_kernels/checks.h"
#include "torch_launch.h"
#include "nf4_linear_cuda.h"

namespace lowrank_kernels {
namespace {

bool aligned16(const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

// x [M, K], packed/absmax: NF4 W [out_features, K], lowrank_x [M, r], up [out_features, r],
// bias [out_features] -> y [M, out_features] = x @ W^T + scale * lowrank_x @ up^T (+ bias), x's dtype.
at::Tensor nf4_lowrank_gemv_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                 int64_t blocksize, int64_t out_features, const at::Tensor& lowrank_x,
                                 const at::Tensor& up, double scale, const std::optional<at::Tensor>& bias) {
  check_nf4_lowrank_linear_args(x, packed, absmax, blocksize, out_features, lowrank_x, up, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  if (y.numel() == 0) return y;
  // The kernel reads x with 16-byte vector loads. A fresh copy is aligned, and copying the few
  // decode tokens costs far less than the per-element path a misaligned x would take.
  at::Tensor xc = x.contiguous();
  if (!aligned16(xc)) xc = xc.clone();
  const at::Tensor p = packed.contiguous(), a = absmax.contiguous();
  const at::Tensor lx = lowrank_x.contiguous(), u = up.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  cuda::nf4_lowrank_gemv(xc.data_ptr(), float_kind(xc.scalar_type()), p.data_ptr<uint8_t>(), a.data_ptr<float>(),
                         blocksize, xc.size(0), out_features, xc.size(1), lx.data_ptr(), u.data_ptr(), lx.size(1),
                         static_cast<float>(scale), b.defined() ? b.data_ptr() : nullptr, y.data_ptr(),
                         current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m) { m.impl("nf4_lowrank_gemv", &nf4_lowrank_gemv_cuda); }

}  // namespace lowrank_kernels
