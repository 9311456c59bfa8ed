"""Reference kernels of the decompositions in plain PyTorch (any device), the oracle for the
compiled ones: squared row/column norms and the Gram matrix, both accumulated in fp64."""

from __future__ import annotations

import torch


def row_col_sq_norms_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., m, n]`` -> fp32 ``(Σ_j w_ij² [..., m], Σ_i w_ij² [..., n])``."""
    sq = w.double().square()
    return sq.sum(-1).float(), sq.sum(-2).float()


def gram_ref(y: torch.Tensor) -> torch.Tensor:
    """``y [..., m, k]`` -> fp32 ``yᵀ y [..., k, k]``."""
    y64 = y.double()
    return (y64.mT @ y64).float()
