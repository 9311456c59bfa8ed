// The element types of the CUDA kernels' float tensors, as the launchers take them: the .cu files
// include no torch headers, so they name dtypes by this enum (torch_launch.h maps at::ScalarType to
// it, cuda_common.cuh maps it to the CUDA element types).
#pragma once

namespace lowrank_kernels::cuda {

enum class FloatKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace lowrank_kernels::cuda
