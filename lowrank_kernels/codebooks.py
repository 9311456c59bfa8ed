"""Code books of the NF4 and blockwise-8-bit formats (bitsandbytes 0.50 compatible).

The values mirror csrc/include/lowrank_kernels/nf4_math.h; tests check both against
bitsandbytes.
"""

from __future__ import annotations

import functools

import torch

#: The 16 NF4 code values, index 0..15 (QLoRA's normal-float 4-bit data type).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: Blocksize bitsandbytes uses for the second-level (double-quant) statistics.
DOUBLE_QUANT_BLOCKSIZE = 256


@functools.cache
def _nf4_code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 code book, fp32 ``[16]``."""
    return _nf4_code_cpu().to(device)


@functools.cache
def _dynamic_code_cpu() -> torch.Tensor:
    # bitsandbytes' signed "dynamic" map (create_dynamic_map(signed=True, 7, 8)): for each
    # exponent e = -6..0, 2**(e+6) evenly spaced fraction means in (0.1, 1) scaled by 10**e, both
    # signs; plus 0 and 1.
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist()
        values += (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic code book of the double-quant statistics, fp32 ``[256]``."""
    return _dynamic_code_cpu().to(device, copy=True)
