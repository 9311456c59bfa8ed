"""Orthonormalisation of tall-skinny fp32 blocks ``[..., m, k]``: CholeskyQR2 for a block
(`orthonormalize`), and the extension of an orthonormal basis by a new block that stays
orthonormal when the block adds nothing new (`orthonormal_extension`, rsvd's Krylov blocks).
Every step is decided per matrix, so a batch gets the bits of its matrices alone."""

from __future__ import annotations

import torch

from lowrank_kernels import ops
from lowrank_kernels.batch_invariant import matmul, per_matrix


def gram(Y: torch.Tensor) -> torch.Tensor:
    """fp32 ``Yᵀ Y [..., k, k]`` of ``Y [..., m, k]`` (exactly symmetric)."""
    return ops.op("gram")(Y)


def _cholesky_qr(Y: torch.Tensor, shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One CholeskyQR step on fp32 ``Y``: (Q, ok [...]) with Q = Y R⁻¹, R = chol(YᵀY (+ shift)).
    The shift (Fukaya et al. 2020) makes the factorisation succeed for any full-rank-in-fp32
    block at the cost of orthogonality, which the following unshifted steps restore."""
    G = gram(Y)
    if shift:
        m, k = Y.shape[-2:]
        norm2 = G.diagonal(dim1=-2, dim2=-1).sum(-1)  # ‖Y‖_F² >= ‖Y‖_2²
        s = 11 * (m * k + k * (k + 1)) * torch.finfo(torch.float32).eps * norm2
        G = G + s[..., None, None] * torch.eye(k, dtype=G.dtype, device=G.device)
    R, info = per_matrix(torch.linalg.cholesky_ex, G, upper=True)
    # Q = Y R⁻¹ as a GEMM with the small explicit inverse: faster than a right-sided
    # triangular solve on the tall block, and as accurate for CholeskyQR's purposes.
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return matmul(Y, per_matrix(torch.linalg.solve_triangular, R, eye, upper=True)), info == 0


def power_of_two_scale(X: torch.Tensor) -> torch.Tensor:
    """Per matrix of ``X [..., m, k]``, the power of two nearest below max |X| (1 where X is zero
    or not finite): dividing by it is exact, so scaling changes no bits of a well-scaled block,
    and keeps the fp32 Gram matrix of a tiny (or huge) block out of underflow (overflow)."""
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    usable = (amax > 0) & torch.isfinite(amax)
    exponent = torch.frexp(torch.where(usable, amax, torch.ones_like(amax))).exponent - 1
    return torch.ldexp(torch.ones_like(amax), exponent)


def orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``Q [..., m, k]`` (fp32) of the columns of ``Y [..., m, k]`` (k <= m).

    CholeskyQR2 (GEMM-shaped, batched); where Cholesky fails (an ill-conditioned block),
    shifted CholeskyQR3; where that fails too (a numerically rank-deficient block),
    Householder QR, batch element by batch element. Each matrix is first scaled by a power of
    two (exact), so the result does not depend on Y's magnitude.
    """
    Y = Y.float()
    Y = Y / power_of_two_scale(Y)
    Q, ok = _cholesky_qr(Y)
    if not ok.all():  # per matrix: a batch element takes the path it would take alone
        shifted, ok_shifted = _cholesky_qr(Y, shift=True)
        second, ok_second = _cholesky_qr(shifted)
        Q = torch.where(ok[..., None, None], Q, second)
        ok = ok | (ok_shifted & ok_second)
    Q, ok_final = _cholesky_qr(Q)
    ok = ok & ok_final
    if not ok.all():
        Q = torch.where(ok[..., None, None], Q, per_matrix(torch.linalg.qr, Y, always=True)[0])
    return Q


# Krylov blocks: a direction of a new block whose part outside the basis is below this fraction
# of the block's largest column is taken for rounding noise (fp32 projections leave about
# eps·√k of the basis behind, ~1e-6 for k in the thousands) and replaced by a random direction.
_COLLAPSED_BELOW = 1e-4
# A block is accepted once its overlap with the basis and its departure from orthonormality are
# this small (~100 fp32 roundings: far below what moves the Ritz values).
_ORTHONORMAL_WITHIN = 1e-5
# Sweeps (project, SVQB, check) a block may take: a healthy block needs one; a collapsed one a
# second, for the random directions that replaced its noise; the third covers rounding.
_MAX_SWEEPS = 3


def _random_directions(shape: tuple[int, ...], seed: int, like: torch.Tensor) -> torch.Tensor:
    """Unit-norm Gaussian columns ``[M, l]`` from a fixed seed: the same for every matrix and
    every call (a batch gets the bits of its matrices alone; the user's generator is not drawn
    from), different for every seed."""
    draws = torch.randn(shape, generator=torch.Generator().manual_seed(0x6B72_796C + seed))
    return (draws / torch.linalg.vector_norm(draws, dim=0)).to(like.device)


def _svqb(X: torch.Tensor, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SVQB with drop (Stathopoulos & Wu 2002; Duersch et al. 2018): ``X V Σ⁻¹`` from the
    eigendecomposition ``XᵀX = V Σ² Vᵀ`` in fp64, and the mask ``[..., l]`` of its columns whose
    σ is at most ``floor [..., 1, 1]`` (noise: their column is left for the caller to replace)."""
    theta, V = per_matrix(torch.linalg.eigh, gram(X).double(), always=True)
    sigma = theta.clamp(min=0).sqrt()
    collapsed = sigma <= floor[..., 0, :].double()
    inverse = torch.where(collapsed, torch.zeros_like(sigma), 1 / sigma.clamp(min=torch.finfo(torch.float64).tiny))
    return matmul(X, (V * inverse[..., None, :]).float()), collapsed


def orthonormal_extension(basis: torch.Tensor, Y: torch.Tensor, seed: int) -> torch.Tensor:
    """Orthonormal ``Q [..., M, l]`` orthogonal to the orthonormal ``basis [..., M, k]``, spanning
    the part of ``Y [..., M, l]`` outside it; where Y has no such part (an exhausted Krylov space,
    a rank-deficient or zero W), random directions orthogonalised like the rest.

    Per sweep: one Gram-Schmidt pass, SVQB (noise directions replaced by random ones), then the
    check, whose overlap ``basisᵀ Q`` is the next sweep's Gram-Schmidt coefficients. Sweeps
    repeat, per matrix, until the block is orthonormal and orthogonal to the basis: a healthy
    block costs what one Gram-Schmidt pass and one orthonormalisation do.
    """
    X = Y / power_of_two_scale(Y)
    floor = _COLLAPSED_BELOW * torch.linalg.vector_norm(X, dim=-2, keepdim=True).amax(-1, keepdim=True)
    overlap = matmul(basis.mT, X)
    eye = torch.eye(X.shape[-1], dtype=torch.float32, device=X.device)
    pending = torch.ones(X.shape[:-2], dtype=torch.bool, device=X.device)
    for sweep in range(_MAX_SWEEPS):
        candidate, collapsed = _svqb(X - matmul(basis, overlap), floor)
        if bool(collapsed.any()):
            fill = _random_directions(X.shape[-2:], seed * _MAX_SWEEPS + sweep, X)
            candidate = torch.where(collapsed[..., None, :], fill, candidate)
        # SVQB leaves eps·κ of non-orthonormality; one CholeskyQR step of the now well-conditioned
        # block (cheap next to a projection) leaves rounding only, as in CholeskyQR2.
        polished, ok = _cholesky_qr(candidate)
        candidate = torch.where(ok[..., None, None], polished, candidate)
        X = torch.where(pending[..., None, None], candidate, X)
        overlap = matmul(basis.mT, X)
        accepted = (
            (overlap.abs().amax(dim=(-2, -1)) <= _ORTHONORMAL_WITHIN)
            & ((gram(X) - eye).abs().amax(dim=(-2, -1)) <= _ORTHONORMAL_WITHIN)
            & ~collapsed.any(-1)
        )
        pending = pending & ~accepted
        if not bool(pending.any()):
            break
        floor = torch.full_like(floor, _COLLAPSED_BELOW)  # X's columns now have unit norm
    return X
