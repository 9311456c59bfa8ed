"""The cache of freed large CPU op outputs (csrc/cpu/output_cache.h).

A fresh multi-MiB CPU tensor pays a page fault and kernel zeroing per page on first touch, which
costs more than a memory-bound op such as ``dequantize_nf4`` itself. Large outputs of the CPU
kernels (today: ``dequantize_nf4``) therefore come from a bounded cache of freed blocks: a block
goes back to the cache when its tensor dies and serves the next output of the same size rounded
up to 2 MiB (blocks are never split, unlike PyTorch's CUDA caching allocator). Idle blocks are
evicted oldest first.

The limit (idle bytes kept resident, per process) starts at ``LOWRANK_KERNELS_OUTPUT_CACHE_MB``
(default 512 MiB; read, and a bad value reported, at the first CPU op or cache call);
``set_output_cache_limit(0)`` turns the cache off, ``empty_output_cache()`` returns idle blocks
to the system.
"""

from __future__ import annotations

from typing import NamedTuple

from lowrank_kernels import ops
from lowrank_kernels._checks import is_int


class OutputCacheInfo(NamedTuple):
    idle_bytes: int  # held by the cache for reuse, owned by no tensor
    limit_bytes: int
    hits: int  # outputs served from the cache
    misses: int  # outputs that needed fresh memory


def output_cache_info() -> OutputCacheInfo:
    """Idle bytes, limit and hit / miss counts of the CPU output cache."""
    return OutputCacheInfo(*ops.op("output_cache_info")())


def set_output_cache_limit(max_bytes: int) -> None:
    """Keeps at most ``max_bytes`` of freed outputs for reuse (0: no cache); frees idle blocks over it."""
    if not is_int(max_bytes) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    ops.op("set_output_cache_limit")(max_bytes)


def empty_output_cache() -> None:
    """Returns every idle block of the CPU output cache to the system (tensors alive are untouched)."""
    ops.op("empty_output_cache")()
