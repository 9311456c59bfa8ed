// Run-time ISA choice of the CPU kernels (compiled once, at the baseline ISA; see isa.h).
#include "isa_dispatch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>

namespace lowrank_kernels::cpu {
namespace {

// The best ISA that this binary holds kernels for and this CPU (and OS) can run.
CpuIsa best_supported_isa() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();  // static initialisers may run before libgcc's own
  // __builtin_cpu_supports also checks that the OS saves the ymm / zmm state (XGETBV).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2"))
    return CpuIsa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2"))
    return CpuIsa::avx2;
#endif
  return CpuIsa::scalar;
}

bool cpu_has_avx512_bf16() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

struct IsaChoice {
  CpuIsa isa = CpuIsa::scalar;
  std::string error;
};

IsaChoice choose_isa() {
  const CpuIsa best = best_supported_isa();
  const char* env = std::getenv("LOWRANK_KERNELS_ISA");
  const std::string requested = env ? env : "";
  if (requested.empty()) return {best, ""};
  for (CpuIsa isa : {CpuIsa::scalar, CpuIsa::avx2, CpuIsa::avx512}) {
    if (requested != isa_name(isa)) continue;
    if (static_cast<int>(isa) <= static_cast<int>(best)) return {isa, ""};
    return {best, std::string("LOWRANK_KERNELS_ISA=") + requested + " asks for kernels this CPU cannot run (it runs: " +
                      supported_isas() + "); unset it or choose one of those"};
  }
  return {best, "LOWRANK_KERNELS_ISA must be scalar, avx2 or avx512 (or unset for the best this CPU runs: " +
                    supported_isas() + "), got '" + requested + "'"};
}

const IsaChoice& choice() {
  static const IsaChoice chosen = choose_isa();
  return chosen;
}

}  // namespace

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "scalar";
  }
}

CpuIsa active_isa() { return choice().isa; }

const std::string& isa_error() { return choice().error; }

std::string supported_isas() {
  std::string names = "scalar";
  for (int level = 1; level <= static_cast<int>(best_supported_isa()); ++level)
    names += std::string(",") + isa_name(static_cast<CpuIsa>(level));
  return names;
}

bool bf16_gemm_enabled() {
  const char* env = std::getenv("LOWRANK_KERNELS_CPU_BF16_GEMM");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) {
    static const bool hardware = active_isa() == CpuIsa::avx512 && cpu_has_avx512_bf16();
    return hardware;
  }
  if (std::strcmp(env, "on") == 0) return true;
  if (std::strcmp(env, "off") == 0) return false;
  TORCH_CHECK(false, "LOWRANK_KERNELS_CPU_BF16_GEMM must be auto, on or off (or unset for auto), got '", env, "'");
}

bool register_cpu_kernels(CpuIsa isa, void (*init)(torch::Library&), const char* file, uint32_t line) {
  if (!isa_error().empty() || isa != active_isa()) return false;
  // Kept alive for the life of the process, like TORCH_LIBRARY_IMPL's static libraries.
  static std::mutex mutex;
  static std::deque<std::unique_ptr<torch::Library>> libraries;
  const std::lock_guard<std::mutex> lock(mutex);
  libraries.push_back(
      std::make_unique<torch::Library>(torch::Library::IMPL, "lowrank_kernels", c10::DispatchKey::CPU, file, line));
  init(*libraries.back());
  return true;
}

}  // namespace lowrank_kernels::cpu
