"""Decompositions for PiSSA-family initialisation: randomized SVD, CUR, Random PiSSA.

Every function takes ``W [..., m, n]`` (fp32/bf16/fp16, leading dims = a batch of same-shape
layers decomposed at once) and is deterministic for a given ``torch.Generator``.

* `rsvd`: Halko-Martinsson-Tropp randomized SVD with oversampling and power (subspace)
  iterations, or block Krylov. The passes over W are GEMMs in W's dtype (fp32 accumulation);
  the thin blocks are orthonormalised in fp32 by CholeskyQR2 (Gram matrix by the `gram` kernel,
  shifted CholeskyQR3 when the block is ill-conditioned, Householder QR as the last resort);
  the small SVD runs in fp32/fp64.
* `pissa_factors`: ``A = U √S``, ``B = √S Vh``, ``W_res = W − A B`` (DESIGN.md §2).
* `cur`: rows and columns sampled without replacement with probability ∝ their squared norms
  (exponential race, exact), norms from one pass over W (`row_col_sq_norms` kernel), and a
  choice of the core ``U``; `cur_factors` gives the PiSSA-style split ``A = C``, ``B = U R``.
* `random_pissa_factors` (seed report §3): principal components plus randomly chosen minor ones.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Union

import torch

from lowrank_kernels import ops
from lowrank_kernels.batch_invariant import (
    addmm,
    matmul,
    matmul_per_matrix,
    matrix_layout,
    per_matrix,
    skinny_product,
)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_METHODS = ("subspace", "krylov")
_CUR_CORES = ("pinv", "stable", "optimal")

#: Randomness of a (batched) decomposition: one generator shared by the batch's matrices (drawn
#: from matrix after matrix; None = torch's default), or one generator per matrix.
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


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


class CURResult(NamedTuple):
    """``C = W[..., :, cols] [..., m, r]``, ``U [..., r, r]`` (fp32), ``R = W[..., rows, :] [..., r, n]``,
    ``rows [..., r]``, ``cols [..., r]`` (int64); W ≈ C U R."""

    C: torch.Tensor
    U: torch.Tensor
    R: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


# ---- argument checks -------------------------------------------------------------------------------

def _check_matrix(W: Any, finite: bool = True) -> torch.Tensor:
    """W as a float matrix or batch; ``finite=False`` leaves the NaN/Inf scan to the caller (rsvd
    does it on its first sketch instead of a separate pass over W)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"W must be float32, float16 or bfloat16, got {_describe(W)}")
    if W.dim() < 2:
        raise ValueError(f"W must be a matrix [m, n] or a batch [..., m, n], got {_describe(W)}")
    if W.shape[-1] == 0 or W.shape[-2] == 0:
        raise ValueError(f"W must have m, n >= 1, got {_describe(W)}")
    if W.numel() == 0:
        raise ValueError(f"W's batch holds no matrices, got {_describe(W)}")
    # One cheap reduction: a NaN or Inf element makes the sum non-finite (so does an overflowing
    # sum of huge finite values, which the exact elementwise check then clears).
    if finite and not torch.isfinite(W.sum(dtype=torch.float32)):
        _check_finite(W)
    return W


def _check_finite(W: torch.Tensor) -> None:
    """The exact elementwise scan, after a cheap reduction came out non-finite (a huge but finite
    W can overflow a sum, and passes)."""
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"W contains NaN or Inf ({_describe(W)})")


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_rank(W: torch.Tensor, rank: Any) -> int:
    return _check_int(rank, "rank", 1, min(W.shape[-2:]))


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _matrix_generators(generator: Any, batch: tuple[int, ...]) -> list[torch.Generator | None]:
    """One generator per matrix of the batch (row-major over the leading dims). A sequence gives
    every matrix its own stream, so a matrix's draws do not depend on its batch-mates (per-layer
    seeds for model conversion); a single generator or None is shared, matrix after matrix."""
    count = math.prod(batch)
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * count
    generators = list(generator) if isinstance(generator, Sequence) else None
    if generators is None or len(generators) != count or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(f"generator must be a torch.Generator, None or a sequence of {count} torch.Generators "
                         f"(one per matrix of batch {tuple(batch)}), got {generator!r}")
    return generators


def _draw_device(generator: torch.Generator | None) -> torch.device:
    """Random numbers are drawn on the generator's device (CPU by default), so a seed gives the
    same numbers whatever device W is on."""
    return generator.device if generator is not None else torch.device("cpu")


# ---- orthonormalisation --------------------------------------------------------------------------

def _gram(Y: torch.Tensor) -> torch.Tensor:
    """fp32 ``Yᵀ Y [..., k, k]`` of ``Y [..., m, k]`` (exactly symmetric)."""
    return ops.op("gram")(Y)


def _cholesky_qr(Y: torch.Tensor, shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One CholeskyQR step on fp32 ``Y``: (Q, ok [...]) with Q = Y R⁻¹, R = chol(YᵀY (+ shift)).
    The shift (Fukaya et al. 2020) makes the factorisation succeed for any full-rank-in-fp32
    block at the cost of orthogonality, which the following unshifted steps restore."""
    G = _gram(Y)
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


def _power_of_two_scale(X: torch.Tensor) -> torch.Tensor:
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
    Y = Y / _power_of_two_scale(Y)
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
    theta, V = per_matrix(torch.linalg.eigh, _gram(X).double(), always=True)
    sigma = theta.clamp(min=0).sqrt()
    collapsed = sigma <= floor[..., 0, :].double()
    inverse = torch.where(collapsed, torch.zeros_like(sigma), 1 / sigma.clamp(min=torch.finfo(torch.float64).tiny))
    return matmul(X, (V * inverse[..., None, :]).float()), collapsed


def _orthonormal_extension(basis: torch.Tensor, Y: torch.Tensor, seed: int) -> torch.Tensor:
    """Orthonormal ``Q [..., M, l]`` orthogonal to the orthonormal ``basis [..., M, k]``, spanning
    the part of ``Y [..., M, l]`` outside it; where Y has no such part (an exhausted Krylov space,
    a rank-deficient or zero W), random directions orthogonalised like the rest.

    Per sweep: one Gram-Schmidt pass, SVQB (noise directions replaced by random ones), then the
    check, whose overlap ``basisᵀ Q`` is the next sweep's Gram-Schmidt coefficients. Sweeps
    repeat, per matrix, until the block is orthonormal and orthogonal to the basis: a healthy
    block costs what one Gram-Schmidt pass and one orthonormalisation do.
    """
    X = Y / _power_of_two_scale(Y)
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
        accepted = ((overlap.abs().amax(dim=(-2, -1)) <= _ORTHONORMAL_WITHIN)
                    & ((_gram(X) - eye).abs().amax(dim=(-2, -1)) <= _ORTHONORMAL_WITHIN) & ~collapsed.any(-1))
        pending = pending & ~accepted
        if not bool(pending.any()):
            break
        floor = torch.full_like(floor, _COLLAPSED_BELOW)  # X's columns now have unit norm
    return X


# ---- randomized SVD ------------------------------------------------------------------------------

def _default_oversample(rank: int, max_width: int, method: str) -> int:
    """p = max(8, r/4) for subspace iteration; max(8, r/8) for block Krylov, whose search space is
    already (q + 1)(r + p) wide (Musco & Musco: block size r suffices; a little extra width
    still buys accuracy per pass)."""
    return max(0, min(max(8, rank // (8 if method == "krylov" else 4)), max_width - rank))


def _sketch_width(rank: int, oversample: Any, block_size: Any, n_iter: int, method: str, width_cap: int) -> int:
    """Columns of the sketch (= of each Krylov block)."""
    if block_size is None:
        oversample = (_default_oversample(rank, width_cap, method) if oversample is None
                      else _check_int(oversample, "oversample", 0))
        return min(rank + oversample, width_cap)
    if method != "krylov" or oversample is not None:
        raise ValueError(f"block_size is an alternative to oversample for method='krylov'; got method={method!r}, "
                         f"oversample={oversample!r}")
    # Capped like rank + oversample, so one setting serves layers of every shape.
    width = min(_check_int(block_size, "block_size", 1), width_cap)
    if (n_iter + 1) * width < rank:
        raise ValueError(f"the Krylov space of n_iter={n_iter} and block_size={block_size}, "
                         f"(n_iter + 1)·block_size = {(n_iter + 1) * width} columns, must hold rank = {rank}: "
                         f"raise block_size or n_iter")
    return width


def rsvd(W: torch.Tensor, rank: int, *, oversample: int | None = None, n_iter: int = 2, method: str = "krylov",
         block_size: int | None = None, generator: Generators = None, error: bool = False) -> SVDResult:
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
    W = _check_matrix(W, finite=False)  # checked on the first pass below
    rank = _check_rank(W, rank)
    method = _check_choice(method, "method", _METHODS)
    n_iter = _check_int(n_iter, "n_iter", 0)
    generators = _matrix_generators(generator, W.shape[:-2])
    m, n = W.shape[-2:]
    width_cap = min(m, n)
    width = _sketch_width(rank, oversample, block_size, n_iter, method, width_cap)
    transpose = m < n  # sketch the longer side: every GEMM then has the short side as its output rows
    A = W.mT if transpose else W  # [..., M, N] with M >= N
    sketch = _pass(A, _gaussian((*A.shape[:-2], A.shape[-1], width), generators, A))
    # W's NaN/Inf check rides on the first pass: a non-finite element of W makes its rows of the
    # sketch non-finite (the Gaussian Ω has no zeros, almost surely); only then is W scanned.
    if not bool(torch.isfinite(sketch).all()):
        _check_finite(W)
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
    return ValueError(f"W is too large for fp32 arithmetic (max |W| = {W.abs().max().item():.3g}, "
                      f"{_describe(W)}): scale it down")


def _top_svd(Bt: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``rank`` singular triplets of the small projected matrix ``Bᵀ = Bt [..., N, c]``
    (fp32): ``(Uh [..., c, rank], S [..., rank], V [..., N, rank])`` with B = Uh S Vᵀ.

    Rayleigh-Ritz on the c×c Gram matrix in fp64 (eigh) instead of an SVD of the tall Bt,
    which costs several times more; V = Bt Uh S⁻¹ is then re-orthonormalised, which also turns
    the columns of (numerically) zero singular values into valid orthonormal directions.
    """
    scale = _power_of_two_scale(Bt)  # exact: keeps the fp32 Gram of a tiny W out of underflow
    G = _gram(Bt / scale).double()
    eigenvalues, vectors = per_matrix(torch.linalg.eigh, G, always=True)  # ascending
    top = vectors[..., -rank:].flip(-1)
    S = eigenvalues[..., -rank:].flip(-1).clamp(min=0).sqrt().float() * scale[..., 0]
    V = orthonormalize(matmul(Bt, top.float()))
    return top.float(), S, V


def _gaussian(shape: tuple[int, ...], generators: list[torch.Generator | None], like: torch.Tensor) -> torch.Tensor:
    """Standard normal test matrix ``[..., N, l]`` drawn in fp32 on the generators' device, one
    batch element after the other from its generator (so a batch sees the same draws as a loop
    over its matrices with the same generator), then moved to W's device and dtype."""
    draws = [torch.randn(shape[-2:], generator=g, device=_draw_device(g)) for g in generators]
    return torch.stack(draws).reshape(shape).to(like.device, like.dtype)


# The skinny_matmul kernel beats MKL on this CPU (4096², 2 threads) for bf16/fp16 W (MKL has no
# fast mixed-precision GEMM: 1.7-7x), and for fp32 W up to these widths of X: W @ X 1.7x at 16-24
# columns, 1.1x at 64; Wᵀ @ X 1.3-1.4x at 16-24 columns, 1.15x at 32, a loss from ~48 on.
_SKINNY_FP32_MAX_COLUMNS = 64
_SKINNY_FP32_MAX_COLUMNS_TRANSPOSED = 32


def _pass(A: torch.Tensor, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """One pass over the big matrix: ``A @ X`` (or ``Aᵀ @ X``) in fp32 for ``A [..., M, N]`` in its
    own dtype and a thin ``X``. On CPU, by the `skinny_matmul` kernel where it is the faster
    GEMM, reading A in place whichever way its matrices are stored (A is often a transposed view
    of W; the choice follows each matrix's layout, not the batch's, so that a batch takes the
    path its matrices take alone)."""
    A = A.mT if transpose else A
    layout = matrix_layout(A) if A.device.type == "cpu" else None
    if layout is not None:
        widest = _SKINNY_FP32_MAX_COLUMNS_TRANSPOSED if layout == "column" else _SKINNY_FP32_MAX_COLUMNS
        if A.dtype != torch.float32 or X.shape[-1] <= widest:
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
        blocks.append(_orthonormal_extension(basis, Y, seed=step))
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
    W = _check_matrix(W, finite=exact)  # rsvd checks on its first pass
    rank = _check_rank(W, rank)
    if exact:
        U, S, Vh = per_matrix(torch.linalg.svd, W.float(), always=True, full_matrices=False)
        return _split(U[..., :rank], S[..., :rank], Vh[..., :rank, :], W)
    U, S, Vh, _ = rsvd(W, rank, **rsvd_options)
    return _split(U, S, Vh, W)


def random_pissa_factors(W: torch.Tensor, rank: int, *, n_random: int | None = None,
                         generator: Generators = None) -> PiSSAFactors:
    """Random PiSSA (seed report §3): the adapter gets the top ``rank − n_random`` singular
    triplets plus ``n_random`` triplets drawn uniformly without replacement from the remaining
    (minor) ones, so training can also move directions the pretrained weight barely uses; the
    residual keeps everything else. Default n_random = rank // 2. Needs the full SVD.
    """
    W = _check_matrix(W)
    rank = _check_rank(W, rank)
    n_random = rank // 2 if n_random is None else _check_int(n_random, "n_random", 0, rank)
    generators = _matrix_generators(generator, W.shape[:-2])
    U, S, Vh = per_matrix(torch.linalg.svd, W.float(), always=True, full_matrices=False)
    top = rank - n_random
    minor = S.shape[-1] - top  # >= n_random since rank <= min(m, n)
    # Drawn matrix by matrix: with one shared generator the same numbers as one batch-wide draw.
    keys = torch.stack([torch.rand(minor, generator=g, device=_draw_device(g)) for g in generators])
    keys = keys.reshape(*S.shape[:-1], minor).to(S.device)
    picked = top + keys.topk(n_random, dim=-1).indices.sort(dim=-1).values
    index = torch.cat([torch.arange(top, device=S.device).expand(*S.shape[:-1], top), picked], dim=-1)
    U = U.gather(-1, index[..., None, :].expand(*U.shape[:-1], rank))
    Vh = Vh.gather(-2, index[..., :, None].expand(*index.shape, Vh.shape[-1]))
    return _split(U, S.gather(-1, index), Vh, W)


# ---- CUR -----------------------------------------------------------------------------------------

def sample_proportional(weights: torch.Tensor, k: int, uniform: torch.Tensor) -> torch.Tensor:
    """``k`` distinct indices per row of ``weights [..., N]`` (non-negative), drawn without
    replacement with probability ∝ weight by the exponential race: the k smallest arrival
    times E_i / w_i, E_i = −log(1 − U_i) ~ Exp(1) from ``uniform [..., N]`` (fp64, U(0, 1)),
    which is exactly successive weighted sampling. Zero-weight indices come after all positive
    ones, in uniformly random order (so an all-zero row still gives k distinct indices).
    Returns int64 ``[..., k]``, ascending."""
    w = weights.double()
    # Arrival times are < 37 / (smallest positive fp32) < 1e47; zero weights queue from 2e300 on.
    arrival = torch.where(w > 0, -torch.log1p(-uniform) / w.clamp(min=torch.finfo(torch.float64).tiny),
                          2e300 * (1 + uniform))
    return arrival.topk(k, dim=-1, largest=False).indices.sort(dim=-1).values


def _uniforms(batch: tuple[int, ...], sizes: tuple[int, ...], generator: Generators, device) -> list[torch.Tensor]:
    """fp64 U(0, 1) draws ``[*batch, size]`` for each size, drawn matrix by matrix from its
    generator (a batch sees the same draws as a loop over its matrices with the same generator)."""
    per_matrix = [[torch.rand(size, generator=g, device=_draw_device(g), dtype=torch.float64) for size in sizes]
                  for g in _matrix_generators(generator, batch)]
    return [torch.stack([draws[j] for draws in per_matrix]).reshape(*batch, size).to(device)
            for j, size in enumerate(sizes)]


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
    W = _check_matrix(W)
    rank = _check_rank(W, rank)
    u = _check_choice(u, "u", _CUR_CORES)
    row_norms, col_norms = ops.op("row_col_sq_norms")(W)
    row_uniform, col_uniform = _uniforms(W.shape[:-2], W.shape[-2:], generator, W.device)
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
