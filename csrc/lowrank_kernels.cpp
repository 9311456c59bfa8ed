// Op schemas of the torch.ops.lowrank_kernels namespace (defined once here; CPU kernels in
// cpu/, CUDA kernels in cuda/, fake kernels and Triton registrations in the Python package),
// plus build_info() describing what this binary was compiled with and which CPU ISA it runs.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/isa_dispatch.h"
#include "cpu/output_cache.h"
#include "lowrank_kernels/nf4_linear_math.h"
#include "lowrank_kernels_build_config.h"

extern "C" {
// A Python module `lowrank_kernels._C` with no methods: importing it loads the shared library,
// whose static initialisers register the ops (pytorch/extension-cpp pattern, no pybind11).
// A LOWRANK_KERNELS_ISA this CPU cannot run registered no CPU kernels: the import fails with why.
PyObject* PyInit__C(void) {
  const std::string& isa_error = lowrank_kernels::cpu::isa_error();
  if (!isa_error.empty()) {
    PyErr_SetString(PyExc_RuntimeError, isa_error.c_str());
    return nullptr;
  }
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace lowrank_kernels {

std::string build_info() {
  std::string info = "{\"cpu_kernels\": true";
  // The ISA whose kernels serve the CPU ops (isa_dispatch.cpp), and every one this CPU could run.
  info += std::string(", \"cpu_simd\": \"") + cpu::isa_name(cpu::active_isa()) + "\"";
  info += ", \"cpu_isas_supported\": \"" + cpu::supported_isas() + "\"";
#ifdef LOWRANK_KERNELS_WITH_CUDA
  info += ", \"cuda_kernels\": true, \"cuda_archs\": \"" LOWRANK_KERNELS_CUDA_ARCHS "\"";
#else
  info += ", \"cuda_kernels\": false, \"cuda_archs\": \"\"";
#endif
  info += ", \"cpu_decode_max_tokens\": " + std::to_string(kCpuDecodeMaxTokens);
  info += ", \"cuda_gemv_max_tokens\": " + std::to_string(kCudaGemvMaxTokens);
  return info + "}";
}

TORCH_LIBRARY(lowrank_kernels, m) {
  m.def("build_info() -> str", &build_info);
  // Whether the CPU fused linear's GEMM path multiplies bf16 activations in bf16 (isa_dispatch.h;
  // a run-time choice, LOWRANK_KERNELS_CPU_BF16_GEMM, so not part of build_info).
  m.def("cpu_bf16_gemm() -> bool", &cpu::bf16_gemm_enabled);
  // The cache of freed large CPU op outputs (cpu/output_cache.h): [idle bytes, limit bytes, hits, misses].
  m.def("output_cache_info() -> int[]", &cpu::output_cache_info);
  m.def("set_output_cache_limit(int max_bytes) -> ()", &cpu::set_output_cache_limit);
  m.def("empty_output_cache() -> ()", &cpu::empty_output_cache);
  m.def("quantize_nf4(Tensor w, int blocksize) -> (Tensor packed, Tensor absmax)");
  m.def("dequantize_nf4(Tensor packed, Tensor absmax, int blocksize, int numel, ScalarType dtype) -> Tensor");
  m.def(
      "dequantize_nf4.out(Tensor packed, Tensor absmax, int blocksize, int numel, ScalarType dtype, *, "
      "Tensor(a!) out) -> ()");
  m.def("quantize_blockwise8(Tensor x, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)");
  m.def("dequantize_blockwise8(Tensor q, Tensor absmax, Tensor code, int blocksize) -> Tensor");
  // Fused QPiSSA linear, W = dequantize_nf4(packed, absmax) viewed [out_features, in_features]:
  //   nf4_lowrank_linear:  y  = x @ W^T + scale * lowrank_x @ up^T (+ bias)      [M, out_features]
  //   nf4_lowrank_gemv:    the same, always on the few-token decode kernel
  //   nf4_lowrank_linear_grad_input:
  //                        dx = grad_y @ W + scale * lowrank_grad @ down          [M, in_features]
  //   fused_pissa_linear_nf4: the autograd op, y = x @ W^T + scale * (x @ B^T) @ A^T (+ bias)
  m.def(
      "nf4_lowrank_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, int out_features, "
      "Tensor lowrank_x, Tensor up, float scale, Tensor? bias) -> Tensor");
  m.def(
      "nf4_lowrank_gemv(Tensor x, Tensor packed, Tensor absmax, int blocksize, int out_features, "
      "Tensor lowrank_x, Tensor up, float scale, Tensor? bias) -> Tensor");
  m.def(
      "nf4_lowrank_linear_grad_input(Tensor grad_y, Tensor packed, Tensor absmax, int blocksize, "
      "int in_features, Tensor lowrank_grad, Tensor down, float scale) -> Tensor");
  m.def(
      "fused_pissa_linear_nf4(Tensor x, Tensor packed, Tensor absmax, int blocksize, Tensor A, Tensor B, "
      "Tensor? bias, float scale) -> Tensor");
  // Decompositions, W / Y batched over leading dims, results in fp32:
  //   row_col_sq_norms: (sum_j W_ij^2 [..., m], sum_i W_ij^2 [..., n]) in one pass over W [..., m, n]
  //   gram:             Y^T Y [..., k, k] of a tall-skinny Y [..., m, k], accumulated in fp32
  m.def("row_col_sq_norms(Tensor w) -> (Tensor row_norms, Tensor col_norms)");
  m.def("gram(Tensor y) -> Tensor");
  //   skinny_matmul:    W @ X or Wᵀ @ X [..., M|N, l] fp32 for W [..., M, N] (any float dtype), thin fp32 X
  m.def("skinny_matmul(Tensor w, Tensor x, bool transpose_w) -> Tensor");
  // Robust PiSSA (IRLS for min Σ huber(A B − W)), E = A B − W formed in registers, never stored:
  //   huber_weights: (ω(E) [..., m, n], ψ(E) [..., m, n] at weight_delta, [Σ huber(E) at loss_delta, Σ |E|] [..., 2]
  //   fp64),
  //                  deltas: fp32 [...], one per matrix
  m.def(
      "huber_weights(Tensor w, Tensor a, Tensor b, Tensor weight_delta, Tensor loss_delta) -> "
      "(Tensor omega, Tensor psi, Tensor stats)");
  //   spd_solve: x = (G + λI)⁻¹ g for small symmetric PSD G [..., r, r], g [..., r] (fp32; fp64 inside;
  //              λ = 0 unless Cholesky fails, then a growing ridge)
  m.def("spd_solve(Tensor gram, Tensor rhs) -> Tensor");
  //   huber_normal_equations: the IRLS step's normal equations for every column j of W, in one read of W:
  //                           (G [..., n, r, r] = Σ_i ω(E_ij) a_i a_iᵀ, g [..., n, r] = Σ_i ψ(E_ij) a_i, stats [...,
  //                           2])
  //   huber_loss:             stats only ([Σ huber(E) at loss_delta, Σ |E|] [..., 2] fp64)
  m.def(
      "huber_normal_equations(Tensor w, Tensor a, Tensor b, Tensor weight_delta, Tensor loss_delta) -> "
      "(Tensor gram, Tensor grad, Tensor stats)");
  m.def("huber_loss(Tensor w, Tensor a, Tensor b, Tensor loss_delta) -> Tensor");
}

}  // namespace lowrank_kernels
