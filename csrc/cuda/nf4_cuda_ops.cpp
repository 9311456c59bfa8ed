// CUDA implementations of the NF4 ops: checks, allocation, launch (kernels in nf4_cuda.cu).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lowrank_kernels/checks.h"
#include "torch_launch.h"
#include "nf4_cuda.h"

namespace lowrank_kernels {
namespace {

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& w, int64_t blocksize) {
  check_blocksize(blocksize);
  check_float_input(w, "w");
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor x = w.contiguous();
  const int64_t numel = x.numel();
  at::Tensor packed = at::empty({(numel + 1) / 2}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(numel + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  cuda::quantize_nf4(x.data_ptr(), float_kind(x.scalar_type()), numel, blocksize, packed.data_ptr<uint8_t>(),
                     absmax.data_ptr<float>(), current_stream());
  check_launch();
  return {packed, absmax};
}

void dequantize_nf4_out_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, int64_t numel,
                             at::ScalarType dtype, at::Tensor& out) {
  check_nf4_storage(packed, absmax, blocksize, numel);
  check_nf4_output(out, numel, dtype, packed.device());
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = packed.contiguous(), a = absmax.contiguous();
  cuda::dequantize_nf4(p.data_ptr<uint8_t>(), a.data_ptr<float>(), numel, blocksize, out.data_ptr(), float_kind(dtype),
                       current_stream());
  check_launch();
}

at::Tensor dequantize_nf4_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize, int64_t numel,
                               at::ScalarType dtype) {
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  dequantize_nf4_out_cuda(packed, absmax, blocksize, numel, dtype, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise8_cuda(const at::Tensor& x, const at::Tensor& code,
                                                            int64_t blocksize) {
  check_blockwise8_args(x, code, blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), c = code.contiguous();
  at::Tensor q = at::empty({xc.numel()}, xc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({(xc.numel() + blocksize - 1) / blocksize}, xc.options());
  cuda::quantize_blockwise8(xc.data_ptr<float>(), xc.numel(), c.data_ptr<float>(), blocksize, q.data_ptr<uint8_t>(),
                            absmax.data_ptr<float>(), current_stream());
  check_launch();
  return {q, absmax};
}

at::Tensor dequantize_blockwise8_cuda(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                      int64_t blocksize) {
  check_blockwise8_storage(q, absmax, code, blocksize);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), a = absmax.contiguous(), c = code.contiguous();
  at::Tensor out = at::empty({qc.numel()}, a.options());
  cuda::dequantize_blockwise8(qc.data_ptr<uint8_t>(), a.data_ptr<float>(), c.data_ptr<float>(), qc.numel(), blocksize,
                              out.data_ptr<float>(), current_stream());
  check_launch();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_kernels, CUDA, m) {
  m.impl("quantize_nf4", &quantize_nf4_cuda);
  m.impl("dequantize_nf4", &dequantize_nf4_cuda);
  m.impl("dequantize_nf4.out", &dequantize_nf4_out_cuda);
  m.impl("quantize_blockwise8", &quantize_blockwise8_cuda);
  m.impl("dequantize_blockwise8", &dequantize_blockwise8_cuda);
}

}  // namespace lowrank_kernels
