"""Triton fused QPiSSA linear: NF4 residual GEMM + low-rank correction + bias in one kernel.

Semantics are those of :mod:`lowrank_kernels.reference.fused_linear` (the fp64 oracle). ``W`` is
the NF4 residual viewed ``[N, K]`` (N = out_features, K = in_features) in its flat row-major
storage: element ``(n, k)`` is flat index ``i = n*K + k``, its 4-bit code is the high nibble of
byte ``i // 2`` when ``i`` is even and the low nibble otherwise, its value is
``code[nibble] * absmax[i // blocksize]``.

Design
------
* One kernel, :func:`_nf4_lowrank_kernel`, computes both products as
  ``out [M, C] = a [M, D] op(W) + scale * left [M, r] right [r, C] (+ bias)``: the forward
  (``a = x``, ``op(W) = W^T``, C = N, D = K, ``right = up^T``) and the grad-input (``a = grad_y``,
  ``op(W) = W``, C = K, D = N, ``right = down``), told apart by the constexpr W_TRANSPOSED. Each
  has its own tiles, autotuned apart (``_nf4_lowrank_linear_kernel`` and
  ``_nf4_lowrank_linear_grad_input_kernel`` wrap the one kernel), and one launcher, ``_fused``,
  checks and launches both.
* W is never materialized. Each GEMM loop step loads the packed bytes of one W tile, decodes
  them in registers (16-entry fp32 code table, absmax gathered per element) and feeds tl.dot.
  :func:`_load_nf4_tile` takes broadcastable row / column offsets, so the kernel reads the
  ``op(W)`` tile ``[BLOCK_D, BLOCK_C]`` as ``W^T`` or ``W`` from the same storage (no
  transposed copy).
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
* Autotuning is keyed on (bucketed M, C, D, rank chunk, blocksize, bias, strides); the
  activation dtype is part of the key implicitly (Triton adds tensor dtypes). Under TRITON_INTERPRET=1 a single small config is used: the
  interpreter runs kernels in numpy and benchmarking configs there is pointless and slow.

Interpreter notes (TRITON_INTERPRET=1, CPU tensors): its tl.dot multiplies bf16 operands as their
raw uint16 bit patterns, so under the interpreter bf16 tiles are rounded to bf16 and then widened
exactly to fp32 for the dot (DOT_TY = fp32); on a GPU DOT_TY is the activation dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lowrank_kernels._checks import describe
from lowrank_kernels.codebooks import nf4_code
from lowrank_kernels.triton._common import TL_DTYPES, check_device, interpreted, round_to
from lowrank_kernels.triton.tiling import _dot, keep_fitting

_INTERPRET = interpreted()
_MAX_BLOCK_R = 32  # rank chunk of the epilogue: bounds registers for large r


def _config(block_m: int, block_c: int, block_d: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_C": block_c, "BLOCK_D": block_d, "GROUP_M": group_m},
        num_warps=warps,
        num_stages=stages,
    )


# Candidate tiles, checked by the GPU-fit gate (python -m lowrank_kernels.gpu_fit) to compile
# without spills and within shared memory on sm_80 and sm_90: output tile BLOCK_M x BLOCK_C,
# reduction BLOCK_D (forward: C = N, D = K; grad-input: C = K, D = N). BLOCK_M = 16 tiles serve
# decoding / short batches (bound by reading the packed weight). Registers bound the tiles: each
# W element decoded in registers carries an int64 index and three 64-bit gather addresses
# (packed byte, code, absmax), so a decode tile's reduction stays <= 64 in the grad-input kernel
# (BLOCK_D = 128 spilled 0.5-0.8 KB); fp32 (3xTF32 dots: three MMAs and hi/lo operand pairs)
# needs smaller tiles still (64 x 64 x 32 spilled 0.2 KB).
# (Int32 in-tile offsets from an int64 tile base were tried: ptxas spilled more, not less.)
if _INTERPRET:
    _HALF_FORWARD = _FP32_FORWARD = _HALF_GRAD_INPUT = _FP32_GRAD_INPUT = [_config(16, 32, 32, 4, 1, group_m=2)]
else:
    _HALF_FORWARD = [
        _config(128, 128, 32, 8, 3),
        _config(64, 128, 32, 4, 3),
        _config(64, 64, 64, 4, 3),
        _config(32, 64, 64, 4, 3),
        _config(16, 64, 128, 4, 3),
        _config(16, 32, 128, 4, 4),
    ]
    _FP32_FORWARD = [_config(64, 32, 32, 4, 3), _config(16, 64, 64, 4, 2)]  # BLOCK_D = 64 spilled at M = 512
    _HALF_GRAD_INPUT = [
        _config(128, 128, 32, 8, 3),
        _config(64, 64, 64, 4, 3),
        _config(32, 64, 64, 4, 3),
        _config(16, 64, 64, 4, 4),
    ]
    _FP32_GRAD_INPUT = [_config(32, 64, 64, 4, 2), _config(16, 64, 64, 4, 2)]

# The autotuner's cache key: every argument that changes the compiled kernel or its best tile.
# Triton adds the tensors' dtypes.
_KEY = [
    "M_BUCKET",
    "COLS",
    "DEPTH",
    "BLOCK_R",
    "BLOCKSIZE",
    "HAS_BIAS",
    "stride_am",
    "stride_ad",
    "stride_lm",
    "stride_lr",
    "stride_rr",
    "stride_rc",
    "stride_om",
    "stride_oc",
]


def _smem_bytes(config: triton.Config, act_bytes: int) -> int:
    """Conservative shared memory of a tile config: per pipeline stage the activation tile and,
    per W element, its gathered absmax (4 B) and packed byte (1 B); plus the decoded W operand
    and the fp32 output tile passing through shared memory for layout conversions."""
    kw = config.kwargs
    w_tile = kw["BLOCK_D"] * kw["BLOCK_C"]
    stage = kw["BLOCK_M"] * kw["BLOCK_D"] * act_bytes + 5 * w_tile
    return config.num_stages * stage + w_tile * act_bytes + kw["BLOCK_M"] * kw["BLOCK_C"] * 4


def _prune(configs, named_args, candidates: dict, smem_limit: int | None = None, **kwargs) -> list[triton.Config]:
    """Configs for this launch: ``candidates[activation is fp32]``, BLOCK_M = 16 tiles only
    (and always) for M <= 16, taller tiles up to M, within the device's (or ``smem_limit``'s)
    shared memory."""
    dtype = named_args["a_ptr"].dtype
    mine = candidates[dtype == torch.float32]
    m_bucket = named_args["M_BUCKET"]
    by_m = [
        c for c in mine if (c.kwargs["BLOCK_M"] == 16) == (m_bucket <= 16) and c.kwargs["BLOCK_M"] <= max(16, m_bucket)
    ]
    by_m = by_m or [min(mine, key=lambda c: c.kwargs["BLOCK_M"])]
    act_bytes = dtype.itemsize
    return keep_fitting(by_m, lambda c: _smem_bytes(c, act_bytes), smem_limit)


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
def _load_tile(ptr, rows, cols, mask_rows, mask_cols, stride_r, stride_c):
    """``[rows, cols]`` tile of a strided matrix (offset vectors; index x stride in int64: either
    can be large). Masked-off elements are 0."""
    return tl.load(
        ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c,
        mask=mask_rows[:, None] & mask_cols[None, :],
        other=0.0,
    )


@triton.jit
def _lowrank_term(
    left_ptr,
    right_ptr,
    rows_m,
    mask_m,
    cols,
    mask_c,
    R,
    stride_lm,
    stride_lr,
    stride_rr,
    stride_rc,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_TY: tl.constexpr,
):
    """left[rows_m, :R] @ right[:R, cols] as an fp32 [BLOCK_M, BLOCK_C] tile, over the rank in
    BLOCK_R chunks (masked: r may be below the 16 tl.dot needs). Accumulated apart from the main
    product so that the caller's `scale` multiplies the whole low-rank term."""
    low = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        left = _load_tile(left_ptr, rows_m, offs_r, mask_m, mask_r, stride_lm, stride_lr)
        right = _load_tile(right_ptr, offs_r, cols, mask_r, mask_c, stride_rr, stride_rc)
        low = _dot(left, right, low, DOT_TY)
    return low


@triton.jit
def _nf4_lowrank_kernel(
    # pointers
    a_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    left_ptr,
    right_ptr,
    bias_ptr,
    out_ptr,
    # sizes and scalars
    M,
    COLS,
    DEPTH,
    R,
    M_BUCKET,
    scale,
    # strides
    stride_am,
    stride_ad,
    stride_lm,
    stride_lr,
    stride_rr,
    stride_rc,
    stride_om,
    stride_oc,
    # meta-parameters
    W_TRANSPOSED: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    W_TY: tl.constexpr,
    DOT_TY: tl.constexpr,
    OUT_TY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, COLS] = a[M, DEPTH] @ op(W) + scale * left[M, R] @ right[R, COLS] + bias[COLS];
    one program per [BLOCK_M, BLOCK_C] tile, reducing over DEPTH in BLOCK_D steps.
    W_TRANSPOSED: op(W) = W^T, W [COLS, DEPTH] (the forward); else op(W) = W, W [DEPTH, COLS]
    (the grad-input). M_BUCKET only keys the autotuner."""
    pid_m, pid_c = _grouped_tile(M, COLS, BLOCK_M, BLOCK_C, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < COLS
    rows_m = offs_m.to(tl.int64)  # index x stride in int64: either can be large
    cols_c = offs_c.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, DEPTH, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < DEPTH
        a = _load_tile(a_ptr, rows_m, offs_d, mask_m, mask_d, stride_am, stride_ad)
        # op(W) tile [BLOCK_D, BLOCK_C], read in place from the row-major NF4 storage.
        if W_TRANSPOSED:  # W^T: rows of W along the tile's columns
            w = _load_nf4_tile(
                packed_ptr,
                absmax_ptr,
                code_ptr,
                offs_c[None, :],
                offs_d[:, None],
                mask_d[:, None] & mask_c[None, :],
                DEPTH,
                BLOCKSIZE,
            )
        else:
            w = _load_nf4_tile(
                packed_ptr,
                absmax_ptr,
                code_ptr,
                offs_d[:, None],
                offs_c[None, :],
                mask_d[:, None] & mask_c[None, :],
                COLS,
                BLOCKSIZE,
            )
        acc = _dot(a, _weight_operand(w, W_TY, DOT_TY), acc, DOT_TY)

    acc += scale * _lowrank_term(
        left_ptr,
        right_ptr,
        rows_m,
        mask_m,
        cols_c,
        mask_c,
        R,
        stride_lm,
        stride_lr,
        stride_rr,
        stride_rc,
        BLOCK_M,
        BLOCK_C,
        BLOCK_R,
        DOT_TY,
    )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]

    out = round_to(acc.to(tl.float32), OUT_TY)
    tl.store(
        out_ptr + rows_m[:, None] * stride_om + cols_c[None, :] * stride_oc, out, mask=mask_m[:, None] & mask_c[None, :]
    )


def _autotuned(half: list[triton.Config], fp32: list[triton.Config]):
    """_nf4_lowrank_kernel autotuned over ``half`` tiles for bf16/fp16 activations and ``fp32``
    tiles for fp32 ones (the forward and the grad-input have tiles of their own)."""
    prune = functools.partial(_prune, candidates={False: half, True: fp32})
    return triton.autotune(
        configs=half if _INTERPRET else half + fp32, key=_KEY, prune_configs_by={"early_config_prune": prune}
    )(_nf4_lowrank_kernel)


_nf4_lowrank_linear_kernel = _autotuned(_HALF_FORWARD, _FP32_FORWARD)
_nf4_lowrank_linear_grad_input_kernel = _autotuned(_HALF_GRAD_INPUT, _FP32_GRAD_INPUT)


# ---------------------------------------------------------------------------------------------
# launchers


def _expect(t: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    check_device(t, name)
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(f"{name} must have shape {shape} and dtype {dtype}, got {describe(t)}")


def _check_activation(t: torch.Tensor, name: str) -> None:
    check_device(t, name)
    if t.dim() != 2 or t.dtype not in TL_DTYPES:
        raise ValueError(f"{name} must be a 2-D float32/bfloat16/float16 tensor, got {describe(t)}")


def _dtypes(dtype: torch.dtype) -> dict:
    w_ty = TL_DTYPES[dtype]
    # The interpreter's tl.dot reads bf16 operands as raw integers: widen them (exactly) to fp32.
    dot_ty = tl.float32 if _INTERPRET and dtype == torch.bfloat16 else w_ty
    return {"W_TY": w_ty, "DOT_TY": dot_ty, "OUT_TY": w_ty}


def _fused(
    kernel,
    names: tuple[str, str, str, str],
    a: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    cols: int,
    left: torch.Tensor,
    right: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    w_transposed: bool,
) -> torch.Tensor:
    """Checks and launch of ``out [M, cols] = a [M, depth] op(W) + scale * left [M, r] right' + bias``
    for both launchers: ``op(W) = W^T`` and ``right' = right^T`` with ``right [cols, r]`` when
    ``w_transposed`` (the forward, W ``[cols, depth]``), else ``W`` and ``right [r, cols]``
    (the grad-input, W ``[depth, cols]``). ``names`` are the launcher's names of a, cols, left and
    right, for error messages."""
    a_name, cols_name, left_name, right_name = names
    _check_activation(a, a_name)
    m, depth = a.shape
    if cols < 0:
        raise ValueError(f"{cols_name} must be >= 0, got {cols}")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    numel = cols * depth
    _expect(packed, "packed", ((numel + 1) // 2,), torch.uint8)
    _expect(absmax, "absmax", ((numel + blocksize - 1) // blocksize,), torch.float32)
    _check_activation(left, left_name)
    rank = left.shape[1]
    _expect(left, left_name, (m, rank), a.dtype)
    _expect(right, right_name, (cols, rank) if w_transposed else (rank, cols), a.dtype)
    if bias is not None:
        _expect(bias, "bias", (cols,), a.dtype)

    out = torch.empty((m, cols), dtype=a.dtype, device=a.device)
    if m == 0 or cols == 0:
        return out
    right = right.T if w_transposed else right  # [r, cols], a view
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_C"]),)  # noqa: E731
    kernel[grid](
        a,
        packed.contiguous(),
        absmax.contiguous(),
        nf4_code(a.device),
        left,
        right,
        None if bias is None else bias.contiguous(),
        out,
        m,
        cols,
        depth,
        rank,
        triton.next_power_of_2(m),
        float(scale),
        a.stride(0),
        a.stride(1),
        left.stride(0),
        left.stride(1),
        right.stride(0),
        right.stride(1),
        out.stride(0),
        out.stride(1),
        W_TRANSPOSED=w_transposed,
        BLOCKSIZE=blocksize,
        HAS_BIAS=bias is not None,
        BLOCK_R=min(max(16, triton.next_power_of_2(rank)), _MAX_BLOCK_R),
        **_dtypes(a.dtype),
    )
    return out


def nf4_lowrank_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    out_features: int,
    lowrank_x: torch.Tensor,
    up: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Fused QPiSSA forward ``y = x W^T + scale * lowrank_x up^T + bias``.

    ``x [M, K]`` fp32/bf16/fp16 (any strides); ``packed`` uint8 ``[ceil(N*K/2)]`` and ``absmax``
    fp32 ``[ceil(N*K/blocksize)]`` hold ``W [N, K]`` (N = ``out_features``); ``lowrank_x [M, r]``,
    ``up [N, r]``, ``bias [N]`` or None, all in x's dtype. Returns ``y [M, N]`` in x's dtype,
    accumulated in fp32 and rounded once.
    """
    return _fused(
        _nf4_lowrank_linear_kernel,
        ("x", "out_features", "lowrank_x", "up"),
        x,
        packed,
        absmax,
        blocksize,
        out_features,
        lowrank_x,
        up,
        scale,
        bias,
        w_transposed=True,
    )


def nf4_lowrank_linear_grad_input(
    grad_y: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    in_features: int,
    lowrank_grad: torch.Tensor,
    down: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Fused QPiSSA input gradient ``dx = grad_y W + scale * lowrank_grad down``.

    ``grad_y [M, N]`` fp32/bf16/fp16 (any strides); ``packed``/``absmax`` hold ``W [N, K]`` as in
    :func:`nf4_lowrank_linear` (K = ``in_features``), read in place; ``lowrank_grad [M, r]`` and
    ``down [r, K]`` in grad_y's dtype. Returns ``dx [M, K]`` in grad_y's dtype, accumulated in
    fp32 and rounded once.
    """
    return _fused(
        _nf4_lowrank_linear_grad_input_kernel,
        ("grad_y", "in_features", "lowrank_grad", "down"),
        grad_y,
        packed,
        absmax,
        blocksize,
        in_features,
        lowrank_grad,
        down,
        scale,
        None,
        w_transposed=False,
    )
