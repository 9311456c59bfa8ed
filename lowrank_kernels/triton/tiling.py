"""Shared pieces of the tiled Triton kernels: the fp32 dot, and autotune-config pruning by the
shared memory of the device (or, in the GPU-fit gate, of a target).

fp32 dots run as 3xTF32 (``input_precision="tf32x3"``): tensor cores, and a product error of
about 2^-21 relative (a ~ a_hi + a_lo in TF32, a*b ~ a_hi*b_hi + a_hi*b_lo + a_lo*b_hi; the
dropped a_lo*b_lo term and the TF32 rounding of the pieces are below 2 fp32 ulps of |a||b|),
so fp32 results stay within a few fp32 ulps of |a||b| per product, like an fp32 FMA dot.
An "ieee" dot compiles to plain FMAs, which ptxas spills at the tiles used here; plain TF32
would err by 2^-11 relative. The interpreter computes every dot in fp32, so interpreter tests
check the fp32 bound and the 3xTF32 term is added to their tolerance (see tests/triton).
"""

from __future__ import annotations

from typing import Callable, Iterable

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, DOT_TY: tl.constexpr):
    """acc + a @ b with operands in DOT_TY; fp32 as 3xTF32 (see the module docstring)."""
    if DOT_TY == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        return tl.dot(a.to(DOT_TY), b.to(DOT_TY), acc)


def device_smem_limit() -> int:
    """Opt-in shared memory per block of the current CUDA device, in bytes."""
    from triton.runtime import driver

    device = driver.active.get_current_device()
    return driver.active.utils.get_device_properties(device)["max_shared_mem"]


def keep_fitting(
    configs: Iterable[triton.Config], smem_bytes: Callable[[triton.Config], int], smem_limit: int | None
) -> list[triton.Config]:
    """The configs whose estimated shared memory fits ``smem_limit`` (the current device's when
    None); never empty: the smallest one if none fits, so a launch fails loudly rather than the
    autotuner having nothing to try."""
    configs = list(configs)
    limit = device_smem_limit() if smem_limit is None else smem_limit
    fitting = [c for c in configs if smem_bytes(c) <= limit]
    return fitting or [min(configs, key=smem_bytes)]
