"""QPiSSA: a PiSSA split whose frozen residual is stored in NF4, refined by alternating NF4
quantization and low-rank refits (PiSSA paper §4); LoftQ as the baseline; and the
error metrics that compare them.

Every function takes ``W [..., m, n]`` (leading dims = a batch of same-shape layers, decomposed
at once); NF4 residuals of a batch are a list of one `NF4Weight` ``[m, n]`` per matrix, in
row-major order of the leading dims (NF4 blocks must not straddle two layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from lowrank_kernels import decompose
from lowrank_kernels._checks import check_matrix, check_rank, is_int
from lowrank_kernels.adapters.inits import check_init, init_factors
from lowrank_kernels.nf4 import NF4Weight, check_blocksize, quantize_nf4

#: A frozen residual: dense ``[..., m, n]``, one NF4 weight ``[m, n]``, or one per matrix of a batch.
Residual = torch.Tensor | NF4Weight | Sequence[NF4Weight]


class QuantizedFactors(NamedTuple):
    """``A [..., m, r]``, ``B [..., r, n]`` in W's dtype and ``residual``: one `NF4Weight` ``[m, n]``
    (of W's dtype) per matrix; ``W ≈ deq(residual) + A B``."""

    A: torch.Tensor
    B: torch.Tensor
    residual: list[NF4Weight]


# ---- batched NF4 -----------------------------------------------------------------------------------


def quantize_batch(W: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> list[NF4Weight]:
    """``W [..., m, n]`` -> one `NF4Weight` per matrix (row-major over the leading dims)."""
    return [quantize_nf4(w, blocksize, double_quant) for w in W.reshape(-1, *W.shape[-2:])]


def dense_residual(residual: Residual, shape: torch.Size | None = None) -> torch.Tensor:
    """The residual as a dense tensor: NF4 weights dequantized (in their dtype) and stacked to
    ``shape`` (default: ``[m, n]`` for one weight, ``[count, m, n]`` for a sequence)."""
    if isinstance(residual, torch.Tensor):
        return residual
    if isinstance(residual, NF4Weight):
        return residual.dequantize() if shape is None else residual.dequantize().reshape(shape)
    first = residual[0]
    out = torch.empty((len(residual), *first.shape), dtype=first.dtype, device=first.device)
    for q, slot in zip(residual, out):
        q.dequantize(out=slot)
    return out if shape is None else out.reshape(shape)


# ---- QPiSSA and LoftQ --------------------------------------------------------------------------------


def qpissa_factors(
    W: torch.Tensor,
    rank: int,
    *,
    init: str = "rsvd",
    iters: int = 1,
    blocksize: int = 64,
    double_quant: bool = False,
    generator: decompose.Generators = None,
    **init_options,
) -> QuantizedFactors:
    """QPiSSA of ``W [..., m, n]`` (fp32/bf16/fp16) with ``iters`` >= 1 refinement rounds.

    Starts from the named init's split (the principal components for "svd"/"rsvd"), then repeats
    ``iters`` times: ``Q = nf4(W − A B)``; ``A, B`` = the rank-``rank`` SVD split of ``W − deq(Q)``.
    Ending on the refit makes ``A B`` the best rank-r correction of the final quantization error.
    (The PiSSA authors' script ends on the quantization instead, so its 1 round is plain QPiSSA,
    ``nf4(W − A₀ B₀)``; on the 36 MiniLM linears at rank 16 that gives a mean error reduction of
    12.7 % / 22.8 % for 1 / 5 rounds, ending on the refit 17.5 % / 24.5 %.)
    The refits are exact SVDs for init="svd", else `rsvd` (with ``init_options`` when init="rsvd",
    which are then rsvd options); ``generator`` (one, or one per matrix) drives every random step.
    """
    check_init(init)
    iters = _check_iters(iters)
    check_blocksize(blocksize)
    A, B, _ = init_factors(W, rank, init, generator=generator, **init_options)
    refit_options = init_options if init == "rsvd" else {}
    return _alternate(
        W, A, B, iters, blocksize, double_quant, exact=init == "svd", generator=generator, **refit_options
    )


def loftq_factors(
    W: torch.Tensor,
    rank: int,
    *,
    iters: int = 1,
    blocksize: int = 64,
    double_quant: bool = False,
    exact: bool = False,
    generator: decompose.Generators = None,
    **rsvd_options,
) -> QuantizedFactors:
    """LoftQ (Li et al. 2023) baseline of ``W [..., m, n]``: the same alternation as
    `qpissa_factors` started from ``A B = 0``, i.e. the first round quantizes W itself.
    exact=True refits by the full SVD, otherwise by `rsvd` with ``rsvd_options``."""
    iters = _check_iters(iters)
    check_blocksize(blocksize)
    rank = check_rank(check_matrix(W), rank)
    A = W.new_zeros((*W.shape[:-1], rank))
    B = W.new_zeros((*W.shape[:-2], rank, W.shape[-1]))
    return _alternate(W, A, B, iters, blocksize, double_quant, exact=exact, generator=generator, **rsvd_options)


def _alternate(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    iters: int,
    blocksize: int,
    double_quant: bool,
    *,
    exact: bool,
    generator,
    **rsvd_options,
) -> QuantizedFactors:
    """``iters`` rounds of ``Q = nf4(W − A B)``, ``A, B = svd_split(W − deq(Q))``. The low-rank
    algebra runs in fp32 (rounding W_res to W's dtype only for the quantizer, so the NF4
    weights dequantize to W's dtype); A and B are returned in W's dtype."""
    rank = A.shape[-1]
    W32 = W.float()
    for _ in range(iters):
        residual = quantize_batch(decompose.residual(W32, A, B).to(W.dtype), blocksize, double_quant)
        target = W32 - dense_residual(residual, W.shape).float()
        A, B, _ = decompose.pissa_factors(target, rank, exact=exact, generator=generator, **rsvd_options)
    return QuantizedFactors(A.to(W.dtype), B.to(W.dtype), residual)


def _check_iters(iters: object) -> int:
    if not is_int(iters) or iters < 1:
        raise ValueError(f"quant_iters must be an int >= 1, got {iters!r}")
    return iters


# ---- metrics -------------------------------------------------------------------------------------------


def nuclear_norm(M: torch.Tensor) -> torch.Tensor:
    """‖M‖_* = Σ σ_i of ``M [..., m, n]``, fp64 ``[...]``: square roots of the eigenvalues of the
    fp64 Gram matrix of M's short side (several times faster than an SVD, and accurate to
    fp64 rounding of σ² relative to σ_max², far below what the metric resolves)."""
    M = M.double()
    G = M.mT @ M if M.shape[-2] >= M.shape[-1] else M @ M.mT
    return torch.linalg.eigvalsh(G).clamp(min=0).sqrt().sum(-1)


def _error(W: torch.Tensor, residual: Residual, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """fp64 ``W − (deq(residual) + s A B) [..., m, n]``."""
    dense = dense_residual(residual, W.shape)
    approximation = torch.baddbmm(
        dense.double().reshape(-1, *W.shape[-2:]),
        A.double().reshape(-1, *A.shape[-2:]),
        B.double().reshape(-1, *B.shape[-2:]),
        alpha=scale,
    )
    return W.double() - approximation.reshape(W.shape)


def _qlora_error(W: torch.Tensor, like: NF4Weight | Sequence[NF4Weight]) -> torch.Tensor:
    """``‖W − deq(nf4(W))‖_*`` (fp64 ``[...]``) with the blocksize and double quant of ``like``."""
    first = like if isinstance(like, NF4Weight) else like[0]
    qlora = dense_residual(quantize_batch(W, first.blocksize, first.double_quant), W.shape)
    return nuclear_norm(W.double() - qlora.double())


def quantization_error(
    W: torch.Tensor, residual: Residual, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """``‖W − (deq(residual) + s A B)‖_*`` (fp64 ``[...]``) for ``W [..., m, n]``."""
    return nuclear_norm(_error(W, residual, A, B, scale))


def quantization_error_reduction(
    W: torch.Tensor, W_res_q: NF4Weight | Sequence[NF4Weight], A: torch.Tensor, B: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """PiSSA paper Table 4: ``1 − ‖W − (deq(W_res_q) + s A B)‖_* / ‖W − deq(nf4(W))‖_*`` (fp64
    ``[...]``), nf4(W) with W_res_q's blocksize and double quant: the share of plain NF4's
    (QLoRA's) error the adapter removes; 0 for QLoRA, higher is better."""
    return 1 - quantization_error(W, W_res_q, A, B, scale) / _qlora_error(W, W_res_q)


def reconstruction_error(
    W: torch.Tensor, residual: Residual, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Relative Frobenius error ``‖W − (deq(residual) + s A B)‖_F / ‖W‖_F`` (fp64 ``[...]``): how
    far the adapted layer at init is from the original (rounding only for a dense residual)."""
    return torch.linalg.matrix_norm(_error(W, residual, A, B, scale)) / torch.linalg.matrix_norm(W.double())


def error_metrics(
    W: torch.Tensor, residual: Residual, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(`reconstruction_error`, `quantization_error_reduction` or None for a dense residual),
    sharing one fp64 error matrix."""
    error = _error(W, residual, A, B, scale)
    recon = torch.linalg.matrix_norm(error) / torch.linalg.matrix_norm(W.double())
    if isinstance(residual, torch.Tensor):
        return recon, None
    return recon, 1 - nuclear_norm(error) / _qlora_error(W, residual)
