"""Reference NF4 / blockwise-8-bit quantization in plain PyTorch (any device).

Written for clarity as the format is specified (ARCHITECTURE.md, notation), with the same fp32 operations
as bitsandbytes 0.50's CPU path so results are bit-identical. Complete blocks are handled as
one ``[blocks, blocksize]`` matrix, the trailing partial block (if any) separately.
"""

from __future__ import annotations

import torch

from lowrank_kernels.codebooks import nf4_code

_MIN_ABSMAX = 1e-38


def _split_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat ``[n]`` -> (complete blocks ``[n // bs, bs]``, tail ``[n % bs]``)."""
    full = flat.numel() - flat.numel() % blocksize
    return flat[:full].reshape(-1, blocksize), flat[full:]


def quantize_nf4_ref(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (any shape, fp32/fp16/bf16) -> ``packed`` uint8 ``[ceil(n/2)]``, ``absmax`` fp32 ``[ceil(n/bs)]``."""
    code = nf4_code(w.device)
    boundaries = (code[:-1] + code[1:]) / 2
    blocks, tail = _split_blocks(w.reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(dim=1) if blocks.numel() else blocks.new_zeros(0)
    # Complete blocks multiply by the reciprocal of the clamped absmax ...
    scaled = [(blocks * (1.0 / absmax.clamp(min=_MIN_ABSMAX))[:, None]).reshape(-1)]
    if tail.numel():  # ... the tail divides, and stores the clamped absmax.
        tail_absmax = tail.abs().max().clamp(min=_MIN_ABSMAX)
        scaled.append(tail / tail_absmax)
        absmax = torch.cat([absmax, tail_absmax[None]])
    scaled = torch.cat(scaled).clamp(-1, 1)
    if scaled.numel() % 2:  # an odd count is padded with 0.0
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    q = torch.bucketize(scaled, boundaries)  # nearest code; a tie goes to the lower one
    packed = (q[0::2] << 4 | q[1::2]).to(torch.uint8)  # first element in the high nibble
    return packed, absmax


def dequantize_nf4_ref(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """``packed`` uint8, ``absmax`` fp32 -> flat ``[numel]`` tensor of ``dtype``: code * absmax."""
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:numel].long()
    values = nf4_code(packed.device)[nibbles]
    scale = absmax.repeat_interleave(blocksize)[:numel]
    return (values * scale).to(dtype)


def quantize_blockwise8_ref(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` -> uint8 indices into the sorted 256-value ``code`` and fp32 per-block absmax.

    Each element is ``x / absmax``, rounded to the nearest code value; a tie goes to the lower.
    Like bitsandbytes, the search treats code[0] as -1.0.
    """
    code = torch.cat([code.new_full((1,), -1.0), code[1:]])
    blocks, tail = _split_blocks(x.reshape(-1).float(), blocksize)
    absmax = blocks.abs().amax(dim=1) if blocks.numel() else blocks.new_zeros(0)
    normed = [(blocks / absmax[:, None]).reshape(-1)]
    if tail.numel():
        tail_absmax = tail.abs().max()
        normed.append(tail / tail_absmax)
        absmax = torch.cat([absmax, tail_absmax[None]])
    normed = torch.cat(normed)
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, 255)
    right = (left + 1).clamp(max=255)
    closer_right = (normed - code[right]).abs() < (normed - code[left]).abs()
    return torch.where(closer_right, right, left).to(torch.uint8), absmax


def dequantize_blockwise8_ref(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """uint8 ``q`` -> fp32 ``code[q] * absmax[block]``."""
    return code[q.long()] * absmax.repeat_interleave(blocksize)[: q.numel()]
