"""fused_pissa_linear: ``y = x W_resᵀ + s (x Bᵀ) Aᵀ + bias`` with ``W_res`` in NF4 or dense.

Notation (DESIGN.md §2): ``W_res [out, in]`` frozen residual, ``A [out, r]`` ("up"),
``B [r, in]`` ("down"), ``s`` the adapter scale. Gradients flow to ``x``, ``A``, ``B`` and ``bias``.

NF4 residual: one autograd op, ``torch.ops.lowrank_kernels.fused_pissa_linear_nf4``, whose
forward runs the fused kernel op ``nf4_lowrank_linear`` (dequantize inside the GEMM, low-rank
term in the epilogue) and whose backward runs ``nf4_lowrank_linear_grad_input`` for
``dx = dy W_res + s (dy A) B``; neither ever materialises the dequantized ``W_res``. The
low-rank products (``x Bᵀ``, ``dy A``, ``dA``, ``dB``) are ``r``-thin GEMMs left to ATen.

Dispatch by device and token count M (see ``build_info()``): CPU - C++ decode kernel for few
tokens, C++ panel-GEMM kernel above; CUDA - CUDA C++ GEMV for few tokens, Triton GEMM above
(and Triton for the backward).

Dense residual (plain PiSSA): an ATen composition (``addmm``), differentiable by autograd.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from lowrank_kernels import _extension, ops
from lowrank_kernels.nf4 import NF4Weight

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OP = f"{ops.NAMESPACE}::fused_pissa_linear_nf4"


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def fused_pissa_linear(x: torch.Tensor, w_res: NF4Weight | torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       bias: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
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
    if x.dtype not in _FLOAT_DTYPES and not (dense and x.dtype == torch.float64):
        raise TypeError(f"x must be float32, float16 or bfloat16 (or float64 with a dense w_res), got {_describe(x)}")
    if x.dim() < 1:
        raise ValueError(f"x must have shape [..., in_features], got {_describe(x)}")
    out_features, in_features = _check_residual(w_res, x)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features but w_res is [{out_features}, {in_features}]: "
                         f"x {_describe(x)}")
    for t, name, shape in ((A, "A", (out_features, None)), (B, "B", (None, in_features))):
        _check_tensor(t, name)
        if t.dim() != 2 or any(want is not None and got != want for got, want in zip(t.shape, shape)):
            want = ", ".join("r" if d is None else str(d) for d in shape)
            raise ValueError(f"{name} must have shape [{want}] for w_res [{out_features}, {in_features}], got {_describe(t)}")
    if A.shape[1] != B.shape[0]:
        raise ValueError(f"A [out, r] and B [r, in] disagree on r: A {_describe(A)}, B {_describe(B)}")
    if bias is not None and (_check_tensor(bias, "bias").dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"bias must have shape [{out_features}], got {_describe(bias)}")
    for t, name in ((A, "A"), (B, "B"), (bias, "bias")):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {_describe(t)}")
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
        raise TypeError(f"w_res must be an NF4Weight (see quantize_nf4) or a float tensor; an integer tensor is "
                        f"not NF4 storage: got {_describe(w_res)}")
    if w_res.dim() != 2:
        raise ValueError(f"w_res must be [out, in], got {_describe(w_res)}")
    if w_res.dtype != x.dtype:
        raise TypeError(f"a dense w_res must have x's dtype {x.dtype}, got {_describe(w_res)}")
    if w_res.device != x.device:
        raise ValueError(f"w_res is on {w_res.device} but x is on {x.device}")
    if w_res.requires_grad:
        raise ValueError("w_res is the frozen residual of PiSSA: fused_pissa_linear computes no gradient for it. "
                         "Pass w_res.detach() (train A and B), or use F.linear to train the full weight.")
    return tuple(w_res.shape)


# ---- op registration: forward, autograd, fake and CUDA kernels ------------------------------------

def _fused_forward(x, packed, absmax, blocksize, A, B, bias, scale):
    """``x [M, in]`` -> ``[M, out]``: the fused kernel with the low-rank input ``x Bᵀ``."""
    return torch.ops.lowrank_kernels.nf4_lowrank_linear(x, packed, absmax, blocksize, A.shape[0], x @ B.T, A,
                                                        scale, bias)


def _setup_context(ctx, inputs, output):
    x, packed, absmax, blocksize, A, B, bias, scale = inputs
    ctx.save_for_backward(x, packed, absmax, A, B)
    ctx.blocksize, ctx.scale, ctx.has_bias = blocksize, scale, bias is not None


def _backward(ctx, grad_y):
    x, packed, absmax, A, B = ctx.saved_tensors
    needs_x, _, _, _, needs_A, needs_B, needs_bias, _ = ctx.needs_input_grad
    grad_lowrank = grad_y @ A  # [M, r]
    grad_x = grad_A = grad_B = grad_bias = None
    if needs_x:
        grad_x = torch.ops.lowrank_kernels.nf4_lowrank_linear_grad_input(
            grad_y, packed, absmax, ctx.blocksize, x.shape[1], grad_lowrank, B, ctx.scale)
    if needs_A:
        grad_A = ctx.scale * (grad_y.T @ (x @ B.T))
    if needs_B:
        grad_B = ctx.scale * (grad_lowrank.T @ x)
    if needs_bias and ctx.has_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, None, None, None, grad_A, grad_B, grad_bias, None


def _register_fakes() -> None:
    @torch.library.register_fake(f"{ops.NAMESPACE}::nf4_lowrank_linear")
    def _(x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake(f"{ops.NAMESPACE}::nf4_lowrank_gemv")
    def _(x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake(f"{ops.NAMESPACE}::nf4_lowrank_linear_grad_input")
    def _(grad_y, packed, absmax, blocksize, in_features, lowrank_grad, down, scale):
        return grad_y.new_empty(grad_y.shape[0], in_features)

    @torch.library.register_fake(_OP)
    def _(x, packed, absmax, blocksize, A, B, bias, scale):
        return x.new_empty(x.shape[0], A.shape[0])


def _triton_or_reference():
    """The GPU GEMM kernels: Triton, or the fp64 PyTorch reference where Triton is missing."""
    if ops.triton_available():
        from lowrank_kernels.triton import fused_linear

        return fused_linear.nf4_lowrank_linear, fused_linear.nf4_lowrank_linear_grad_input
    from lowrank_kernels.reference import fused_linear

    return fused_linear.nf4_lowrank_linear_ref, fused_linear.nf4_lowrank_linear_grad_input_ref


def _nf4_lowrank_linear_cuda(x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias):
    if x.shape[0] <= ops.cuda_gemv_max_tokens():
        return torch.ops.lowrank_kernels.nf4_lowrank_gemv(x, packed, absmax, blocksize, out_features, lowrank_x,
                                                          up, scale, bias)
    return _triton_or_reference()[0](x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias)


def _nf4_lowrank_grad_input_cuda(grad_y, packed, absmax, blocksize, in_features, lowrank_grad, down, scale):
    return _triton_or_reference()[1](grad_y, packed, absmax, blocksize, in_features, lowrank_grad, down, scale)


def _nf4_lowrank_gemv_fallback(x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias):
    """CUDA GEMV when the extension was built without nvcc: the GEMM kernel serves every M."""
    return _triton_or_reference()[0](x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias)


def _register() -> None:
    if _extension.load_error() is not None:
        return
    _register_fakes()
    for device in ("cpu", "cuda"):
        torch.library.register_kernel(_OP, device, _fused_forward)
    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
    if torch.version.cuda:
        torch.library.register_kernel(f"{ops.NAMESPACE}::nf4_lowrank_linear", "cuda", _nf4_lowrank_linear_cuda)
        torch.library.register_kernel(f"{ops.NAMESPACE}::nf4_lowrank_linear_grad_input", "cuda",
                                      _nf4_lowrank_grad_input_cuda)
        if not _extension.compiled_config().get("cuda_kernels"):
            torch.library.register_kernel(f"{ops.NAMESPACE}::nf4_lowrank_gemv", "cuda", _nf4_lowrank_gemv_fallback)


_register()
