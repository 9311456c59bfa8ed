"""Triton fused QPiSSA linear: NF4 residual GEMM + low-rank correction + bias in one kernel.

Semantics are those of :mod:`lowrank_kernels.reference.fused_linear` (the fp64 oracle). ``W`` is
the NF4 residual viewed ``[N, K]`` (N = out_features, K = in_features) in its flat row-major
storage: element ``(n, k)`` is flat index ``i = n*K + k``, its 4-bit code is the high nibble of
byte ``i // 2`` when ``i`` is even and the low nibble otherwise, its value is
``code[nibble] * absmax[i // blocksize]``.

Design
------
* W is never materialized. Each GEMM loop step loads the packed bytes of one W tile, decodes
  them in registers (16-entry fp32 code table, absmax gathered per element) and feeds tl.dot.
  One ``@triton.jit`` helper, :func:`_load_nf4_tile`, does this for both kernels; it takes
  broadcastable row / column offsets, so the forward reads the tile as ``W^T [BLOCK_K, BLOCK_N]``
  and the grad-input kernel as ``W [BLOCK_N, BLOCK_K]`` from the same storage (no transposed copy).
* The decode is per element on the flat index (int64: N*K exceeds 2^31 on large models), so
  rows that start mid-byte (odd K) and quantization blocks that straddle rows
  (K % blocksize != 0) need no special case. Every index x stride product is int64 (strided
  inputs: a transposed x has stride M).
* fp32 activations: the tile stays fp32 and tl.dot runs as 3xTF32
  (:mod:`lowrank_kernels.triton.tiling`): within a few fp32 ulps per product like torch's fp32
  matmul (which does not use TF32 by default), on tensor cores; an "ieee" FMA dot spills.
  bf16/fp16 activations: the decoded tile is rounded to the activation dtype and tl.dot runs in
  that dtype (tensor cores) with an fp32 accumulator.
* Epilogue: ``acc += scale * (lowrank @ factor)`` over the rank in BLOCK_R chunks (tl.dot needs
  every dim >= 16, and r may be 1 or 3: loads are masked up to the padded width), ``+ bias``, and
  a single rounding to the output dtype with ``round_to`` (round to nearest even, also under the
  interpreter).
* Program ids are grouped GROUP_M tiles at a time along M (Triton matmul tutorial) so programs
  that run together share W tiles in L2.
* Autotuning is keyed on (bucketed M, N, K); the activation dtype is part of the key implicitly
  (Triton adds tensor dtypes). Under TRITON_INTERPRET=1 a single small config is used: the
  interpreter runs kernels in numpy and benchmarking configs there is pointless and slow.

Interpreter notes (TRITON_INTERPRET=1, CPU tensors): its tl.dot multiplies bf16 operands as their
raw uint16 bit patterns, so under the interpreter bf16 tiles are rounded to bf16 and then widened
exactly to fp32 for the dot (DOT_TY = fp32); on a GPU DOT_TY is the activation dtype.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from lowrank_kernels._checks import describe
from lowrank_kernels.codebooks import nf4_code
from lowrank_kernels.triton._common import TL_DTYPES, check_device, interpreted, round_to
from lowrank_kernels.triton.tiling import _dot, keep_fitting

_INTERPRET = interpreted()
_MAX_BLOCK_R = 32  # rank chunk of the epilogue: bounds registers for large r


def _config(block_m: int, block_n: int, block_k: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Candidate tiles, checked by the GPU-fit gate (python -m lowrank_kernels.gpu_fit) to compile
# without spills and within shared memory on sm_80 and sm_90. Forward: output tile
# BLOCK_M x BLOCK_N, reduction BLOCK_K. Grad-input: output tile BLOCK_M x BLOCK_K, reduction
# BLOCK_N. BLOCK_M = 16 tiles serve decoding / short batches (bound by reading the packed
# weight). Registers bound the tiles: each W element decoded in registers carries an int64 index
# and three 64-bit gather addresses (packed byte, code, absmax), so a decode tile's reduction
# stays <= 64 in the grad-input kernel (BLOCK_N = 128 spilled 0.5-0.8 KB); fp32 (3xTF32 dots:
# three MMAs and hi/lo operand pairs) needs smaller tiles still (64 x 64 x 32 spilled 0.2 KB).
# (Int32 in-tile offsets from an int64 tile base were tried: ptxas spilled more, not less.)
if _INTERPRET:
    _HALF_FORWARD = _FP32_FORWARD = _HALF_GRAD_INPUT = _FP32_GRAD_INPUT = [_config(16, 32, 32, 4, 1, group_m=2)]
else:
    _HALF_FORWARD = [_config(128, 128, 32, 8, 3), _config(64, 128, 32, 4, 3), _config(64, 64, 64, 4, 3),
                     _config(32, 64, 64, 4, 3), _config(16, 64, 128, 4, 3), _config(16, 32, 128, 4, 4)]
    _FP32_FORWARD = [_config(64, 32, 32, 4, 3), _config(16, 64, 64, 4, 2)]  # BLOCK_K = 64 spilled at M = 512
    _HALF_GRAD_INPUT = [_config(128, 32, 128, 8, 3), _config(64, 64, 64, 4, 3), _config(32, 64, 64, 4, 3),
                        _config(16, 64, 64, 4, 4)]
    _FP32_GRAD_INPUT = [_config(32, 64, 64, 4, 2), _config(16, 64, 64, 4, 2)]

# The autotuner's cache key: every argument that changes the compiled kernel or its best tile.
# Triton adds the tensors' dtypes.
_SHARED_KEY = ["M_BUCKET", "N", "K", "BLOCK_R", "BLOCKSIZE"]
_FORWARD_KEY = _SHARED_KEY + ["HAS_BIAS", "stride_xm", "stride_xk", "stride_lm", "stride_lr", "stride_un",
                              "stride_ur", "stride_ym", "stride_yn"]
_GRAD_INPUT_KEY = _SHARED_KEY + ["stride_gm", "stride_gn", "stride_lm", "stride_lr", "stride_dr", "stride_dk",
                                 "stride_xm", "stride_xk"]


def _smem_bytes(config: triton.Config, act_bytes: int, reduction: str, columns: str) -> int:
    """Conservative shared memory of a tile config: per pipeline stage the activation tile and,
    per W element, its gathered absmax (4 B) and packed byte (1 B); plus the decoded W operand
    and the fp32 output tile passing through shared memory for layout conversions."""
    kw = config.kwargs
    w_tile = kw[reduction] * kw[columns]
    stage = kw["BLOCK_M"] * kw[reduction] * act_bytes + 5 * w_tile
    return config.num_stages * stage + w_tile * act_bytes + kw["BLOCK_M"] * kw[columns] * 4


def _prune(configs, named_args, activation: str, candidates: dict, reduction: str, columns: str,
           smem_limit: int | None) -> list[triton.Config]:
    """Configs for this launch: those of the activation's dtype class, BLOCK_M = 16 tiles only
    (and always) for M <= 16, taller tiles up to M, within the device's (or ``smem_limit``'s)
    shared memory."""
    dtype = named_args[activation].dtype
    mine = candidates[dtype == torch.float32]
    m_bucket = named_args["M_BUCKET"]
    by_m = [c for c in mine
            if (c.kwargs["BLOCK_M"] == 16) == (m_bucket <= 16) and c.kwargs["BLOCK_M"] <= max(16, m_bucket)]
    by_m = by_m or [min(mine, key=lambda c: c.kwargs["BLOCK_M"])]
    act_bytes = dtype.itemsize
    return keep_fitting(by_m, lambda c: _smem_bytes(c, act_bytes, reduction, columns), smem_limit)


def _prune_forward(configs, named_args, smem_limit: int | None = None, **kwargs) -> list[triton.Config]:
    return _prune(configs, named_args, "x_ptr", {False: _HALF_FORWARD, True: _FP32_FORWARD}, "BLOCK_K", "BLOCK_N",
                  smem_limit)


def _prune_grad_input(configs, named_args, smem_limit: int | None = None, **kwargs) -> list[triton.Config]:
    return _prune(configs, named_args, "grad_y_ptr", {False: _HALF_GRAD_INPUT, True: _FP32_GRAD_INPUT},
                  "BLOCK_N", "BLOCK_K", smem_limit)


@triton.jit
def _load_nf4_tile(packed_ptr, absmax_ptr, code_ptr, rows, cols, mask, ROW_LEN, BLOCKSIZE: tl.constexpr):
    """fp32 ``W[rows, cols]`` of the NF4 matrix with ``ROW_LEN`` columns; ``rows`` and ``cols`` are
    offset vectors shaped to broadcast (``[R, 1]`` x ``[1, C]`` or ``[1, C]`` x ``[R, 1]``), so the
    caller picks the tile orientation. Masked-off elements are 0."""
    idx = rows.to(tl.int64) * ROW_LEN + cols  # flat element index, int64
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    # Even elements sit in the high nibble, odd ones in the low nibble.
    shift = (4 - (idx & 1) * 4).to(tl.int32)
    nibble = (byte >> shift) & 0xF
    value = tl.load(code_ptr + nibble)  # nibble is in [0, 16) even where masked
    absmax = tl.load(absmax_ptr + idx // BLOCKSIZE, mask=mask, other=0.0)
    return value * absmax


@triton.jit
def _weight_operand(w, W_TY: tl.constexpr, DOT_TY: tl.constexpr):
    """Decoded fp32 tile -> dot operand: rounded to the activation dtype W_TY (RNE), in DOT_TY."""
    if DOT_TY == W_TY:
        return w.to(W_TY)  # native cast: round to nearest even on GPUs
    else:
        # Interpreter bf16: round on the bit pattern (its own cast truncates), widen exactly.
        return round_to(w, W_TY).to(DOT_TY)


@triton.jit
def _grouped_tile(M, COLS, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_c) of this program, walking GROUP_M row-tiles per column-tile for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_c = tl.cdiv(COLS, BLOCK_C)
    num_pid_in_group = GROUP_M * num_pid_c
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_c = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_c


@triton.jit
def _lowrank_term(left_ptr, right_ptr, rows_m, mask_m, cols, mask_c, R,
                  stride_lm, stride_lr, stride_rr, stride_rc,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, DOT_TY: tl.constexpr):
    """left[rows_m, :R] @ right[:R, cols] as an fp32 [BLOCK_M, BLOCK_C] tile, over the rank in
    BLOCK_R chunks (masked: r may be below the 16 tl.dot needs). Accumulated apart from the main
    product so that the caller's `scale` multiplies the whole low-rank term."""
    low = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        left = tl.load(left_ptr + rows_m[:, None] * stride_lm + offs_r[None, :].to(tl.int64) * stride_lr,
                       mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        right = tl.load(right_ptr + offs_r[:, None].to(tl.int64) * stride_rr + cols[None, :].to(tl.int64) * stride_rc,
                        mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        low = _dot(left, right, low, DOT_TY)
    return low


@triton.autotune(configs=_HALF_FORWARD if _INTERPRET else _HALF_FORWARD + _FP32_FORWARD, key=_FORWARD_KEY,
                 prune_configs_by={"early_config_prune": _prune_forward})
@triton.jit
def _nf4_lowrank_linear_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, code_ptr, lowrank_ptr, up_ptr, bias_ptr, y_ptr,
    # sizes and scalars
    M, N, K, R, M_BUCKET, scale,
    # strides
    stride_xm, stride_xk, stride_lm, stride_lr, stride_un, stride_ur, stride_ym, stride_yn,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    W_TY: tl.constexpr, DOT_TY: tl.constexpr, OUT_TY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = x @ W^T + scale * lowrank @ up^T + bias; one program per [BLOCK_M, BLOCK_N] tile.
    M_BUCKET only keys the autotuner."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)  # index x stride in int64: either can be large
    rows_n = offs_n.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # W^T tile [BLOCK_K, BLOCK_N]: rows of W along the tile's columns.
        w = _load_nf4_tile(packed_ptr, absmax_ptr, code_ptr, offs_n[None, :], offs_k[:, None],
                           mask_k[:, None] & mask_n[None, :], K, BLOCKSIZE)
        acc = _dot(x, _weight_operand(w, W_TY, DOT_TY), acc, DOT_TY)

    # up^T [R, N]: element (j, n) at up_ptr + n * stride_un + j * stride_ur.
    acc += scale * _lowrank_term(lowrank_ptr, up_ptr, rows_m, mask_m, rows_n, mask_n, R,
                                 stride_lm, stride_lr, stride_ur, stride_un,
                                 BLOCK_M, BLOCK_N, BLOCK_R, DOT_TY)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    y = round_to(acc.to(tl.float32), OUT_TY)
    tl.store(y_ptr + rows_m[:, None] * stride_ym + rows_n[None, :] * stride_yn, y,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_HALF_GRAD_INPUT if _INTERPRET else _HALF_GRAD_INPUT + _FP32_GRAD_INPUT, key=_GRAD_INPUT_KEY,
                 prune_configs_by={"early_config_prune": _prune_grad_input})
@triton.jit
def _nf4_lowrank_linear_grad_input_kernel(
    # pointers
    grad_y_ptr, packed_ptr, absmax_ptr, code_ptr, lowrank_ptr, down_ptr, dx_ptr,
    # sizes and scalars
    M, N, K, R, M_BUCKET, scale,
    # strides
    stride_gm, stride_gn, stride_lm, stride_lr, stride_dr, stride_dk, stride_xm, stride_xk,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, BLOCK_R: tl.constexpr,
    W_TY: tl.constexpr, DOT_TY: tl.constexpr, OUT_TY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx[M, K] = grad_y @ W + scale * lowrank_grad @ down; one program per [BLOCK_M, BLOCK_K]
    tile, reducing over N. M_BUCKET only keys the autotuner."""
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    rows_m = offs_m.to(tl.int64)  # index x stride in int64: either can be large
    cols_k = offs_k.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.load(grad_y_ptr + rows_m[:, None] * stride_gm + offs_n[None, :].to(tl.int64) * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        # W tile [BLOCK_N, BLOCK_K], read in place from the row-major NF4 storage.
        w = _load_nf4_tile(packed_ptr, absmax_ptr, code_ptr, offs_n[:, None], offs_k[None, :],
                           mask_n[:, None] & mask_k[None, :], K, BLOCKSIZE)
        acc = _dot(g, _weight_operand(w, W_TY, DOT_TY), acc, DOT_TY)

    acc += scale * _lowrank_term(lowrank_ptr, down_ptr, rows_m, mask_m, cols_k, mask_k, R,
                                 stride_lm, stride_lr, stride_dr, stride_dk,
                                 BLOCK_M, BLOCK_K, BLOCK_R, DOT_TY)

    dx = round_to(acc.to(tl.float32), OUT_TY)
    tl.store(dx_ptr + rows_m[:, None] * stride_xm + cols_k[None, :] * stride_xk, dx,
             mask=mask_m[:, None] & mask_k[None, :])


# ---------------------------------------------------------------------------------------------
# launchers


def _expect(t: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    check_device(t, name)
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(f"{name} must have shape {shape} and dtype {dtype}, got {describe(t)}")


def _check_nf4(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int) -> None:
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    _expect(packed, "packed", ((numel + 1) // 2,), torch.uint8)
    _expect(absmax, "absmax", ((numel + blocksize - 1) // blocksize,), torch.float32)


def _check_activation(t: torch.Tensor, name: str) -> None:
    check_device(t, name)
    if t.dim() != 2 or t.dtype not in TL_DTYPES:
        raise ValueError(f"{name} must be a 2-D float32/bfloat16/float16 tensor, got {describe(t)}")


def _dtypes(dtype: torch.dtype) -> dict:
    w_ty = TL_DTYPES[dtype]
    # The interpreter's tl.dot reads bf16 operands as raw integers: widen them (exactly) to fp32.
    dot_ty = tl.float32 if _INTERPRET and dtype == torch.bfloat16 else w_ty
    return {"W_TY": w_ty, "DOT_TY": dot_ty, "OUT_TY": w_ty}


def _block_r(rank: int) -> int:
    return min(max(16, triton.next_power_of_2(rank)), _MAX_BLOCK_R)


def nf4_lowrank_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                       out_features: int, lowrank_x: torch.Tensor, up: torch.Tensor, scale: float,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """Fused QPiSSA forward ``y = x W^T + scale * lowrank_x up^T + bias``.

    ``x [M, K]`` fp32/bf16/fp16 (any strides); ``packed`` uint8 ``[ceil(N*K/2)]`` and ``absmax``
    fp32 ``[ceil(N*K/blocksize)]`` hold ``W [N, K]`` (N = ``out_features``); ``lowrank_x [M, r]``,
    ``up [N, r]``, ``bias [N]`` or None, all in x's dtype. Returns ``y [M, N]`` in x's dtype,
    accumulated in fp32 and rounded once.
    """
    _check_activation(x, "x")
    m, k = x.shape
    n = out_features
    if n < 0:
        raise ValueError(f"out_features must be >= 0, got {n}")
    _check_nf4(packed, absmax, blocksize, n * k)
    _check_activation(lowrank_x, "lowrank_x")
    rank = lowrank_x.shape[1]
    _expect(lowrank_x, "lowrank_x", (m, rank), x.dtype)
    _expect(up, "up", (n, rank), x.dtype)
    if bias is not None:
        _expect(bias, "bias", (n,), x.dtype)

    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _nf4_lowrank_linear_kernel[grid](
        x, packed.contiguous(), absmax.contiguous(), nf4_code(x.device), lowrank_x, up,
        None if bias is None else bias.contiguous(), y,
        m, n, k, rank, triton.next_power_of_2(m), float(scale),
        x.stride(0), x.stride(1), lowrank_x.stride(0), lowrank_x.stride(1), up.stride(0), up.stride(1),
        y.stride(0), y.stride(1),
        BLOCKSIZE=blocksize, HAS_BIAS=bias is not None, BLOCK_R=_block_r(rank), **_dtypes(x.dtype),
    )
    return y


def nf4_lowrank_linear_grad_input(grad_y: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                                  blocksize: int, in_features: int, lowrank_grad: torch.Tensor,
                                  down: torch.Tensor, scale: float) -> torch.Tensor:
    """Fused QPiSSA input gradient ``dx = grad_y W + scale * lowrank_grad down``.

    ``grad_y [M, N]`` fp32/bf16/fp16 (any strides); ``packed``/``absmax`` hold ``W [N, K]`` as in
    :func:`nf4_lowrank_linear` (K = ``in_features``), read transposed in place;
    ``lowrank_grad [M, r]`` and ``down [r, K]`` in grad_y's dtype. Returns ``dx [M, K]`` in
    grad_y's dtype, accumulated in fp32 and rounded once.
    """
    _check_activation(grad_y, "grad_y")
    m, n = grad_y.shape
    k = in_features
    if k < 0:
        raise ValueError(f"in_features must be >= 0, got {k}")
    _check_nf4(packed, absmax, blocksize, n * k)
    _check_activation(lowrank_grad, "lowrank_grad")
    rank = lowrank_grad.shape[1]
    _expect(lowrank_grad, "lowrank_grad", (m, rank), grad_y.dtype)
    _expect(down, "down", (rank, k), grad_y.dtype)

    dx = torch.empty((m, k), dtype=grad_y.dtype, device=grad_y.device)
    if m == 0 or k == 0:
        return dx
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    _nf4_lowrank_linear_grad_input_kernel[grid](
        grad_y, packed.contiguous(), absmax.contiguous(), nf4_code(grad_y.device), lowrank_grad, down, dx,
        m, n, k, rank, triton.next_power_of_2(m), float(scale),
        grad_y.stride(0), grad_y.stride(1), lowrank_grad.stride(0), lowrank_grad.stride(1),
        down.stride(0), down.stride(1), dx.stride(0), dx.stride(1),
        BLOCKSIZE=blocksize, BLOCK_R=_block_r(rank), **_dtypes(grad_y.dtype),
    )
    return dx
