"""The torch.ops.lowrank_kernels ops: fake kernels for torch.compile and the CUDA registrations
that are not C++.

Schemas and CPU kernels are C++ (csrc/). On CUDA, an op is served by the CUDA C++ kernel when
the extension was compiled with CUDA, else by its Triton kernel, else by the PyTorch
reference (only the tiny double-quant statistics ops have no Triton kernel). `BACKENDS` records
the choice; `lowrank_kernels.build_info()` reports it.
"""
from __future__ import annotations

import importlib.util

import torch

from lowrank_kernels import _extension
from lowrank_kernels.reference import nf4 as reference

NAMESPACE = "lowrank_kernels"
NF4_OPS = ("quantize_nf4", "dequantize_nf4", "quantize_blockwise8", "dequantize_blockwise8")
FUSED_LINEAR_OPS = ("nf4_lowrank_linear", "nf4_lowrank_gemv", "nf4_lowrank_linear_grad_input", "fused_pissa_linear_nf4")
DECOMPOSE_OPS = ("row_col_sq_norms", "gram", "skinny_matmul")
ROBUST_OPS = ("huber_weights", "huber_normal_equations", "huber_loss", "spd_solve")
OPS = NF4_OPS + FUSED_LINEAR_OPS + DECOMPOSE_OPS + ROBUST_OPS
_TRITON_OPS = ("quantize_nf4", "dequantize_nf4", "row_col_sq_norms", "huber_weights")
# Ops whose GPU kernel is Triton even when CUDA C++ was compiled (GEMM-shaped work).
_TRITON_ONLY_OPS = ("gram", "huber_weights")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_or_reference(module: str, name: str, reference):
    """A CUDA kernel for an op that has no CUDA C++ one: ``lowrank_kernels.triton.<module>.<name>``
    (imported on first call: Triton is heavy to import), or the PyTorch ``reference`` where
    Triton is missing."""

    def kernel(*args):
        if triton_available():
            return getattr(importlib.import_module(f"lowrank_kernels.triton.{module}"), name)(*args)
        return reference(*args)

    kernel.__doc__ = f"CUDA kernel: lowrank_kernels.triton.{module}.{name}, else {reference.__name__}."
    return kernel


def cpu_decode_max_tokens() -> int:
    """Token counts up to this run the CPU fused linear's decode kernel, larger ones its GEMM kernel."""
    return _extension.compiled_config().get("cpu_decode_max_tokens", 0)


def cuda_gemv_max_tokens() -> int:
    """Token counts up to this run the CUDA GEMV kernel, larger ones the Triton GEMM kernel."""
    return _extension.compiled_config().get("cuda_gemv_max_tokens", 0)


def _cuda_backend(op: str) -> str:
    cuda_cpp = bool(_extension.compiled_config().get("cuda_kernels"))
    gemm = "Triton" if triton_available() else "PyTorch reference"
    if op in FUSED_LINEAR_OPS:
        gemv = "CUDA C++ GEMV" if cuda_cpp else gemm
        m = cuda_gemv_max_tokens()
        return {
            "nf4_lowrank_linear": f"{gemv} (M<={m}), {gemm} GEMM (M>{m})",
            "nf4_lowrank_gemv": gemv,
            "nf4_lowrank_linear_grad_input": f"{gemm} GEMM",
            "fused_pissa_linear_nf4": "autograd over nf4_lowrank_linear(_grad_input)",
        }[op]
    if op in _TRITON_ONLY_OPS:
        return gemm
    if op == "skinny_matmul":  # CPU only: rsvd calls cuBLAS on a GPU
        return "unused (rsvd uses cuBLAS)"
    if op == "spd_solve":  # tiny batched factorizations: cuSOLVER via torch.linalg
        return "torch.linalg (batched Cholesky)"
    if op in ("huber_normal_equations", "huber_loss"):
        return f"huber_weights ({gemm}) + cuBLAS GEMMs"
    if cuda_cpp:
        return "CUDA C++"
    return gemm if op in _TRITON_OPS else "PyTorch reference"


def _cpu_backend(op: str) -> str:
    simd = _extension.compiled_config().get("cpu_simd", "scalar")
    cxx = f"C++ ({simd.upper() if simd != 'scalar' else 'scalar'}, OpenMP)"
    m = cpu_decode_max_tokens()
    return {
        "nf4_lowrank_linear": f"{cxx} decode (M<={m}), panel GEMM (M>{m})",
        "nf4_lowrank_gemv": f"{cxx} decode",
        "nf4_lowrank_linear_grad_input": f"{cxx} decode (M<={m}), panel GEMM (M>{m})",
        "fused_pissa_linear_nf4": "autograd over nf4_lowrank_linear(_grad_input)",
    }.get(op, cxx)


def backends() -> dict[str, dict[str, str]]:
    """op -> {device type -> kernel(s) serving it, with the token ranges of each}."""
    if _extension.load_error() is not None:
        return {op: {"cpu": "unavailable (extension not built)", "cuda": "unavailable"} for op in OPS}
    cuda = {op: _cuda_backend(op) if torch.version.cuda else "unavailable (CPU-only torch)" for op in OPS}
    return {op: {"cpu": _cpu_backend(op), "cuda": cuda[op]} for op in OPS}


def _register_fakes() -> None:
    def nblocks(n: int, blocksize: int) -> int:
        return (n + blocksize - 1) // blocksize

    @torch.library.register_fake(f"{NAMESPACE}::quantize_nf4")
    def _(w, blocksize):
        n = w.numel()
        return w.new_empty((n + 1) // 2, dtype=torch.uint8), w.new_empty(nblocks(n, blocksize), dtype=torch.float32)

    @torch.library.register_fake(f"{NAMESPACE}::dequantize_nf4")
    def _(packed, absmax, blocksize, numel, dtype):
        return packed.new_empty(numel, dtype=dtype)

    @torch.library.register_fake(f"{NAMESPACE}::dequantize_nf4.out")
    def _(packed, absmax, blocksize, numel, dtype, *, out):
        return None

    @torch.library.register_fake(f"{NAMESPACE}::quantize_blockwise8")
    def _(x, code, blocksize):
        return x.new_empty(x.numel(), dtype=torch.uint8), x.new_empty(nblocks(x.numel(), blocksize))

    @torch.library.register_fake(f"{NAMESPACE}::dequantize_blockwise8")
    def _(q, absmax, code, blocksize):
        return absmax.new_empty(q.numel())


def _register_cuda_fallbacks() -> None:
    """CUDA kernels for ops the compiled extension does not serve on CUDA (no nvcc at build)."""
    impls = {
        "quantize_blockwise8": reference.quantize_blockwise8_ref,
        "dequantize_blockwise8": reference.dequantize_blockwise8_ref,
        "quantize_nf4": triton_or_reference("nf4", "quantize_nf4", reference.quantize_nf4_ref),
        "dequantize_nf4": triton_or_reference("nf4", "dequantize_nf4", reference.dequantize_nf4_ref),
    }
    for name, fn in impls.items():
        torch.library.register_kernel(f"{NAMESPACE}::{name}", "cuda", fn)
    dequantize = impls["dequantize_nf4"]

    def dequantize_out(packed, absmax, blocksize, numel, dtype, *, out):
        out.copy_(dequantize(packed, absmax, blocksize, numel, dtype))

    torch.library.register_kernel(f"{NAMESPACE}::dequantize_nf4.out", "cuda", dequantize_out)


def register() -> None:
    """Registers fake kernels (and CUDA fallbacks when needed) once the extension is loaded."""
    if _extension.load_error() is not None:
        return
    _register_fakes()
    if torch.version.cuda and not _extension.compiled_config().get("cuda_kernels"):
        _register_cuda_fallbacks()


def op(name: str):
    """The OpOverloadPacket torch.ops.lowrank_kernels.<name>, or a clear error if not built."""
    if not torch.compiler.is_compiling():  # checked once in eager; dynamo cannot trace the import
        _extension.require()
    return getattr(torch.ops.lowrank_kernels, name)


register()
