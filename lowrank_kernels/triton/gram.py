"""Triton Gram matrix ``G = yᵀ y`` (fp32) of tall-skinny blocks ``y [..., m, k]``, for CholeskyQR2.

Semantics are those of :func:`lowrank_kernels.reference.decompose.gram_ref`: products and sums in
fp32 (bf16/fp16 inputs widen exactly), result fp32 ``[..., k, k]``, exactly symmetric.

Design
------
* Split-K over the rows: one program per (matrix, chunk of rows, output tile ``(ti, tj)``) with
  ``ti <= tj`` (the upper triangle; programs of lower tiles return at once). A program loads the
  tiles ``y[rows, cols_i]ᵀ [BLOCK_K, BLOCK_M]`` and ``y[rows, cols_j] [BLOCK_M, BLOCK_K]`` and
  accumulates their ``tl.dot`` in fp32 over its chunk, then stores its partial tile in a scratch
  buffer ``[batch, chunks, k, k]``. The chunks are summed with ``torch.sum`` (no atomics:
  deterministic), and the upper triangle is mirrored with ``torch.where``, so ``G == G.mT``
  bit for bit (the diagonal tiles' own lower halves are discarded too).
* Chunks hold at least ``max(_MIN_CHUNK_ROWS, 8k)`` rows: the scratch traffic (k² floats per
  chunk) stays well below that of reading y, and small-batch problems still get
  ``_TARGET_CHUNK_PROGRAMS`` chunks in flight to fill a GPU. The chunking depends on the shape
  only, not on the autotuned tile, so the scratch buffer is allocated before the launch.
* fp32 inputs: ``tl.dot`` as 3xTF32 (:mod:`lowrank_kernels.triton.tiling`: tensor cores,
  within a few fp32 ulps per product; "ieee" FMAs spill). bf16/fp16: ``tl.dot`` in the input dtype (tensor
  cores; the products are exact in fp32) with an fp32 accumulator.
* Autotuning is keyed on (bucketed chunk rows, k, strides); configs are pruned to the device's
  shared memory at the first launch (no device is queried at import). Under TRITON_INTERPRET=1
  a single small config is used.

Interpreter notes (TRITON_INTERPRET=1, CPU tensors): its ``tl.dot`` multiplies bf16 operands as
their raw uint16 bit patterns, so under the interpreter bf16 tiles are widened (exactly) to fp32
before the dot (DOT_TY = fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels._checks import describe
from lowrank_kernels.triton._common import TL_DTYPES, check_device, interpreted
from lowrank_kernels.triton.tiling import _dot, keep_fitting

_INTERPRET = interpreted()
_MIN_CHUNK_ROWS = 512  # rows per chunk at least (module constant: tests lower it)
_TARGET_CHUNK_PROGRAMS = 64  # chunks over the whole batch, enough to occupy a GPU's SMs


def _config(block_m: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)


def _configs() -> list[triton.Config]:
    """Candidate tiles: output tile BLOCK_K x BLOCK_K, BLOCK_M rows per tl.dot step. Small k
    wants a small BLOCK_K (the k x k output is tiny; rows carry the work), large k bigger tiles
    (each y tile is reloaded once per output tile it meets)."""
    if _INTERPRET:
        return [_config(16, 16, 4, 1)]
    return [
        _config(128, 16, 4, 4),
        _config(128, 32, 4, 4),
        _config(64, 32, 4, 4),
        _config(64, 64, 4, 3),
        _config(128, 64, 8, 3),
        _config(64, 128, 8, 3),
    ]


_CONFIGS = _configs()
# fp32 (3xTF32: hi/lo pairs of both operand tiles in registers): the 4-warp 128 x 32 and 64 x 64
# tiles spilled 0.3-0.6 KB in the GPU-fit gate; the 8-warp 128 x 64 and 64 x 128 ones did not.
_FP32_SPILLS = (
    []
    if _INTERPRET
    else [c for c in _CONFIGS if c.num_warps == 4 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] >= 4096]
)


def _smem_bytes(config: triton.Config, itemsize: int) -> int:
    """Conservative shared memory of a config: per pipeline stage the two y tiles, plus the
    fp32 output tile passing through shared memory for a layout conversion."""
    rows, cols = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
    return config.num_stages * 2 * rows * cols * itemsize + cols * cols * 4


def _prune(configs, named_args, smem_limit: int | None = None, **kwargs) -> list[triton.Config]:
    """The configs whose output tile is not wider than k needs, within the device's (or
    ``smem_limit``'s) shared memory; fp32 without the configs in _FP32_SPILLS."""
    itemsize = named_args["y_ptr"].dtype.itemsize
    width = max(16, triton.next_power_of_2(named_args["K"]))
    narrow = [c for c in configs if c.kwargs["BLOCK_K"] <= width] or configs
    if itemsize == 4:
        narrow = [c for c in narrow if c not in _FP32_SPILLS] or narrow
    return keep_fitting(narrow, lambda c: _smem_bytes(c, itemsize), smem_limit)


@triton.autotune(
    configs=_CONFIGS,
    key=["M_BUCKET", "K", "stride_yb", "stride_ym", "stride_yk"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _gram_kernel(
    # pointers
    y_ptr,
    out_ptr,
    # sizes
    M,
    K,
    CHUNK_ROWS,
    CHUNKS,
    M_BUCKET,
    # strides of y [batch, M, K]
    stride_yb,
    stride_ym,
    stride_yk,
    # meta-parameters
    DOT_TY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[b, chunk, i, j] = Σ_{rows r of the chunk} y[b, r, i] y[b, r, j] for the tiles on and
    above the diagonal; out is [batch, CHUNKS, K, K] contiguous. M_BUCKET only keys the autotuner."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(K, BLOCK_K)
    tile = pid % (tiles * tiles)
    ti = tile // tiles
    tj = tile % tiles
    if ti > tj:  # below the diagonal: the launcher mirrors the upper triangle
        return
    item = pid // (tiles * tiles)  # b * CHUNKS + chunk
    chunk = item % CHUNKS
    b = item // CHUNKS

    offs_i = ti * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_j = tj * BLOCK_K + tl.arange(0, BLOCK_K)
    cols_i = offs_i.to(tl.int64)  # index x stride in int64 (a transposed y has a large stride_yk)
    cols_j = offs_j.to(tl.int64)
    mask_i = offs_i < K
    mask_j = offs_j < K
    row_begin = chunk * CHUNK_ROWS
    row_end = tl.minimum(row_begin + CHUNK_ROWS, M)
    base = y_ptr + b.to(tl.int64) * stride_yb

    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_begin, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_r = rows < row_end
        rows64 = rows.to(tl.int64)  # M * stride can exceed 2^31
        # yᵀ tile [BLOCK_K, BLOCK_M] and y tile [BLOCK_M, BLOCK_K], read in place.
        a = tl.load(
            base + rows64[None, :] * stride_ym + cols_i[:, None] * stride_yk,
            mask=mask_i[:, None] & mask_r[None, :],
            other=0.0,
        )
        bt = tl.load(
            base + rows64[:, None] * stride_ym + cols_j[None, :] * stride_yk,
            mask=mask_r[:, None] & mask_j[None, :],
            other=0.0,
        )
        acc = _dot(a, bt, acc, DOT_TY)

    out = out_ptr + (item.to(tl.int64) * K + offs_i[:, None]) * K + offs_j[None, :]
    tl.store(out, acc, mask=mask_i[:, None] & mask_j[None, :])


def _chunking(batch: int, m: int, k: int) -> tuple[int, int]:
    """(rows per chunk, chunks) for a [batch, m, k] problem."""
    min_rows = max(_MIN_CHUNK_ROWS, 8 * k)
    chunks = max(1, min(triton.cdiv(m, min_rows), triton.cdiv(_TARGET_CHUNK_PROGRAMS, batch)))
    return triton.cdiv(m, chunks), chunks


def gram(y: torch.Tensor) -> torch.Tensor:
    """``yᵀ y`` of ``y [..., m, k]`` (fp32/bf16/fp16, any strides, CUDA; CPU under
    TRITON_INTERPRET=1): fp32 ``[..., k, k]``, accumulated in fp32, exactly symmetric.
    ``m = 0`` gives zeros, ``k = 0`` an empty ``[..., 0, 0]``."""
    check_device(y, "y")
    if y.dim() < 2 or y.dtype not in TL_DTYPES:
        raise ValueError(f"y must be a float32/bfloat16/float16 tensor [..., m, k], got {describe(y)}")
    *lead, m, k = y.shape
    batch = 1
    for d in lead:
        batch *= d
    if m == 0 or k == 0 or batch == 0:
        return torch.zeros((*lead, k, k), dtype=torch.float32, device=y.device)
    y3 = y.reshape(batch, m, k)  # a view unless the leading dims do not merge
    chunk_rows, chunks = _chunking(batch, m, k)
    # Zero-filled: programs of tiles below the diagonal write nothing.
    partial = torch.zeros((batch, chunks, k, k), dtype=torch.float32, device=y.device)
    dot_ty = tl.float32 if _INTERPRET and y.dtype == torch.bfloat16 else TL_DTYPES[y.dtype]
    grid = lambda meta: (batch * chunks * triton.cdiv(k, meta["BLOCK_K"]) ** 2,)  # noqa: E731
    _gram_kernel[grid](
        y3,
        partial,
        m,
        k,
        chunk_rows,
        chunks,
        triton.next_power_of_2(chunk_rows),
        y3.stride(0),
        y3.stride(1),
        y3.stride(2),
        DOT_TY=dot_ty,
    )
    g = partial.sum(1) if chunks > 1 else partial[:, 0]
    upper = torch.ones(k, k, dtype=torch.bool, device=y.device).triu()
    return torch.where(upper, g, g.mT).reshape(*lead, k, k)
