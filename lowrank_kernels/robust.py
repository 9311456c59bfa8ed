"""Robust PiSSA: low-rank factorization in (nearly) the ℓ1 norm, ``min_{A,B} Σ huber_δ(A B − W)``.

Every function takes ``W [..., m, n]`` (fp32/bf16/fp16; leading dims = a batch of same-shape
layers factorized at once; each matrix has its own δ, step sizes and stopping point, so a
batch gives the per-matrix results) and is deterministic for a given ``torch.Generator``.

* ``method="irls"`` (default): iteratively reweighted least squares, a majorize-minimize method.
  Each Huber term is bounded above by the quadratic with weight ω = ρ'(e)/e = min(1, δ/|e|)
  touching it at the current residual, so minimising the weighted least squares exactly over A
  (B fixed: one r×r solve per row of W, all rows batched) and then over B never increases the
  loss. A sweep = A step + B step, each one read of W by the fused `huber_normal_equations`
  kernel (residual, ω, ψ and the r×r normal equations of every row/column; E = A B − W is never
  stored) and one batched `spd_solve`; two cheap `huber_loss` passes evaluate the candidates.
  On top of plain IRLS:
  - warm start from the truncated SVD (`rsvd`), or from the SVD of W with outliers clipped when
    that fits better (the ℓ1 problem's local minima: see `_initial_factors`);
  - δ continuation: the weights use δ_k = max(δ, δ₀ ρᵏ), starting at the initial mean |E|, so
    early sweeps move like least squares and later ones like ℓ1; a sweep that would raise the
    loss at the target δ is rejected and ends the continuation for that matrix;
  - extrapolation: after each sweep the step (A_k − A_{k−1}, B_k − B_{k−1}) is tried again
    with a growing factor β, kept only if it lowers the loss (β shrinks otherwise);
  - stopping when a sweep improves the loss by less than ``tol`` (relative), per matrix.
  The recorded loss is therefore non-increasing.
* ``method="adam"``: the seed report's Algorithm 1 (autograd Huber loss and Adam from a random
  start), kept as the reference baseline.

`robust_pissa_factors` gives the PiSSA split ``A [..., m, r]``, ``B [..., r, n]``,
``W_res = W − A B`` (ARCHITECTURE.md, notation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lowrank_kernels import ops
from lowrank_kernels._checks import check_matrix, check_rank, describe, is_int, is_real
from lowrank_kernels._random import Generators, draw_device, matrix_generators
from lowrank_kernels.decompose import PiSSAFactors, residual, rsvd

_METHODS = ("irls", "adam")
_INITS = ("svd", "random")
#: Default δ of a matrix: this fraction of its mean |W_ij| (1e-3 on MiniLM's weights, the seed's δ).
DEFAULT_RELATIVE_DELTA = 0.02
_DEFAULT_ITERS = {"irls": 100, "adam": 2000}
_ADAM_LR = 1e-2  # the seed's learning rate
_CONTINUATION_RATE = 0.7  # δ_k+1 = max(δ, 0.7 δ_k)
_EXTRAPOLATION_MAX = 8.0
#: A gather of the active matrices (copies of W and Wᵀ) costs about this many sweeps of them
#: (measured: 6-11 ms for 23 MiniLM 384² matrices against ~0.6 ms per matrix-sweep).
_GATHER_COST = 0.5


class HuberFactorization(NamedTuple):
    """``A [..., m, r]``, ``B [..., r, n]`` in W's dtype; with ``return_history``, the mean
    Huber loss and the mean absolute error |A B − W| per matrix after each iteration (iteration
    0 = the start), fp64 ``[iterations + 1, ...]``; matrices that stopped early repeat their
    last value."""

    A: torch.Tensor
    B: torch.Tensor
    loss_history: torch.Tensor | None = None
    mae_history: torch.Tensor | None = None


def huber_factorize(
    W: torch.Tensor,
    rank: int,
    *,
    delta: float | torch.Tensor | None = None,
    n_iter: int | None = None,
    method: str = "irls",
    init: str | None = None,
    tol: float = 1e-6,
    generator: Generators = None,
    return_history: bool = False,
) -> HuberFactorization:
    """Rank-``rank`` factorization ``W [..., m, n] ≈ A [..., m, r] B [..., r, n]`` minimising the
    Huber loss Σ ρ_δ(A B − W) (ρ_δ(e) = e²/2 for |e| <= δ, δ(|e| − δ/2) beyond: ℓ1 up to the
    factor δ for residuals larger than δ).

    delta:   δ > 0, a float or a tensor of the batch shape [...]; default 0.02 · mean |W| per matrix.
    n_iter:  maximum sweeps (irls, default 100) or Adam steps (adam, default 2000).
    method:  "irls" (default; see the module docstring) or "adam" (the seed's Algorithm 1, lr 1e-2).
    init:    "svd" (truncated SVD split, default for irls) or "random" (Gaussian A, B with
             A B of W's RMS, default for adam — the seed's random start).
    tol:     irls stops a matrix when a sweep lowers its loss by less than tol (relative).
    generator: one torch.Generator (shared by the batch, matrix after matrix) or one per matrix.
    """
    W = check_matrix(W)
    rank = check_rank(W, rank)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    init = {"irls": "svd", "adam": "random"}[method] if init is None else init
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    n_iter = _DEFAULT_ITERS[method] if n_iter is None else n_iter
    if not is_int(n_iter) or n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0, got {n_iter!r}")
    if not (isinstance(tol, (int, float)) and 0 <= tol < 1):
        raise ValueError(f"tol must be a float in [0, 1), got {tol!r}")
    deltas = _check_delta(delta, W)
    A, B = _initial_factors(W, rank, init, deltas, generator)
    if method == "irls":  # the kernel reads W in its own dtype
        A, B, loss, mae = _irls(W, A, B, deltas, n_iter, tol, return_history)
    else:
        A, B, loss, mae = _adam(W.float(), A, B, deltas, n_iter, return_history)
    return HuberFactorization(A.to(W.dtype), B.to(W.dtype), loss, mae)


def robust_pissa_factors(W: torch.Tensor, rank: int, **options) -> PiSSAFactors:
    """Robust PiSSA split of ``W [..., m, n]``: ``A [..., m, rank]``, ``B [..., rank, n]`` from
    `huber_factorize` (``options`` go to it) and ``W_res = W − A B`` (fp32, rounded once)."""
    A, B, _, _ = huber_factorize(W, rank, **options)
    return PiSSAFactors(A, B, residual(W, A, B))


# ---- arguments and starts --------------------------------------------------------------------------


def _check_delta(delta, W: torch.Tensor) -> torch.Tensor:
    """Per-matrix δ, fp32 [...]."""
    batch = W.shape[:-2]
    if delta is None:
        # Summed in fp64, rounded once to fp32: a matrix alone and in a batch get the same δ (the
        # fp64 sums differ, if at all, by far less than an fp32 rounding; fp32 means differed).
        mean_abs = (W.abs().sum(dim=(-2, -1), dtype=torch.float64) / (W.shape[-2] * W.shape[-1])).float()
        # An all-zero matrix has nothing to fit; any positive δ gives A B = 0 there.
        return torch.where(mean_abs > 0, DEFAULT_RELATIVE_DELTA * mean_abs, torch.ones_like(mean_abs))
    if isinstance(delta, torch.Tensor):
        if delta.shape not in (torch.Size([]), batch) or not delta.is_floating_point():
            raise ValueError(
                f"delta must be a float or a float tensor of W's batch shape {tuple(batch)}, got {describe(delta)}"
            )
        value = delta.to(device=W.device, dtype=torch.float32).expand(batch).contiguous()
    elif is_real(delta):
        value = torch.full(batch, float(delta), dtype=torch.float32, device=W.device)
    else:
        raise TypeError(f"delta must be a float or a tensor, got {type(delta).__name__}")
    if not bool(((value > 0) & torch.isfinite(value)).all()):
        raise ValueError(f"delta must be positive and finite, got {delta}")
    return value


def _initial_factors(
    W: torch.Tensor, rank: int, init: str, delta: torch.Tensor, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``A [..., m, r]``, ``B [..., r, n]``.

    "svd": per matrix, whichever split has the lower Huber loss of the truncated SVD of W and
    of W with its entries clipped at ±1.5·median |W|. The truncated SVD is a local minimum of
    the ℓ1 problem that a few outliers can pull away from the bulk (the seed report's 3×3
    example); the clipped matrix's SVD follows the bulk. "random": Gaussians scaled so that A B
    has W's RMS (entries of A B have variance r σ⁴), the seed's random start."""
    *batch, m, n = W.shape
    if init == "svd":
        limit = 1.5 * _median_magnitude(W)[..., None, None]
        clipped = torch.minimum(torch.maximum(W.float(), -limit), limit)
        # Both SVDs of a matrix sketch with the same test matrix, from a generator forked off the
        # matrix's own by one draw (matrix after matrix): a batch draws what a loop over it does.
        generators = matrix_generators(generator, tuple(batch))
        seeds = [_fork_seed(g) for g in generators]
        splits = [
            _svd_split(X, rank, [_new_generator(g, seed) for g, seed in zip(generators, seeds)]) for X in (W, clipped)
        ]
        losses = [_loss(W, A, B, delta).huber for A, B in splits]
        clipped_better = losses[1] < losses[0]
        return tuple(_pick(clipped_better, from_clipped, plain) for from_clipped, plain in zip(splits[1], splits[0]))
    rms = W.float().square().mean(dim=(-2, -1), keepdim=True).sqrt()
    sigma = (rms.square() / rank).sqrt().sqrt()
    # Drawn matrix by matrix, A then B, each from its matrix's generator: a batch starts where a
    # loop over its matrices would.
    draws = [
        (
            torch.randn(m, rank, generator=g, device=draw_device(g)),
            torch.randn(rank, n, generator=g, device=draw_device(g)),
        )
        for g in matrix_generators(generator, tuple(batch))
    ]
    A = torch.stack([a for a, _ in draws]).reshape(*batch, m, rank).to(W.device)
    B = torch.stack([b for _, b in draws]).reshape(*batch, rank, n).to(W.device)
    return A * sigma, B * sigma


def _fork_seed(generator: torch.Generator | None) -> int:
    """One 63-bit seed drawn from ``generator`` (torch's default generator for None)."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=draw_device(generator)))


def _new_generator(device_of: torch.Generator | None, seed: int) -> torch.Generator:
    """A new generator seeded with ``seed``, on the device ``device_of`` draws on."""
    return torch.Generator(device=draw_device(device_of)).manual_seed(seed)


def _median_magnitude(W: torch.Tensor, samples: int = 1 << 14) -> torch.Tensor:
    """Median of |W_ij| per matrix ``[...]``, from at most ``samples`` evenly strided entries
    (a robust scale estimate; an exact median of millions of entries costs more than the SVD)."""
    flat = W.flatten(-2)
    stride = max(1, flat.shape[-1] // samples)
    return flat[..., ::stride].float().abs().median(dim=-1).values


def _svd_split(W: torch.Tensor, rank: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh, _ = rsvd(W, rank, generator=generator)
    root = S.sqrt()
    return U * root[..., None, :], root[..., :, None] * Vh


# ---- IRLS --------------------------------------------------------------------------------------------


class _Loss(NamedTuple):
    """Σ ρ_δ(A B − W) and Σ |A B − W| per matrix, fp64 ``[b]``."""

    huber: torch.Tensor
    abs_sum: torch.Tensor


def _loss(W, A, B, delta) -> _Loss:
    stats = ops.op("huber_loss")(W, A, B, delta)
    return _Loss(stats[..., 0], stats[..., 1])


def _column_step(W, A, B, weight_delta, delta) -> torch.Tensor:
    """The exact IRLS update of ``B [b, r, n]`` with ``A [b, m, r]`` fixed: column j moves by
    −G_j⁻¹ g_j, G_j = Σ_i ω_ij a_i a_iᵀ, g_j = Σ_i ψ_ij a_i (the `huber_normal_equations` kernel,
    one read of W), solved by `spd_solve` (a ridge where G_j is singular keeps it a descent step).
    Returns the new B."""
    gram, grad, _ = ops.op("huber_normal_equations")(W, A, B, weight_delta, delta)
    return B - ops.op("spd_solve")(gram, grad).mT


def _sweep(W, Wt, A, B, weight_delta, delta) -> tuple[torch.Tensor, torch.Tensor]:
    """One IRLS sweep: the exact weighted-least-squares A (B fixed: the column step of the
    transposed problem ``Wt = Wᵀ``), then B with weights at the new A."""
    A = _column_step(Wt, B.mT, A.mT, weight_delta, delta).mT
    return A, _column_step(W, A, B, weight_delta, delta)


def _pick(mask: torch.Tensor, new, old):
    """Per matrix of the batch: ``new`` where ``mask [...]``, else ``old``."""
    return torch.where(mask.reshape(*mask.shape, *([1] * (new.dim() - mask.dim()))), new, old)


def _irls(W, A, B, delta, n_iter, tol, return_history):
    *batch, m, n = W.shape
    W, A, B, delta = (
        W.reshape(-1, m, n),
        A.reshape(-1, m, A.shape[-1]),
        B.reshape(-1, B.shape[-2], n),
        delta.reshape(-1),
    )
    Wt = W.mT.contiguous()  # the row step reads Wᵀ in the column kernel's order
    count = m * n
    loss = _loss(W, A, B, delta)
    # Continuation starts at the typical residual of the start (not below the target δ).
    weight_delta = torch.maximum(delta, (loss.abs_sum / count).float())
    beta = torch.ones_like(delta, dtype=torch.float64)
    # Converged matrices stop (masked) and the rest are gathered (`live`: their indices in the
    # batch) once the sweeps spent on stopped matrices since the last gather (`idle`) would have
    # paid for it: ski rental, so masking and gathering together cost at most twice the best
    # choice made knowing when each matrix stops.
    live = torch.arange(delta.shape[0], device=delta.device)
    idle = 0
    active = torch.ones_like(delta, dtype=torch.bool)
    A_out, B_out, history = A.clone(), B.clone(), [loss]
    for _ in range(n_iter):
        A1, B1 = _sweep(W, Wt, A, B, weight_delta, delta)
        new = _loss(W, A1, B1, delta)
        # Extrapolate along the sweep's own step; keep it only where it lowers the loss.
        step = beta.float().view(-1, 1, 1)
        Ae, Be = A1 + step * (A1 - A), B1 + step * (B1 - B)
        tried = _loss(W, Ae, Be, delta)
        better = tried.huber < new.huber
        A1, B1 = _pick(better, Ae, A1), _pick(better, Be, B1)
        new = _Loss(*(_pick(better, t, v) for t, v in zip(tried, new)))
        beta = torch.where(better, (beta * 1.5).clamp(max=_EXTRAPOLATION_MAX), (beta / 2).clamp(min=1.0))
        # A sweep that raised the target loss (possible while δ_k > δ, or by rounding) is undone;
        # the matrix then goes on at the target δ, or stops if it was already there.
        rejected = new.huber > loss.huber
        gain = (loss.huber - new.huber) / loss.huber.clamp(min=torch.finfo(torch.float64).tiny)
        accept = active & ~rejected
        converged = active & (weight_delta <= delta) & (rejected | (gain <= tol))
        A, B = _pick(accept, A1, A), _pick(accept, B1, B)
        loss = _Loss(*(_pick(accept, v, o) for v, o in zip(new, loss)))
        weight_delta = torch.where(rejected, delta, torch.maximum(delta, _CONTINUATION_RATE * weight_delta))
        active = active & ~converged
        if return_history:
            history.append(_Loss(*(h.index_copy(0, live, v) for h, v in zip(history[-1], loss))))
        remaining = int(active.sum())
        if remaining == 0:
            break
        idle += live.numel() - remaining
        if idle >= _GATHER_COST * remaining:
            idle = 0
            A_out[live], B_out[live] = A, B
            keep = active.nonzero().squeeze(1)
            Wt = None  # rebuilt from the gathered W: a smaller peak than gathering both
            live, W, A, B, delta, weight_delta, beta, active = (
                t[keep] for t in (live, W, A, B, delta, weight_delta, beta, active)
            )
            loss = _Loss(*(v[keep] for v in loss))
            Wt = W.mT.contiguous()
    A_out[live], B_out[live] = A, B
    return A_out.reshape(*batch, m, -1), B_out.reshape(*batch, -1, n), *_history(history, batch, count, return_history)


def _history(history, batch, count, wanted):
    if not wanted:
        return None, None
    loss = torch.stack([h.huber for h in history]).reshape(len(history), *batch) / count
    mae = torch.stack([h.abs_sum for h in history]).reshape(len(history), *batch) / count
    return loss, mae


# ---- the seed's Algorithm 1 ------------------------------------------------------------------------


def _adam(W, A, B, delta, n_iter, return_history):
    """Algorithm 1 of the seed report: Adam (lr 1e-2) on ``torch.nn.functional.huber_loss`` (mean)
    from the given start, as the seed runs it. In a batch the objective is the sum of the
    per-matrix losses, each at its own δ, so each matrix sees exactly its own gradient (Adam's
    update is elementwise)."""
    *batch, m, n = W.shape
    W3 = W.reshape(-1, m, n)
    A = A.reshape(-1, m, A.shape[-1]).clone().requires_grad_()
    B = B.reshape(-1, B.shape[-2], n).clone().requires_grad_()
    deltas = delta.reshape(-1).tolist()
    optimizer = torch.optim.Adam([A, B], lr=_ADAM_LR)
    history = []
    for step in range(n_iter + 1):
        fit = A @ B
        losses = [torch.nn.functional.huber_loss(fit[i], W3[i], delta=d) for i, d in enumerate(deltas)]
        if return_history:
            E = (fit - W3).detach()
            history.append(_Loss(torch.stack(losses).detach().double() * (m * n), E.abs().sum(dim=(-2, -1)).double()))
        if step == n_iter:
            break
        optimizer.zero_grad(set_to_none=True)
        sum(losses).backward()
        optimizer.step()
    A, B = A.detach().reshape(*batch, m, -1), B.detach().reshape(*batch, -1, n)
    return A, B, *_history(history, tuple(batch), m * n, return_history)
