"""Test matrices for the NF4 kernels, shared by the C++/CUDA tests and the Triton tests."""

from __future__ import annotations

import torch

from lowrank_kernels.codebooks import NF4_CODE

BLOCKSIZES = [64, 128, 256]
SHAPES = [(1,), (7,), (64,), (1000,), (1, 1), (3, 5), (33, 77), (64, 64), (127, 129), (256, 384)]


def boundary_values() -> torch.Tensor:
    """A block holding 1.0 (so absmax = 1) and every NF4 decision boundary exactly, plus the code
    values and their fp32 neighbours: the tie cases of the encoder."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    mids = (code[:-1] + code[1:]) / 2
    near = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), code])
    return torch.cat([torch.ones(1), near, -near])


def make_weight(shape, dtype, case: str, seed: int = 0) -> torch.Tensor:
    """Weights for one case: 'normal', 'zero_blocks' (some all-zero blocks and a zero tail),
    'large' (1e34, or near the fp16 limit), 'extreme' (near the dtype's largest finite value),
    'boundaries' (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    if case == "normal":
        w = torch.randn(n, generator=g) * 0.02
    elif case == "zero_blocks":
        w = torch.randn(n, generator=g)
        w[: min(n, 128)] = 0
        w[-min(n, 40) :] = 0
    elif case in ("large", "extreme"):
        limit = 6e4 if dtype == torch.float16 else (3e38 if case == "extreme" else 1e34)
        w = (torch.rand(n, generator=g) * 2 - 1) * limit
        w[:: max(1, n // 7)] = limit
    elif case == "boundaries":
        pattern = boundary_values()
        w = pattern.repeat(n // pattern.numel() + 1)[:n]
    else:
        raise ValueError(case)
    return w.to(dtype).reshape(shape)


CASES = ["normal", "zero_blocks", "large", "extreme", "boundaries"]
