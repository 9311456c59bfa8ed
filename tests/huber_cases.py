"""Shared checks of a huber_weights implementation (C++ op or Triton) against the fp64 reference,
under a rigorous bound for the fp32 residual."""

from __future__ import annotations

import torch

from lowrank_kernels.reference import huber_weights_ref

U32 = 2.0**-24  # unit roundoff of fp32

# (batch, m, n, r): one element, rows that are no multiple of the 4-row groups, columns that are
# no multiple of the 8-wide vectors or the 128-column flush, several Triton tiles, ranks 1..17.
CASES = [((), 1, 1, 1), ((), 5, 7, 3), ((), 37, 29, 8), ((3,), 17, 130, 2), ((2, 2), 9, 40, 17), ((), 64, 257, 5)]


def make_inputs(batch, m, n, r, dtype, device="cpu", seed=0):
    """W with a few large entries, A B close to W (residuals both inside and outside δ), and
    per-matrix deltas that differ."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, m, r, generator=g)
    B = torch.randn(*batch, r, n, generator=g) / r**0.5
    W = (A @ B + 0.3 * torch.randn(*batch, m, n, generator=g)).to(dtype)
    W.view(-1)[:: max(1, W.numel() // 7)] *= 20
    weight_delta = torch.rand(batch, generator=g) * 0.5 + 0.05
    loss_delta = torch.rand(batch, generator=g) * 0.5 + 0.05
    return [t.to(device) for t in (W, A, B, weight_delta, loss_delta)]


def _monotone_bounds(f, lo, hi):
    a, b = f(lo), f(hi)
    return torch.minimum(a, b), torch.maximum(a, b)


def assert_matches_reference(got, W, A, B, weight_delta, loss_delta):
    """ω, ψ within what an fp32 residual error ε_ij allows (both are monotone in e, so the exact
    function of e ± ε brackets them), sums within Σ |ψ|ε + accumulation rounding."""
    omega, psi, stats = (t.cpu() for t in got)
    W, A, B, weight_delta, loss_delta = (t.cpu() for t in (W, A, B, weight_delta, loss_delta))
    assert omega.dtype == psi.dtype == torch.float32 and stats.dtype == torch.float64
    assert omega.shape == psi.shape == W.shape and stats.shape == (*W.shape[:-2], 2)
    E = A.double() @ B.double() - W.double()
    r = A.shape[-1]
    eps = (r + 2) * U32 * ((A.double().abs() @ B.double().abs()) + W.double().abs())
    dw = weight_delta.double()[..., None, None]

    def weight(e):
        return torch.where(e.abs() <= dw, torch.ones_like(e), dw / e.abs())

    def clamp(e):
        return torch.minimum(torch.maximum(e, -dw), dw)

    lo, hi = _monotone_bounds(weight, E.abs() + eps, (E.abs() - eps).clamp(min=0))
    assert ((omega.double() >= lo * (1 - 2 * U32)) & (omega.double() <= hi * (1 + 2 * U32))).all()
    lo, hi = _monotone_bounds(clamp, E - eps, E + eps)
    assert ((psi.double() >= lo - U32 * lo.abs()) & (psi.double() <= hi + U32 * hi.abs())).all()
    _, _, ref = huber_weights_ref(W, A, B, weight_delta, loss_delta)
    slope = torch.minimum(E.abs() + eps, loss_delta.double()[..., None, None])
    loss_bound = (slope * eps).sum((-2, -1)) + 64 * U32 * ref[..., 0]
    abs_bound = eps.sum((-2, -1)) + 64 * U32 * ref[..., 1]
    assert ((stats[..., 0] - ref[..., 0]).abs() <= loss_bound).all()
    assert ((stats[..., 1] - ref[..., 1]).abs() <= abs_bound).all()


def assert_normal_equations_match(got, W, A, B, weight_delta, loss_delta):
    """G_j = Σ_i ω_ij a_i a_iᵀ and g_j = Σ_i ψ_ij a_i within what the ω, ψ brackets of
    `assert_matches_reference` allow plus fp32 accumulation (m + 2 roundings per term)."""
    from lowrank_kernels.reference import huber_normal_equations_ref

    gram, grad, stats = (t.cpu() for t in got)
    W, A, B, weight_delta, loss_delta = (t.cpu() for t in (W, A, B, weight_delta, loss_delta))
    ref_gram, ref_grad, ref_stats = huber_normal_equations_ref(W, A, B, weight_delta, loss_delta)
    assert gram.dtype == grad.dtype == torch.float32 and gram.shape == ref_gram.shape and grad.shape == ref_grad.shape
    E = A.double() @ B.double() - W.double()
    m, r = A.shape[-2], A.shape[-1]
    eps = (r + 2) * U32 * ((A.double().abs() @ B.double().abs()) + W.double().abs())
    dw = weight_delta.double()[..., None, None]
    omega_spread = (dw / torch.maximum((E.abs() - eps).clamp(min=0), dw)) - dw / torch.maximum(E.abs() + eps, dw)
    Aa = A.double().abs()
    rounding = (m + 2) * U32
    gram_bound = torch.einsum("...ij,...ik,...il->...jkl", omega_spread + rounding, Aa, Aa)
    grad_bound = (eps + rounding * dw).mT @ Aa
    assert ((gram.double() - ref_gram).abs() <= gram_bound).all()
    assert ((grad.double() - ref_grad).abs() <= grad_bound).all()
    assert torch.allclose(stats, ref_stats, rtol=1e-5)
