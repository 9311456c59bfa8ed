"""One entry point from an init name to a PiSSA split, shared by PiSSALinear, convert_model and
the PEFT bridge, so every adapter path accepts the same names with the same meaning."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowrank_kernels import decompose
from lowrank_kernels.decompose import PiSSAFactors


def _exact_svd(W: torch.Tensor, rank: int, **options) -> PiSSAFactors:
    return decompose.pissa_factors(W, rank, exact=True, **options)


#: IRLS sweeps of the robust init unless asked otherwise: on MiniLM the ℓ1 fit gains < 0.1 % MAE
#: between sweep 20 and sweep 100 (measured), far less than fine-tuning moves the adapter.
ROBUST_INIT_SWEEPS = 30


def _robust(W: torch.Tensor, rank: int, **options) -> PiSSAFactors:
    from lowrank_kernels import robust  # imported on use: the Huber solver is the heaviest init

    options.setdefault("n_iter", ROBUST_INIT_SWEEPS)
    return robust.robust_pissa_factors(W, rank, **options)


def _cur(W: torch.Tensor, rank: int, **options) -> PiSSAFactors:
    # The Frobenius-optimal core C⁺ W R⁺ by default: the seed report's pinv(W[I, J]) core (u="pinv")
    # can leave a residual larger than W itself (7× ‖W‖ on a MiniLM query at rank 16), which then
    # dominates the NF4 quantization error of a QPiSSA residual.
    options.setdefault("u", "optimal")
    return decompose.cur_factors(W, rank, **options)


#: init name -> function(W [..., m, n], rank, **options) -> PiSSAFactors (A [..., m, r], B [..., r, n], W_res).
INITS: dict[str, Callable[..., PiSSAFactors]] = {
    "svd": _exact_svd,  # exact truncated SVD (PiSSA paper)
    "rsvd": decompose.pissa_factors,  # randomized SVD (fast PiSSA)
    "cur": _cur,  # CURA: norm-proportional CUR (core C⁺WR⁺)
    "robust": _robust,  # Robust PiSSA: Huber / ℓ1 low-rank factorization
    "random": decompose.random_pissa_factors,  # Random PiSSA: principal + random minor components
}


def check_init(init: object) -> str:
    """Return ``init`` if it names a known init, else raise ValueError listing the names."""
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
    return init


def init_factors(W: torch.Tensor, rank: int, init: str, **options) -> PiSSAFactors:
    """PiSSA split ``W = W_res + A B`` of ``W [..., m, n]`` (fp32/bf16/fp16; leading dims = a batch
    of same-shape layers) by the named init: ``A [..., m, rank]``, ``B [..., rank, n]``,
    ``W_res [..., m, n]`` in W's dtype. ``options`` go to the init's function (e.g. ``generator``)."""
    return INITS[check_init(init)](W, rank, **options)
