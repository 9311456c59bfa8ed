// Op schemas of the torch.ops.lowrank_kernels namespace (defined once here; CPU kernels in
// cpu/, CUDA kernels in cuda/, fake kernels and Triton registrations in the Python package),
// plus build_info() describing what this binary was compiled with.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "lowrank_kernels_build_config.h"

extern "C" {
// A Python module `lowrank_kernels._C` with no methods: importing it loads the shared library,
// whose static initialisers register the ops (pytorch/extension-cpp pattern, no pybind11).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace lowrank_kernels {

std::string build_info() {
  std::string info = "{\"cpu_kernels\": true";
#ifdef __AVX2__
  info += ", \"cpu_simd\": \"avx2\"";
#else
  info += ", \"cpu_simd\": \"scalar\"";
#endif
#ifdef LOWRANK_KERNELS_WITH_CUDA
  info += ", \"cuda_kernels\": true, \"cuda_archs\": \"" LOWRANK_KERNELS_CUDA_ARCHS "\"";
#else
  info += ", \"cuda_kernels\": false, \"cuda_archs\": \"\"";
#endif
  return info + "}";
}

TORCH_LIBRARY(lowrank_kernels, m) {
  m.def("build_info() -> str", &build_info);
  m.def("quantize_nf4(Tensor w, int blocksize) -> (Tensor packed, Tensor absmax)");
  m.def("dequantize_nf4(Tensor packed, Tensor absmax, int blocksize, int numel, ScalarType dtype) -> Tensor");
  m.def("dequantize_nf4.out(Tensor packed, Tensor absmax, int blocksize, int numel, ScalarType dtype, *, "
        "Tensor(a!) out) -> ()");
  m.def("quantize_blockwise8(Tensor x, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)");
  m.def("dequantize_blockwise8(Tensor q, Tensor absmax, Tensor code, int blocksize) -> Tensor");
}

}  // namespace lowrank_kernels
