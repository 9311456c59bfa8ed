"""Triton huber_weights: the IRLS terms of Robust PiSSA for ``W [..., m, n]`` in one pass.

Semantics are those of :func:`lowrank_kernels.reference.robust.huber_weights_ref` (element
math: csrc/include/lowrank_kernels/huber_math.h): for E = A B − W, fp32 ω(E) and ψ(E)
``[..., m, n]`` at each matrix's weight δ, and fp64 ``[Σ ρ(E) at its loss δ, Σ |E|] [..., 2]``.

Design: one program per ``[BLOCK_M, BLOCK_N]`` tile of one matrix. It forms the tile of A B with
``tl.dot`` over the rank in ``BLOCK_R`` chunks (zero-padded to ≥ 16; chunks bound registers and
shared memory at any rank), as 3xTF32 (:mod:`lowrank_kernels.triton.tiling`; plain TF32 would
put 1e-3 relative errors into residuals the solve depends on), subtracts the W tile, and writes
ω and ψ; E never leaves registers. ``dw / max(|e|, dw)`` is a correctly rounded division
(``tl.div_rn``), as on the CPU; Triton's ``/`` is approximate on GPUs. Each tile's two sums go
to ``partial [batch, tiles, 2]`` (fp32 over at most BLOCK_M·BLOCK_N elements) and are summed in
fp64 by torch: no atomics, so the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_kernels.triton._common import TL_DTYPES, check_device, interpreted
from lowrank_kernels.triton.tiling import _dot

_BLOCK_M, _BLOCK_N, _NUM_WARPS = (16, 32, 1) if interpreted() else (64, 64, 4)
_MAX_BLOCK_R = 32  # rank chunk: the GPU-fit gate checks 64 x 64 x 32 fits without spills


@triton.jit
def _huber_weights_kernel(
    # pointers
    w_ptr,
    a_ptr,
    b_ptr,
    weight_delta_ptr,
    loss_delta_ptr,
    omega_ptr,
    psi_ptr,
    partial_ptr,
    # sizes
    M,
    N,
    R,
    ROW_BLOCKS,
    COL_BLOCKS,
    # strides: w, omega and psi are contiguous [batch, M, N], a [batch, M, R], b [batch, R, N]
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tiles = ROW_BLOCKS * COL_BLOCKS
    mat = pid // tiles
    tile = pid % tiles
    rows = tile // COL_BLOCKS * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile % COL_BLOCKS * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rows < M, cols < N
    ab = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        mask_k = ks < R
        a = tl.load(
            a_ptr + mat * M * R + rows[:, None] * R + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        b = tl.load(
            b_ptr + mat * R * N + ks[:, None] * N + cols[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0
        )
        ab = _dot(a, b, ab, tl.float32)
    mask = mask_m[:, None] & mask_n[None, :]
    offsets = mat * M * N + rows[:, None] * N + cols[None, :]
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    e = ab - w
    magnitude = tl.abs(e)
    dw = tl.load(weight_delta_ptr + mat)
    dl = tl.load(loss_delta_ptr + mat)
    tl.store(omega_ptr + offsets, tl.div_rn(tl.zeros_like(magnitude) + dw, tl.maximum(magnitude, dw)), mask=mask)
    tl.store(psi_ptr + offsets, tl.minimum(tl.maximum(e, -dw), dw), mask=mask)
    loss = tl.where(magnitude <= dl, 0.5 * e * e, dl * (magnitude - 0.5 * dl))
    tl.store(partial_ptr + pid * 2, tl.sum(tl.sum(tl.where(mask, loss, 0.0), axis=1), axis=0))
    tl.store(partial_ptr + pid * 2 + 1, tl.sum(tl.sum(tl.where(mask, magnitude, 0.0), axis=1), axis=0))


def huber_weights(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight_delta: torch.Tensor, loss_delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [..., m, n]`` (fp32/fp16/bf16), ``a [..., m, r]``, ``b [..., r, n]`` (fp32), deltas fp32
    ``[...]`` -> ``(ω, ψ)`` fp32 ``[..., m, n]`` and fp64 stats ``[..., 2]``. Errors mirror the C++
    op (RuntimeError naming the argument)."""
    for t, name in ((w, "w"), (a, "a"), (b, "b"), (weight_delta, "weight_delta"), (loss_delta, "loss_delta")):
        check_device(t, name)
    if w.dtype not in TL_DTYPES or w.dim() < 2:
        raise RuntimeError(
            f"w must be a float32, float16 or bfloat16 tensor [..., m, n], got {w.dtype} with shape {list(w.shape)}"
        )
    *batch, m, n = w.shape
    r = a.shape[-1] if a.dim() == w.dim() else -1
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.shape != (*batch, m, r) or b.shape != (*batch, r, n):
        raise RuntimeError(
            f"a must be float32 [..., m, r] and b float32 [..., r, n] for w {list(w.shape)}, "
            f"got a {a.dtype} {list(a.shape)} and b {b.dtype} {list(b.shape)}"
        )
    for delta, name in ((weight_delta, "weight_delta"), (loss_delta, "loss_delta")):
        if delta.dtype != torch.float32 or delta.shape != tuple(batch):
            raise RuntimeError(
                f"{name} must be float32 of w's batch shape {batch}, got {delta.dtype} with shape {list(delta.shape)}"
            )
    omega = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    psi = torch.empty_like(omega)
    if w.numel() == 0:
        return omega, psi, torch.zeros(*batch, 2, dtype=torch.float64, device=w.device)
    row_blocks, col_blocks = triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N)
    count = w.numel() // (m * n)
    partial = torch.empty(count, row_blocks * col_blocks, 2, dtype=torch.float32, device=w.device)
    _huber_weights_kernel[(count * row_blocks * col_blocks,)](
        w.contiguous(),
        a.contiguous(),
        b.contiguous(),
        weight_delta.contiguous(),
        loss_delta.contiguous(),
        omega,
        psi,
        partial,
        m,
        n,
        r,
        row_blocks,
        col_blocks,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_R=min(max(16, triton.next_power_of_2(r)), _MAX_BLOCK_R),
        num_warps=_NUM_WARPS,
    )
    return omega, psi, partial.double().sum(1).reshape(*batch, 2)
