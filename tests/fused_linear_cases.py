"""Shapes, operands and the error bound shared by the C++ and Triton fused-linear tests.

Every kernel is compared with the fp64 reference (lowrank_kernels.reference.fused_linear) under
a rigorous bound for fp32 accumulation in any order: |y - ref| <= gamma * |x| |W|^T (+ the same
for the low-rank and bias terms) + eps(out dtype) * |ref|, gamma = (terms + 2) * 2^-24. The CPU's
bf16 GEMM path also rounds W and s * lowrank_x to bf16 (unit roundoff 2^-8): bf16_operands adds
2^-8 * |x| |W|^T (+ the low-rank term) for it.
A single wrong weight element, code or scale breaks it by orders of magnitude (see
test_bound_catches_a_wrong_kernel).
"""

from __future__ import annotations

import torch

from lowrank_kernels import ops
from lowrank_kernels.reference.fused_linear import _weight
from lowrank_kernels.reference.nf4 import quantize_nf4_ref

# (out_features N, in_features K, blocksize): rows aligned to blocks (the CPU decode kernels'
# split-order path, whose AVX-512 decoder takes 32 columns at a time: K = 96 at blocksize 32 is
# three such groups, one block each); rows straddling blocks; odd K (rows starting mid-byte); N, K not multiples
# of 64 or of any tile size.
SHAPES = [(64, 128, 64), (24, 384, 128), (40, 96, 32), (37, 100, 64), (33, 77, 32), (130, 64, 128), (5, 257, 32)]
RANKS = [1, 3, 16]
FP32_UNIT_ROUNDOFF = 2.0**-24
BF16_UNIT_ROUNDOFF = 2.0**-8


def nf4_storage(n: int, k: int, blocksize: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3  # rows of different scales
    return quantize_nf4_ref(w, blocksize)


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def error_bound(
    terms: list[tuple[torch.Tensor, torch.Tensor]],
    ref: torch.Tensor,
    inner: int,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    bf16_operands: bool = False,
) -> torch.Tensor:
    """Bound on |kernel - ref| for ref = sum_i a_i @ b_i (+ bias) accumulated in fp32, with the
    b_i (or the a_i) rounded to bf16 first when bf16_operands."""
    products = sum(a.double().abs() @ b.double().abs() for a, b in terms)
    magnitude = products + (bias.double().abs() if bias is not None else 0.0)
    gamma = (inner + 4) * FP32_UNIT_ROUNDOFF
    out_eps = torch.finfo(out_dtype).eps if out_dtype != torch.float32 else 0.0
    bound = gamma * magnitude + out_eps * ref.double().abs() + 1e-30
    if bf16_operands:  # each rounded operand is within u of its value and grows by at most 1 + u
        bound = bound + BF16_UNIT_ROUNDOFF * (products + gamma * magnitude)
    return bound


def assert_within(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = (y.double() - ref.double()).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds the bound by {worst:.3g}x"


def forward_case(n, k, blocksize, m, r, dtype, with_bias, seed=0):
    """Operands of nf4_lowrank_linear: (x, packed, absmax, blocksize, n, lowrank_x, up, scale, bias)."""
    packed, absmax = nf4_storage(n, k, blocksize, seed)
    bias = randn(n, dtype=dtype, seed=seed + 4) if with_bias else None
    return (
        randn(m, k, dtype=dtype, seed=seed + 1),
        packed,
        absmax,
        blocksize,
        n,
        randn(m, r, dtype=dtype, seed=seed + 2),
        randn(n, r, dtype=dtype, seed=seed + 3),
        -0.75,
        bias,
    )


def forward_bound(args, ref, bf16_operands=False):
    x, packed, absmax, blocksize, n, lowrank_x, up, scale, bias = args
    w = _weight(packed, absmax, blocksize, n, x.shape[1])
    terms = [(x, w.T), (abs(scale) * lowrank_x.double(), up.double().T)]
    return error_bound(terms, ref, x.shape[1] + up.shape[1], x.dtype, bias, bf16_operands)


def grad_input_case(n, k, blocksize, m, r, dtype, seed=0):
    """Operands of nf4_lowrank_linear_grad_input: (grad_y, packed, absmax, blocksize, k, lowrank_grad, down, scale)."""
    packed, absmax = nf4_storage(n, k, blocksize, seed)
    return (
        randn(m, n, dtype=dtype, seed=seed + 1),
        packed,
        absmax,
        blocksize,
        k,
        randn(m, r, dtype=dtype, seed=seed + 2),
        randn(r, k, dtype=dtype, seed=seed + 3),
        1.5,
    )


def grad_input_bound(args, ref, bf16_operands=False):
    grad_y, packed, absmax, blocksize, k, lowrank_grad, down, scale = args
    w = _weight(packed, absmax, blocksize, grad_y.shape[1], k)
    terms = [(grad_y, w), (abs(scale) * lowrank_grad.double(), down.double())]
    return error_bound(terms, ref, grad_y.shape[1] + down.shape[0], grad_y.dtype, bf16_operands=bf16_operands)


def cpu_bf16_gemm_serves(dtype: torch.dtype, tokens: int) -> bool:
    """Whether the C++ fused-linear ops take the bf16 GEMM path for this call (build_info)."""
    return dtype == torch.bfloat16 and tokens > ops.cpu_decode_max_tokens() and ops.cpu_bf16_gemm()
