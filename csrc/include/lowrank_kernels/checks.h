// Argument checks shared by the CPU and CUDA op implementations. The Python API validates
// first with friendlier messages; these guard memory safety for direct torch.ops callers.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace lowrank_kernels
