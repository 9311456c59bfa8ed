// Helpers of the CUDA op implementations (the *_ops.cpp files, which include torch; the .cu
// kernels do not): dtype -> FloatKind, the current stream.
#pragma once

#include <c10/cuda/CUDAStream.h>

#include "float_kind.h"

namespace lowrank_kernels {

inline cuda::FloatKind float_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return cuda::FloatKind::kFloat32;
    case at::kHalf: return cuda::FloatKind::kFloat16;
    case at::kBFloat16: return cuda::FloatKind::kBFloat16;
    default: TORCH_CHECK(false, "dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace lowrank_kernels
