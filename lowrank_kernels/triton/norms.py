"""Triton row_col_sq_norms: squared row and column norms of ``W [..., m, n]`` in one pass.

Semantics are those of :func:`lowrank_kernels.reference.decompose.row_col_sq_norms_ref`: fp32
``(Σ_j w_ij² [..., m], Σ_i w_ij² [..., n])``, squares and sums in fp32.

Design: one program per ``[BLOCK_M, BLOCK_N]`` tile of one matrix of the batch. It loads the
tile once (any strides, so a transposed W is read in place), squares it in fp32 and writes the
tile's row sums to ``row_partial [batch, col_blocks, m]`` and its column sums to
``col_partial [batch, row_blocks, n]``. The partials are then summed over the block axis by
torch.sum: no atomics, so the result is deterministic. The partials add
``m·n·(1/BLOCK_M + 1/BLOCK_N)`` fp32 values of traffic, a few percent of reading W; a grid of
small tiles keeps every SM busy even for a single matrix.

On GPUs Triton enables fp fusion, so ptxas contracts ``x * x`` into the sums' adds (FMA: one
rounding per step instead of two). The sums' order differs from the CPU kernels' anyway, so
results agree to a tolerance (fp32 summation bound), not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.triton._common import TL_DTYPES, check_device, interpreted

# The interpreter runs programs in numpy: small tiles keep it quick and let small test shapes
# span several tiles in both directions.
_BLOCK_M, _BLOCK_N, _NUM_WARPS = (16, 32, 1) if interpreted() else (64, 256, 8)


@triton.jit
def _row_col_sq_norms_kernel(
    # pointers
    w_ptr,
    row_partial_ptr,
    col_partial_ptr,
    # sizes
    M,
    N,
    ROW_BLOCKS,
    COL_BLOCKS,
    # strides of w viewed [batch, M, N]
    stride_b,
    stride_m,
    stride_n,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Tile (b, rb, cb): row sums over its columns -> row_partial[b, cb, rows]; column sums
    over its rows -> col_partial[b, rb, cols]. Consecutive programs walk along a row block."""
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % COL_BLOCKS
    rb = (pid // COL_BLOCKS) % ROW_BLOCKS
    b = pid // (COL_BLOCKS * ROW_BLOCKS)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < N
    ptrs = w_ptr + b * stride_b + rows[:, None] * stride_m + cols[None, :] * stride_n
    x = tl.load(ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    sq = x * x
    tl.store(row_partial_ptr + (b * COL_BLOCKS + cb) * M + rows, tl.sum(sq, axis=1), mask=mask_m)
    tl.store(col_partial_ptr + (b * ROW_BLOCKS + rb) * N + cols, tl.sum(sq, axis=0), mask=mask_n)


def row_col_sq_norms(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32/fp16/bf16 ``w [..., m, n]`` (any strides) -> fp32 ``(rows [..., m], cols [..., n])``,
    rows = Σ_j w_ij², cols = Σ_i w_ij². Errors mirror the C++ op (RuntimeError naming ``w``)."""
    check_device(w, "w")
    if w.dtype not in TL_DTYPES:
        raise RuntimeError(f"w must be float32, float16 or bfloat16, got {w.dtype} with shape {list(w.shape)}")
    if w.dim() < 2:
        raise RuntimeError(
            f"w must have at least 2 dimensions [..., m, n], got shape {list(w.shape)} and dtype {w.dtype}"
        )
    *batch, m, n = w.shape
    if w.numel() == 0:
        return (
            torch.zeros(*batch, m, dtype=torch.float32, device=w.device),
            torch.zeros(*batch, n, dtype=torch.float32, device=w.device),
        )
    w3 = w.reshape(-1, m, n)  # a view unless the batch dims cannot be merged
    row_blocks, col_blocks = triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N)
    row_partial = torch.empty(w3.shape[0], col_blocks, m, dtype=torch.float32, device=w.device)
    col_partial = torch.empty(w3.shape[0], row_blocks, n, dtype=torch.float32, device=w.device)
    _row_col_sq_norms_kernel[(w3.shape[0] * row_blocks * col_blocks,)](
        w3,
        row_partial,
        col_partial,
        m,
        n,
        row_blocks,
        col_blocks,
        w3.stride(0),
        w3.stride(1),
        w3.stride(2),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        num_warps=_NUM_WARPS,
    )
    return row_partial.sum(1).reshape(*batch, m), col_partial.sum(1).reshape(*batch, n)
