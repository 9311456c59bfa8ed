"""Decompositions for PiSSA-family initialisation: randomized SVD, CUR, Random PiSSA.

Every function takes ``W [..., m, n]`` (fp32/bf16/fp16, leading dims = a batch of same-shape
layers decomposed at once) and is deterministic for a given ``torch.Generator``.

* `rsvd`: Halko-Martinsson-Tropp randomized SVD with oversampling and power (subspace)
  iterations, or block Krylov. The passes over W are GEMMs in W's dtype (fp32 accumulation);
  the thin blocks are orthonormalised in fp32 by CholeskyQR2 (Gram matrix by the `gram` kernel,
  shifted CholeskyQR3 when the block is ill-conditioned, Householder QR as the last resort);
  the small SVD runs in fp32/fp64.
* `pissa_factors`: ``A = U √S``, ``B = √S Vh``, ``W_res = W − A B`` (ARCHITECTURE.md, notation).
* `cur`: rows and columns sampled without replacement with probability ∝ their squared norms
  (exponential race, exact), norms from one pass over W (`row_col_sq_norms` kernel), and a
  choice of the core ``U``; `cur_factors` gives the PiSSA-style split ``A = C``, ``B = U R``.
* `random_pissa_factors` (seed report §3): principal components plus randomly chosen minor ones.
"""

from lowrank_kernels._random import Generators
from lowrank_kernels.decompose._cur import (
    CURResult,
    cur,
    cur_factors,
    sample_proportional,
)
from lowrank_kernels.decompose._orthonormal import orthonormalize
from lowrank_kernels.decompose._rsvd import (
    PiSSAFactors,
    SVDResult,
    frobenius_sq,
    pissa_factors,
    random_pissa_factors,
    residual,
    rsvd,
)

__all__ = [
    "CURResult",
    "Generators",
    "PiSSAFactors",
    "SVDResult",
    "cur",
    "cur_factors",
    "frobenius_sq",
    "orthonormalize",
    "pissa_factors",
    "random_pissa_factors",
    "residual",
    "rsvd",
    "sample_proportional",
]
