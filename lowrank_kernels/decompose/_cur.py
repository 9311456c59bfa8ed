"""CUR by norm-proportional sampling (`cur`, seed report §4) and the CURA split (`cur_factors`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lowrank_kernels import ops
from lowrank_kernels._checks import check_choice, check_matrix, check_rank
from lowrank_kernels._random import Generators, uniforms
from lowrank_kernels.batch_invariant import matmul, per_matrix
from lowrank_kernels.decompose._rsvd import PiSSAFactors, residual

_CUR_CORES = ("pinv", "stable", "optimal")


class CURResult(NamedTuple):
    """``C = W[..., :, cols] [..., m, r]``, ``U [..., r, r]`` (fp32), ``R = W[..., rows, :] [..., r, n]``,
    ``rows [..., r]``, ``cols [..., r]`` (int64); W ≈ C U R."""

    C: torch.Tensor
    U: torch.Tensor
    R: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def sample_proportional(weights: torch.Tensor, k: int, uniform: torch.Tensor) -> torch.Tensor:
    """``k`` distinct indices per row of ``weights [..., N]`` (non-negative), drawn without
    replacement with probability ∝ weight by the exponential race: the k smallest arrival
    times E_i / w_i, E_i = −log(1 − U_i) ~ Exp(1) from ``uniform [..., N]`` (fp64, U(0, 1)),
    which is exactly successive weighted sampling. Zero-weight indices come after all positive
    ones, in uniformly random order (so an all-zero row still gives k distinct indices).
    Returns int64 ``[..., k]``, ascending."""
    w = weights.double()
    # Arrival times are < 37 / (smallest positive fp32) < 1e47; zero weights queue from 2e300 on.
    arrival = torch.where(
        w > 0, -torch.log1p(-uniform) / w.clamp(min=torch.finfo(torch.float64).tiny), 2e300 * (1 + uniform)
    )
    return arrival.topk(k, dim=-1, largest=False).indices.sort(dim=-1).values


def cur(W: torch.Tensor, rank: int, *, u: str = "pinv", generator: Generators = None) -> CURResult:
    """CUR decomposition of ``W [..., m, n]`` by norm-proportional sampling (seed report §4).

    ``rank`` rows and ``rank`` columns are sampled without replacement with probability
    ∝ their squared norms (both norms from one pass over W). The core ``U [..., r, r]`` (fp32):
      "pinv"     the pseudo-inverse of the intersection W[rows, cols], as the seed report does
                 (exact recovery when that intersection has W's rank; unstable when it is
                 nearly singular);
      "stable"   its ε-pseudo-inverse, singular values below √eps(fp32) · σ_max dropped;
      "optimal"  C⁺ W R⁺, the Frobenius-optimal core for the sampled C and R (one more
                 GEMM pass over W).
    """
    W = check_matrix(W)
    rank = check_rank(W, rank)
    u = check_choice(u, "u", _CUR_CORES)
    row_norms, col_norms = ops.op("row_col_sq_norms")(W)
    row_uniform, col_uniform = uniforms(W.shape[:-2], W.shape[-2:], generator, W.device)
    rows = sample_proportional(row_norms, rank, row_uniform)
    cols = sample_proportional(col_norms, rank, col_uniform)
    C = W.gather(-1, cols[..., None, :].expand(*W.shape[:-1], rank))
    R = W.gather(-2, rows[..., :, None].expand(*rows.shape, W.shape[-1]))
    if u == "optimal":
        U = matmul(_pinv(C.float()), matmul(W.float(), _pinv(R.float())))
    else:
        core = C.gather(-2, rows[..., :, None].expand(*rows.shape, rank)).float()
        U = _pinv(core, rtol=math.sqrt(torch.finfo(torch.float32).eps) if u == "stable" else None)
    return CURResult(C, U, R, rows, cols)


def _pinv(X: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Pseudo-inverse of each matrix of ``X [..., m, n]`` (fp32), as of that matrix alone."""
    return per_matrix(torch.linalg.pinv, X, always=True, rtol=rtol)


def cur_factors(W: torch.Tensor, rank: int, **cur_options) -> PiSSAFactors:
    """PiSSA-style CUR split (CURA): ``A = C [..., m, r]``, ``B = U R [..., r, n]``, ``W_res = W − A B``."""
    C, U, R, _, _ = cur(W, rank, **cur_options)
    B = matmul(U, R.float()).to(W.dtype)
    return PiSSAFactors(C, B, residual(W, C, B))
