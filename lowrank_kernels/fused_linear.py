"""fused_pissa_linear: ``y = x W_resᵀ + s (x Bᵀ) Aᵀ + bias`` with ``W_res`` in NF4 or dense.

Notation (ARCHITECTURE.md, notation): ``W_res [out, in]`` frozen residual, ``A [out, r]`` ("up"),
``B [r, in]`` ("down"), ``s`` the adapter scale. Gradients flow to ``x``, ``A``, ``B`` and ``bias``.

NF4 residual: one autograd op, ``torch.ops.lowrank_kernels.fused_pissa_linear_nf4``, whose
forward runs the fused kernel op ``nf4_lowrank_linear`` (dequantize inside the GEMM, low-rank
term in the epilogue) and whose backward runs ``nf4_lowrank_linear_grad_input`` for
``dx = dy W_res + s (dy A) B``; neither ever materialises the dequantized ``W_res``. The
low-rank products (``x Bᵀ``, ``dy A``, ``dA``, ``dB``) are ``r``-thin GEMMs left to ATen.

Dispatch by device and token count M (see ``build_info()``): CPU - C++ decode kernel for few
tokens, C++ panel-GEMM kernel above (bf16 activations multiplied in bf16 where the CPU has bf16
dot products, ``ops.cpu_bf16_gemm()``); CUDA - CUDA C++ GEMV for few tokens, Triton GEMM above
(and Triton for the backward).

Dense residual (plain PiSSA): an ATen composition (``addmm``), differentiable by autograd.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowrank_kernels import ops
from lowrank_kernels._checks import FLOAT_DTYPES, describe
from lowrank_kernels.nf4 import NF4Weight


def fused_pissa_linear(
    x: torch.Tensor,
    w_res: NF4Weight | torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``y = x @ W_res.T + scale * (x @ B.T) @ A.T + bias``.

    x:     ``[..., in]`` fp32/bf16/fp16 activations (any leading dims, zero tokens allowed).
    w_res: ``[out, in]`` frozen residual, an `NF4Weight` (plain or double quant) or a dense
           tensor of x's dtype (which must not require grad; fp64 allowed, e.g. for gradcheck).
    A:     ``[out, r]``, B: ``[r, in]``, bias: ``[out]`` or None, all of x's dtype (under
           ``torch.autocast`` everything is cast to the autocast dtype first).
    scale: finite adapter scale ``s``.
    Returns ``[..., out]`` in x's dtype; products accumulate in fp32.
    """
    x, A, B, bias = _autocast(x, A, B, bias)
    out_features, in_features = _check_args(x, w_res, A, B, bias, scale)
    x2d = x.reshape(-1, in_features)
    if isinstance(w_res, NF4Weight):
        args = (x2d, w_res.packed, w_res.block_absmax(), w_res.blocksize)
        if _needs_grad(x, A, B, bias):
            y = ops.op("fused_pissa_linear_nf4")(*args, A, B, bias, float(scale))
        else:  # inference: skip the autograd op's Python wrapper (~0.1 ms, a tenth of a decode call)
            y = ops.op("nf4_lowrank_linear")(*args, out_features, x2d @ B.T, A, float(scale), bias)
    else:
        y = _dense_pissa_linear(x2d, w_res, A, B, bias, float(scale))
    return y.reshape(*x.shape[:-1], out_features)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _dense_pissa_linear(x, w_res, A, B, bias, scale):
    y = torch.addmm(bias, x, w_res.T) if bias is not None else x @ w_res.T
    return torch.addmm(y, x @ B.T, A.T, alpha=scale)


def _autocast(x, A, B, bias):
    """Under torch.autocast, runs in the autocast dtype (as F.linear would)."""
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return x, A, B, bias
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return cast(x), cast(A), cast(B), cast(bias)


# ---- argument checks -------------------------------------------------------------------------------


def _check_tensor(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_args(x, w_res, A, B, bias, scale) -> tuple[int, int]:
    """Validates everything; returns (out_features, in_features)."""
    _check_tensor(x, "x")
    dense = isinstance(w_res, torch.Tensor)
    if x.dtype not in FLOAT_DTYPES and not (dense and x.dtype == torch.float64):
        raise TypeError(f"x must be float32, float16 or bfloat16 (or float64 with a dense w_res), got {describe(x)}")
    if x.dim() < 1:
        raise ValueError(f"x must have shape [..., in_features], got {describe(x)}")
    out_features, in_features = _check_residual(w_res, x)
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} input features but w_res is [{out_features}, {in_features}]: x {describe(x)}"
        )
    for t, name, shape in ((A, "A", (out_features, None)), (B, "B", (None, in_features))):
        _check_tensor(t, name)
        if t.dim() != 2 or any(want is not None and got != want for got, want in zip(t.shape, shape)):
            want = ", ".join("r" if d is None else str(d) for d in shape)
            raise ValueError(
                f"{name} must have shape [{want}] for w_res [{out_features}, {in_features}], got {describe(t)}"
            )
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"A [out, r] and B [r, in] disagree on r: A {describe(A)}, B {describe(B)}")
    if bias is not None and (_check_tensor(bias, "bias").dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"bias must have shape [{out_features}], got {describe(bias)}")
    for t, name in ((A, "A"), (B, "B"), (bias, "bias")):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {describe(t)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python number, got {scale!r}")
    return out_features, in_features


def _check_residual(w_res, x) -> tuple[int, int]:
    if isinstance(w_res, NF4Weight):
        if len(w_res.shape) != 2:
            raise ValueError(f"w_res must be a 2-D [out, in] NF4 weight, got shape {tuple(w_res.shape)}")
        if w_res.device != x.device:
            raise ValueError(f"w_res is on {w_res.device} but x is on {x.device}")
        return tuple(w_res.shape)
    _check_tensor(w_res, "w_res")
    if not w_res.is_floating_point():
        raise TypeError(
            f"w_res must be an NF4Weight (see quantize_nf4) or a float tensor; an integer tensor is "
            f"not NF4 storage: got {describe(w_res)}"
        )
    if w_res.dim() != 2:
        raise ValueError(f"w_res must be [out, in], got {describe(w_res)}")
    if w_res.dtype != x.dtype:
        raise TypeError(f"a dense w_res must have x's dtype {x.dtype}, got {describe(w_res)}")
    if w_res.device != x.device:
        raise ValueError(f"w_res is on {w_res.device} but x is on {x.device}")
    if w_res.requires_grad:
        raise ValueError(
            "w_res is the frozen residual of PiSSA: fused_pissa_linear computes no gradient for it. "
            "Pass w_res.detach() (train A and B), or use F.linear to train the full weight."
        )
    return tuple(w_res.shape)
