"""Reference for the Robust PiSSA kernel: the Huber terms in fp64 from their definition."""

from __future__ import annotations

import torch


def huber_weights_ref(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weight_delta: torch.Tensor, loss_delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w [..., m, n]``, ``a [..., m, r]``, ``b [..., r, n]``, per-matrix deltas ``[...]`` ->
    fp32 ``ω(E)``, ``ψ(E)`` ``[..., m, n]`` at weight_delta and fp64 ``[Σ ρ(E) at loss_delta,
    Σ |E|] [..., 2]`` for E = a b − w (formulas: csrc/include/lowrank_kernels/huber_math.h)."""
    E = a.double() @ b.double() - w.double()
    magnitude = E.abs()
    dw = weight_delta.double()[..., None, None]
    dl = loss_delta.double()[..., None, None]
    omega = torch.where(magnitude <= dw, torch.ones_like(E), dw / magnitude)
    psi = torch.minimum(torch.maximum(E, -dw), dw)
    loss = torch.where(magnitude <= dl, 0.5 * E * E, dl * (magnitude - 0.5 * dl))
    stats = torch.stack([loss.sum(dim=(-2, -1)), magnitude.sum(dim=(-2, -1))], dim=-1)
    return omega.float(), psi.float(), stats


def huber_normal_equations_ref(w, a, b, weight_delta, loss_delta):
    """fp64 ``G [..., n, r, r]`` (G_j = Σ_i ω(E_ij) a_i a_iᵀ), ``g [..., n, r]`` (g_j = Σ_i ψ(E_ij) a_i)
    and the stats of `huber_weights_ref`, for E = a b − w."""
    E = a.double() @ b.double() - w.double()
    dw = weight_delta.double()[..., None, None]
    omega = dw / torch.maximum(E.abs(), dw)
    psi = torch.minimum(torch.maximum(E, -dw), dw)
    A = a.double()
    gram = torch.einsum("...ij,...ik,...il->...jkl", omega, A, A)
    return gram, psi.mT @ A, huber_weights_ref(w, a, b, weight_delta, loss_delta)[2]
