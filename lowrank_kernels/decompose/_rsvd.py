"""Randomized SVD (`rsvd`) and the PiSSA splits built on SVDs (`pissa_factors`,
`random_pissa_factors`): W ≈ U diag(S) Vh, and W = W_res + A B with A = U √S, B = √S Vh."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from lowrank_kernels import ops
from lowrank_kernels._checks import (
    check_choice,
    check_finite,
    check_int,
    check_matrix,
    check_rank,
    describe,
)
from lowrank_kernels._random import Generators, draw_device, gaussian, matrix_generators
from lowrank_kernels.batch_invariant import (
    addmm,
    matmul,
    matmul_per_matrix,
    per_matrix,
    skinny_product,
    use_skinny_matmul,
)
from lowrank_kernels.decompose._orthonormal import (
    gram,
    orthonormal_extension,
    orthonormalize,
    power_of_two_scale,
)

_METHODS = ("subspace", "krylov")


class SVDResult(NamedTuple):
    """``U [..., m, k]``, ``S [..., k]`` (descending), ``Vh [..., k, n]``, fp32; and, if asked
    for, ``error [...]`` = ‖W − U diag(S) Vh‖_F / ‖W‖_F (exact for the computed factors up to
    rounding: the factors are an orthogonal projection of W)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    error: torch.Tensor | None = None


class PiSSAFactors(NamedTuple):
    """``A [..., m, r]``, ``B [..., r, n]``, ``W_res [..., m, n]`` in W's dtype: W = W_res + A B."""

    A: torch.Tensor
    B: torch.Tensor
    W_res: torch.Tensor


def _default_oversample(rank: int, max_width: int, method: str) -> int:
    """p = max(8, r/4) for subspace iteration; max(8, r/8) for block Krylov, whose search space is
    already (q + 1)(r + p) wide (Musco & Musco: block size r suffices; a little extra width
    still buys accuracy per pass)."""
    return max(0, min(max(8, rank // (8 if method == "krylov" else 4)), max_width - rank))


def _sketch_width(rank: int, oversample: Any, block_size: Any, n_iter: int, method: str, width_cap: int) -> int:
    """Columns of the sketch (= of each Krylov block)."""
    if block_size is None:
        oversample = (
            _default_oversample(rank, width_cap, method)
            if oversample is None
            else check_int(oversample, "oversample", 0)
        )
        return min(rank + oversample, width_cap)
    if method != "krylov" or oversample is not None:
        raise ValueError(
            f"block_size is an alternative to oversample for method='krylov'; got method={method!r}, "
            f"oversample={oversample!r}"
        )
    # Capped like rank + oversample, so one setting serves layers of every shape.
    width = min(check_int(block_size, "block_size", 1), width_cap)
    if (n_iter + 1) * width < rank:
        raise ValueError(
            f"the Krylov space of n_iter={n_iter} and block_size={block_size}, "
            f"(n_iter + 1)·block_size = {(n_iter + 1) * width} columns, must hold rank = {rank}: "
            f"raise block_size or n_iter"
        )
    return width


def rsvd(
    W: torch.Tensor,
    rank: int,
    *,
    oversample: int | None = None,
    n_iter: int = 2,
    method: str = "krylov",
    block_size: int | None = None,
    generator: Generators = None,
    error: bool = False,
) -> SVDResult:
    """Truncated randomized SVD of ``W [..., m, n]``: ``U [..., m, rank]``, ``S [..., rank]``,
    ``Vh [..., rank, n]`` (fp32), W ≈ U diag(S) Vh.

    oversample: extra sketch columns p (default max(8, rank/8) for krylov, max(8, rank/4) for
                subspace; capped by min(m, n)).
    n_iter:     power iterations q (subspace) or Krylov depth (krylov). Each costs two GEMM
                passes over W; the sketch and the projection cost one each.
    method:     "krylov" (default: the block Krylov space [WΩ, (WWᵀ)WΩ, ...] of blocks of rank + p
                columns: the same passes over W, an (n_iter + 1)-times larger search space,
                much more accuracy per pass on slowly decaying spectra) or "subspace"
                (sketch width rank + p, re-orthonormalised every half step).
    block_size: krylov only, instead of oversample: the width b of each Krylov block (b >= 1
                with (n_iter + 1)·b >= rank; capped by min(m, n)). A block narrower than rank
                with a deeper space buys more accuracy per GEMM column: at rank 128 on an
                LLM-like 4096x4096, b = 64, n_iter = 4 (10 passes of 64 columns) reaches 0.32 %
                Frobenius suboptimality in 265 ms, b = 128, n_iter = 2 (6 passes of 128) 0.42 %
                in 306 ms.
    generator:  for the Gaussian test matrix (same generator state -> same result); a sequence
                of generators, one per matrix of the batch, makes each matrix's result
                independent of the others in the batch.
    error:      also return ‖W − U diag(S) Vh‖_F / ‖W‖_F per matrix.
    """
    W = check_matrix(W, finite=False)  # checked on the first pass below
    rank = check_rank(W, rank)
    method = check_choice(method, "method", _METHODS)
    n_iter = check_int(n_iter, "n_iter", 0)
    generators = matrix_generators(generator, W.shape[:-2])
    m, n = W.shape[-2:]
    width_cap = min(m, n)
    width = _sketch_width(rank, oversample, block_size, n_iter, method, width_cap)
    transpose = m < n  # sketch the longer side: every GEMM then has the short side as its output rows
    A = W.mT if transpose else W  # [..., M, N] with M >= N
    sketch = _pass(A, gaussian((*A.shape[:-2], A.shape[-1], width), generators, A))
    # W's NaN/Inf check rides on the first pass: a non-finite element of W makes its rows of the
    # sketch non-finite (the Gaussian Ω has no zeros, almost surely); only then is W scanned.
    if not bool(torch.isfinite(sketch).all()):
        check_finite(W)
        raise _too_large(W)
    basis = _subspace_basis if method == "subspace" else _krylov_basis
    Q, Bt = basis(A, sketch, n_iter)  # Q [..., M, l] orthonormal, Bt = Aᵀ Q [..., N, l]
    Uh, S, Vb = _top_svd(Bt, rank)  # Qᵀ A = Uh S Vbᵀ (top rank triplets)
    if not bool(torch.isfinite(S).all()):
        raise _too_large(W)
    U = matmul(Q, Uh)
    Vh = Vb.mT
    if transpose:
        U, Vh = Vh.mT, U.mT
    err = _relative_error(W, S) if error else None
    return SVDResult(U.contiguous(), S, Vh.contiguous(), err)


def _too_large(W: torch.Tensor) -> ValueError:
    """The error for a finite W whose products overflow fp32."""
    return ValueError(
        f"W is too large for fp32 arithmetic (max |W| = {W.abs().max().item():.3g}, {describe(W)}): scale it down"
    )


def _top_svd(Bt: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``rank`` singular triplets of the small projected matrix ``Bᵀ = Bt [..., N, c]``
    (fp32): ``(Uh [..., c, rank], S [..., rank], V [..., N, rank])`` with B = Uh S Vᵀ.

    Rayleigh-Ritz on the c×c Gram matrix in fp64 (eigh) instead of an SVD of the tall Bt,
    which costs several times more; V = Bt Uh S⁻¹ is then re-orthonormalised, which also turns
    the columns of (numerically) zero singular values into valid orthonormal directions.
    """
    scale = power_of_two_scale(Bt)  # exact: keeps the fp32 Gram of a tiny W out of underflow
    G = gram(Bt / scale).double()
    eigenvalues, vectors = per_matrix(torch.linalg.eigh, G, always=True)  # ascending
    top = vectors[..., -rank:].flip(-1)
    S = eigenvalues[..., -rank:].flip(-1).clamp(min=0).sqrt().float() * scale[..., 0]
    V = orthonormalize(matmul(Bt, top.float()))
    return top.float(), S, V


def _pass(A: torch.Tensor, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """One pass over the big matrix: ``A @ X`` (or ``Aᵀ @ X``) in fp32 for ``A [..., M, N]`` in its
    own dtype and a thin ``X``. On CPU, by the `skinny_matmul` kernel where it is the faster
    GEMM (`use_skinny_matmul`), reading A in place whichever way its matrices are stored (A is
    often a transposed view of W; the choice follows each matrix's layout, not the batch's, so
    that a batch takes the path its matrices take alone)."""
    A = A.mT if transpose else A
    if use_skinny_matmul(A, X):
        return skinny_product(A, X)
    return matmul_per_matrix(A, X.to(A.dtype)).float()


def _subspace_basis(A: torch.Tensor, sketch: torch.Tensor, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal ``Q [..., M, l]`` ≈ range of A's top singular vectors after q power iterations
    from the sketch A Ω ``[..., M, l]``, and ``Aᵀ Q`` (fp32). Passes over A: 2q + 2 (with the sketch)."""
    Q = orthonormalize(sketch)
    for _ in range(n_iter):
        Z = orthonormalize(_pass(A, Q, transpose=True))
        Q = orthonormalize(_pass(A, Z))
    return Q, _pass(A, Q, transpose=True)


def _krylov_basis(A: torch.Tensor, sketch: torch.Tensor, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis ``Q [..., M, (q + 1)·l]`` from the sketch A Ω ``[..., M, l]``: the block Krylov space
    [AΩ, (AAᵀ)AΩ, ..., (AAᵀ)^q AΩ] (block Lanczos with full re-orthogonalisation; Musco &
    Musco 2015), and ``Aᵀ Q`` (fp32). Where the space reaches min(M, N) columns its last block
    is narrower, and it grows no further.

    Each new block A Z is orthogonalised against all previous blocks (`_orthonormal_extension`)
    *before* its product with Aᵀ is taken; that product is the next iteration's input, so Aᵀ Q
    comes out of the iteration itself: 2q + 2 passes of l columns, as for subspace iteration,
    for a (q + 1)-times larger search space. Directions a block does not add (an exhausted
    space: W of rank below the basis width) become random orthonormal ones, which do no harm.
    """
    blocks = [orthonormalize(sketch)]
    products = [_pass(A, blocks[0], transpose=True)]
    for step in range(n_iter):
        basis = torch.cat(blocks, dim=-1)
        room = min(A.shape[-2:]) - basis.shape[-1]  # the space cannot outgrow A's rank bound
        if room <= 0:
            break
        Y = _pass(A, orthonormalize(products[-1][..., :room]))
        blocks.append(orthonormal_extension(basis, Y, seed=step))
        products.append(_pass(A, blocks[-1], transpose=True))
    return torch.cat(blocks, dim=-1), torch.cat(products, dim=-1)


def _relative_error(W: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """‖W − U S Vh‖_F / ‖W‖_F for factors that project W: ‖W‖² − ‖S‖² (Pythagoras), in fp64."""
    total = frobenius_sq(W).double()
    residual = (total - S.double().square().sum(-1)).clamp(min=0)
    return (residual / total.clamp(min=torch.finfo(torch.float64).tiny)).sqrt().float()


def frobenius_sq(W: torch.Tensor) -> torch.Tensor:
    """‖W‖_F² [...] (fp32) from the one-pass norm kernel."""
    rows, _ = ops.op("row_col_sq_norms")(W)
    return rows.sum(-1)


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, W: torch.Tensor) -> PiSSAFactors:
    """A = U √S, B = √S Vh in W's dtype; W_res = W − A B formed in fp32 from the stored A, B."""
    root = S.clamp(min=0).sqrt()
    A = (U * root[..., None, :]).to(W.dtype)
    B = (root[..., :, None] * Vh).to(W.dtype)
    return PiSSAFactors(A, B, residual(W, A, B))


def residual(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``W − A B`` computed in fp32 and rounded once to W's dtype."""
    return addmm(W.float(), A.float(), B.float(), alpha=-1).to(W.dtype)


def pissa_factors(W: torch.Tensor, rank: int, *, exact: bool = False, **rsvd_options) -> PiSSAFactors:
    """PiSSA split of ``W [..., m, n]``: ``A [..., m, rank]``, ``B [..., rank, n]``, ``W_res``.

    exact=True uses the full SVD (torch.linalg.svd), otherwise `rsvd` with ``rsvd_options``.
    """
    W = check_matrix(W, finite=exact)  # rsvd checks on its first pass
    rank = check_rank(W, rank)
    if exact:
        U, S, Vh = per_matrix(torch.linalg.svd, W.float(), always=True, full_matrices=False)
        return _split(U[..., :rank], S[..., :rank], Vh[..., :rank, :], W)
    U, S, Vh, _ = rsvd(W, rank, **rsvd_options)
    return _split(U, S, Vh, W)


def random_pissa_factors(
    W: torch.Tensor, rank: int, *, n_random: int | None = None, generator: Generators = None
) -> PiSSAFactors:
    """Random PiSSA (seed report §3): the adapter gets the top ``rank − n_random`` singular
    triplets plus ``n_random`` triplets drawn uniformly without replacement from the remaining
    (minor) ones, so training can also move directions the pretrained weight barely uses; the
    residual keeps everything else. Default n_random = rank // 2. Needs the full SVD.
    """
    W = check_matrix(W)
    rank = check_rank(W, rank)
    n_random = rank // 2 if n_random is None else check_int(n_random, "n_random", 0, rank)
    generators = matrix_generators(generator, W.shape[:-2])
    U, S, Vh = per_matrix(torch.linalg.svd, W.float(), always=True, full_matrices=False)
    top = rank - n_random
    minor = S.shape[-1] - top  # >= n_random since rank <= min(m, n)
    # Drawn matrix by matrix: with one shared generator the same numbers as one batch-wide draw.
    keys = torch.stack([torch.rand(minor, generator=g, device=draw_device(g)) for g in generators])
    keys = keys.reshape(*S.shape[:-1], minor).to(S.device)
    picked = top + keys.topk(n_random, dim=-1).indices.sort(dim=-1).values
    index = torch.cat([torch.arange(top, device=S.device).expand(*S.shape[:-1], top), picked], dim=-1)
    U = U.gather(-1, index[..., None, :].expand(*U.shape[:-1], rank))
    Vh = Vh.gather(-2, index[..., :, None].expand(*index.shape, Vh.shape[-1]))
    return _split(U, S.gather(-1, index), Vh, W)
