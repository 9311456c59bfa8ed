"""What the compiled core contains and which backend serves each op on each device."""

from __future__ import annotations

import importlib.metadata

import torch

from lowrank_kernels import _extension, ops


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def build_info() -> dict:
    """{"extension_loaded", "load_error", "cpu_kernels", "cpu_simd", "cpu_isas_supported", "cpu_bf16_gemm",
    "cuda_kernels", "cuda_archs", "triton", "torch", "torch_cuda", "backends": {op: {"cpu": ..., "cuda": ...}}}.

    cpu_simd is the instruction set of the CPU kernels that run ("scalar", "avx2" or "avx512";
    chosen at load time, LOWRANK_KERNELS_ISA forces a lower one); cpu_isas_supported lists every
    one this CPU can run. cpu_bf16_gemm: whether the fused linear's GEMM kernel multiplies bf16
    activations in bf16 (ops.cpu_bf16_gemm; LOWRANK_KERNELS_CPU_BF16_GEMM=auto|on|off)."""
    config = _extension.compiled_config()
    archs = config.get("cuda_archs", "")
    return {
        "extension_loaded": _extension.load_error() is None,
        "load_error": _extension.load_error(),
        "cpu_kernels": bool(config.get("cpu_kernels", False)),
        "cpu_simd": config.get("cpu_simd"),
        "cpu_isas_supported": [isa for isa in config.get("cpu_isas_supported", "").split(",") if isa],
        "cpu_bf16_gemm": ops.cpu_bf16_gemm(),
        "cuda_kernels": bool(config.get("cuda_kernels", False)),
        "cuda_archs": [a for a in archs.replace(",", ";").split(";") if a],
        "triton": _triton_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "backends": ops.backends(),
    }


def format_build_info(info: dict | None = None) -> str:
    """A human-readable table of `build_info()`."""
    info = info or build_info()
    lines = [
        f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}), triton {info['triton'] or 'not installed'}",
        f"extension loaded: {info['extension_loaded']}" + (f" ({info['load_error']})" if info["load_error"] else ""),
        f"CPU kernels: {info['cpu_kernels']} (ISA: {info['cpu_simd']} of {', '.join(info['cpu_isas_supported']) or '-'};"
        " LOWRANK_KERNELS_ISA forces one)",
        f"fused linear GEMM on bf16 activations: in {'bf16 (oneDNN)' if info['cpu_bf16_gemm'] else 'fp32'}"
        " (LOWRANK_KERNELS_CPU_BF16_GEMM=auto|on|off)",
        f"CUDA kernels: {info['cuda_kernels']} (archs: {', '.join(info['cuda_archs']) or '-'})",
        "",
    ]
    rows = [("op", "cpu", "cuda")] + [(op, d["cpu"], d["cuda"]) for op, d in info["backends"].items()]
    op_width, cpu_width = (max(len(row[i]) for row in rows) + 2 for i in (0, 1))
    lines += [f"{op:<{op_width}}{cpu:<{cpu_width}}{cuda}" for op, cpu, cuda in rows]
    return "\n".join(lines)
