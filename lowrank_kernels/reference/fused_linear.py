"""Reference fused PiSSA linear in fp64 (any device): the oracle for every fused-linear kernel.

``W`` is the NF4 residual dequantized and viewed ``[out_features, in_features]``; all products are
formed in fp64 and the result is rounded once to the activation dtype.
"""

from __future__ import annotations

import torch

from lowrank_kernels.reference.nf4 import dequantize_nf4_ref


def _weight(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, rows: int, cols: int) -> torch.Tensor:
    return dequantize_nf4_ref(packed, absmax, blocksize, rows * cols, torch.float64).view(rows, cols)


def nf4_lowrank_linear_ref(
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
    """``x [M, K]``, ``lowrank_x [M, r]``, ``up [N, r]``, ``bias [N]`` -> ``x W^T + scale lowrank_x up^T + bias``."""
    w = _weight(packed, absmax, blocksize, out_features, x.shape[1])
    y = x.double() @ w.T + scale * (lowrank_x.double() @ up.double().T)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def nf4_lowrank_linear_grad_input_ref(
    grad_y: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    in_features: int,
    lowrank_grad: torch.Tensor,
    down: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``grad_y [M, N]``, ``lowrank_grad [M, r]``, ``down [r, K]`` -> ``grad_y W + scale lowrank_grad down``."""
    w = _weight(packed, absmax, blocksize, grad_y.shape[1], in_features)
    dx = grad_y.double() @ w + scale * (lowrank_grad.double() @ down.double())
    return dx.to(grad_y.dtype)
