// Per-ISA compilation of the CPU kernels (ATen's DispatchStub scheme with per-function targets).
//
// setup.py compiles every csrc/cpu/*_cpu.cpp once per instruction set (scalar; on x86 also
// avx2 = AVX2+FMA+F16C and avx512 = AVX-512 F/BW/VL/DQ) from generated wrapper files that define
// LK_CPU_ISA_LEVEL (0, 1, 2) and LK_CPU_ISA_NAME (scalar, avx2, avx512), then #include the source.
// The build flags name no ISA, so the binary does not depend on the build host: isa_dispatch.cpp
// reads the CPU's features at load time and registers the kernels of one ISA only.
//
// Include this header LAST in a kernel file, after every library header: from here on the
// `#pragma GCC target` below applies. Functions of library headers (ATen, the C++ standard
// library, checks.h, nf4_math.h) were declared before it and keep the baseline ISA, so no inline
// function shared between the per-ISA objects is ever compiled with AVX instructions (the linker
// keeps one copy of each). The project's own SIMD headers (float_convert.h, horizontal_sum.h,
// fma_tile.h, nf4_decode.h, huber_simd.h) include this one, so a kernel file includes them after
// its library headers, and each of them includes its library headers before any of the others.
// They live in the inline namespace `cpu::LK_CPU_ISA_NAME`, and the kernels in anonymous
// namespaces, so every ISA's copy has its own symbols.
#pragma once

#include <torch/library.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // GCC and Clang declare every intrinsic whatever the build flags
#endif

#include "isa_dispatch.h"

#ifndef LK_CPU_ISA_LEVEL
#error "csrc/cpu/*_cpu.cpp are compiled once per ISA through setup.py's generated wrappers"
#endif

#if LK_CPU_ISA_LEVEL >= 2
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
#define LK_HAVE_AVX2 1
#define LK_HAVE_AVX512 1
#elif LK_CPU_ISA_LEVEL == 1
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#define LK_HAVE_AVX2 1
#endif

// Registers this file's CPU kernels when the ISA it was compiled for is the one chosen at load
// time (a TORCH_LIBRARY_IMPL(lowrank_kernels, CPU, m) that only one ISA's copy runs). Use inside
// an anonymous namespace:  LK_CPU_KERNELS(m) { m.impl("op", &op_cpu); }
#define LK_CPU_KERNELS(m)                                                                                           \
  void lk_register_cpu_kernels(torch::Library& m);                                                                  \
  const bool lk_cpu_kernels_registered = ::lowrank_kernels::cpu::register_cpu_kernels(                              \
      static_cast<::lowrank_kernels::cpu::CpuIsa>(LK_CPU_ISA_LEVEL), &lk_register_cpu_kernels, __FILE__, __LINE__); \
  void lk_register_cpu_kernels(torch::Library& m)
