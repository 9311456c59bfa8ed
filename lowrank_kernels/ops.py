"""The torch.ops.lowrank_kernels ops, as the rest of the package calls them.

`op(name)` returns an op (or raises `ExtensionNotBuiltError`); the op lists, the backend table
and the dispatch thresholds are read from the registry (`lowrank_kernels._registry`), which
holds each op's schema, fake kernel, autograd formula and Python CUDA kernel.
"""

from __future__ import annotations

from lowrank_kernels._registry import (
    NAMESPACE,
    backends,
    cpu_bf16_gemm,
    cpu_decode_max_tokens,
    cuda_gemv_max_tokens,
    names,
    op,
    triton_available,
)

NF4_OPS = names("nf4")
FUSED_LINEAR_OPS = names("fused_linear")
DECOMPOSE_OPS = names("decompose")
ROBUST_OPS = names("robust")
#: Every op that computes on tensors (the rows of `backends()`).
OPS = names()

__all__ = [
    "NAMESPACE",
    "OPS",
    "NF4_OPS",
    "FUSED_LINEAR_OPS",
    "DECOMPOSE_OPS",
    "ROBUST_OPS",
    "backends",
    "cpu_bf16_gemm",
    "cpu_decode_max_tokens",
    "cuda_gemv_max_tokens",
    "op",
    "triton_available",
]
