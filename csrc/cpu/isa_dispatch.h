// Run-time choice of the CPU kernels' instruction set (see isa.h): the best one this CPU has,
// or the one LOWRANK_KERNELS_ISA=scalar|avx2|avx512 forces (refused when the CPU lacks it).
#pragma once

#include <torch/library.h>

#include <cstdint>
#include <string>

namespace lowrank_kernels::cpu {

enum class CpuIsa : int { scalar = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(CpuIsa isa);

// The ISA whose kernels are registered (meaningful when isa_error() is empty).
CpuIsa active_isa();
// Why no CPU kernels were registered (a bad LOWRANK_KERNELS_ISA), else "".
const std::string& isa_error();
// The ISAs compiled into this binary that this CPU can run, best last, e.g. "scalar,avx2,avx512".
std::string supported_isas();

// Whether the fused linear's GEMM path multiplies bf16 activations in bf16 (at::mm: oneDNN,
// fp32 accumulation) instead of widening them to fp32, from LOWRANK_KERNELS_CPU_BF16_GEMM, read
// at each call: auto (or unset) = where the avx512 kernels run on a CPU with AVX512-BF16 (whose
// bf16 dot products oneDNN uses, and AMX where present); on = on any CPU (correct everywhere,
// slow without that hardware; the tests force it so); off. Any other value throws the reason.
bool bf16_gemm_enabled();

// Called by every per-ISA kernel file at load time (LK_CPU_KERNELS): runs `init` on a CPU
// implementation library when `isa` is the active ISA. Returns whether it did.
bool register_cpu_kernels(CpuIsa isa, void (*init)(torch::Library&), const char* file, uint32_t line);

}  // namespace lowrank_kernels::cpu
