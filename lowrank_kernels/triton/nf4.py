"""Triton NF4 quantize / dequantize kernels, bit-identical to the C++ kernels and bitsandbytes.

Arithmetic mirrors csrc/include/lowrank_kernels/nf4_math.h: correctly rounded division
(tl.div_rn; Triton's `/` is approximate on GPUs), multiplication by the code value, no adds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.codebooks import nf4_code
from lowrank_kernels.triton._common import TL_DTYPES, check_device, round_to

_DEQUANT_BYTES_PER_PROGRAM = 1024
_MIN_ABSMAX = 1e-38


@triton.jit
def _dequantize_nf4_kernel(
    # pointers
    packed_ptr,
    absmax_ptr,
    code_ptr,
    out_ptr,
    # sizes
    numel,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    BYTES: tl.constexpr,
    OUT_TY: tl.constexpr,
):
    # int64: element indices reach 2^31 on large weights (and byte indices 2^31 at 2^32).
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    first = byte * 2  # element index of the high nibble; 2 divides BLOCKSIZE
    in_range = first < numel
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + first // BLOCKSIZE, mask=in_range, other=0.0)
    high = tl.load(code_ptr + (packed >> 4)) * scale
    low = tl.load(code_ptr + (packed & 0xF)) * scale
    tl.store(out_ptr + first, round_to(high, OUT_TY), mask=in_range)
    tl.store(out_ptr + first + 1, round_to(low, OUT_TY), mask=first + 1 < numel)


@triton.jit
def _quantize_nf4_kernel(
    # pointers
    x_ptr,
    boundaries_ptr,
    packed_ptr,
    absmax_ptr,
    # sizes
    numel,
    # meta-parameters
    BLOCKSIZE: tl.constexpr,
    MIN_ABSMAX: tl.constexpr,
):
    # One program per quantization block.
    block = tl.program_id(0)
    first = block.to(tl.int64) * BLOCKSIZE
    offs = tl.arange(0, BLOCKSIZE)
    mask = first + offs < numel
    x = tl.load(x_ptr + first + offs, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=0)
    # x - x is 0 for finite x and NaN otherwise: a NaN absmax reports non-finite input.
    probe = tl.sum(x - x, axis=0)
    clamped = tl.maximum(absmax, MIN_ABSMAX).to(tl.float32)
    is_tail = first + BLOCKSIZE > numel
    # Complete blocks multiply by the reciprocal, the tail divides (as bitsandbytes does).
    reciprocal = tl.div_rn(clamped * 0.0 + 1.0, clamped)
    scaled = tl.where(is_tail, tl.div_rn(x, tl.zeros_like(x) + clamped), x * reciprocal)
    boundaries = tl.load(boundaries_ptr + tl.arange(0, 16), mask=tl.arange(0, 16) < 15, other=float("inf"))
    codes = tl.sum((scaled[:, None] > boundaries[None, :]).to(tl.int32), axis=1)
    high, low = tl.split(tl.reshape(codes, (BLOCKSIZE // 2, 2)))
    packed = (high << 4 | low).to(tl.uint8)
    byte = first // 2 + tl.arange(0, BLOCKSIZE // 2)
    tl.store(packed_ptr + byte, packed, mask=byte < (numel + 1) // 2)
    stored = tl.where(is_tail, clamped, absmax)
    tl.store(absmax_ptr + block, tl.where(probe == 0.0, stored, probe))


def dequantize_nf4(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 ``packed [ceil(numel/2)]``, fp32 ``absmax [ceil(numel/bs)]`` -> ``dtype [numel]``."""
    check_device(packed, "packed")
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    if numel:
        grid = (triton.cdiv(packed.numel(), _DEQUANT_BYTES_PER_PROGRAM),)
        _dequantize_nf4_kernel[grid](
            packed.contiguous(),
            absmax.contiguous(),
            nf4_code(packed.device),
            out,
            numel,
            BLOCKSIZE=blocksize,
            BYTES=_DEQUANT_BYTES_PER_PROGRAM,
            OUT_TY=TL_DTYPES[dtype],
        )
    return out


def quantize_nf4(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32/fp16/bf16 ``w`` (any shape) -> uint8 ``packed [ceil(n/2)]``, fp32 ``absmax [ceil(n/bs)]``."""
    check_device(w, "w")
    numel = w.numel()
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=w.device)
    blocks = triton.cdiv(numel, blocksize)
    absmax = torch.empty(blocks, dtype=torch.float32, device=w.device)
    if numel:
        code = nf4_code(w.device)
        boundaries = (code[:-1] + code[1:]) / 2
        _quantize_nf4_kernel[(blocks,)](
            w.contiguous().reshape(-1),
            boundaries,
            packed,
            absmax,
            numel,
            BLOCKSIZE=blocksize,
            MIN_ABSMAX=_MIN_ABSMAX,
        )
    return packed, absmax
