"""QPiSSA / LoftQ and the quantization error metrics: metrics against fp64 SVD references, the
alternation against a literal reference loop, batching with per-matrix generators, and the
PiSSA paper's orderings on the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import statistics

import pytest
import torch

from lowrank_kernels import quantize_nf4
from lowrank_kernels.adapters import (
    error_metrics,
    loftq_factors,
    nuclear_norm,
    qpissa_factors,
    quantization_error_reduction,
    reconstruction_error,
)
from lowrank_kernels.bench._minilm import minilm_linear_weights
from lowrank_kernels.reference import dequantize_nf4_ref


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def weights(m=96, n=160, batch=(), seed=0):
    """Decaying spectrum plus noise, like trained weights: ``[*batch, m, n]`` fp32."""
    g = gen(seed)
    U = torch.linalg.qr(torch.randn(*batch, m, 32, generator=g)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, 32, generator=g)).Q
    return (U * torch.arange(1, 33) ** -0.7) @ V.mT + 0.01 * torch.randn(*batch, m, n, generator=g)


def deq64(q) -> torch.Tensor:
    return dequantize_nf4_ref(q.packed, q.block_absmax(), q.blocksize, q.numel, torch.float64).view(q.shape)


def nuclear64(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(M.double()).sum(-1)


def reduction_reference(W, residual, A, B, scale=1.0):
    """The PiSSA paper's metric, literally: fp64 SVDs, the reference dequantizer."""
    error = nuclear64(W.double() - deq64(residual) - scale * A.double() @ B.double())
    return 1 - error / nuclear64(W.double() - deq64(quantize_nf4(W, residual.blocksize, residual.double_quant)))


# ---- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 40, 25), (2, 25, 40), (30, 30)], ids=str)
def test_nuclear_norm_is_the_sum_of_singular_values(shape):
    M = torch.randn(shape, generator=gen(1))
    torch.testing.assert_close(nuclear_norm(M), nuclear64(M), rtol=1e-12, atol=0)


def test_error_reduction_is_zero_for_qlora_and_matches_the_literal_formula():
    W = weights()
    zero_A, zero_B = torch.zeros(96, 8), torch.zeros(8, 160)
    assert quantization_error_reduction(W, quantize_nf4(W), zero_A, zero_B).item() == 0.0
    A, B, residual = qpissa_factors(W, 8, iters=2, generator=gen(1))
    got = quantization_error_reduction(W, residual[0], A, B, scale=1.0)
    torch.testing.assert_close(got, reduction_reference(W, residual[0], A, B), rtol=1e-10, atol=1e-12)
    # scale: s (A / √s)(B / √s) is the same correction
    torch.testing.assert_close(quantization_error_reduction(W, residual[0], A / 2, B / 2, scale=4.0), got)
    assert got.item() > 0.05
    recon, reduction = error_metrics(W, residual, A, B)  # both at once, from one error matrix
    torch.testing.assert_close(reduction, reduction_reference(W, residual[0], A, B), rtol=1e-10, atol=1e-12)
    want = torch.linalg.matrix_norm(
        W.double() - deq64(residual[0]) - A.double() @ B.double()
    ) / torch.linalg.matrix_norm(W.double())
    torch.testing.assert_close(recon, want, rtol=1e-12, atol=0)
    assert error_metrics(W, W - A @ B, A, B)[1] is None


def test_reconstruction_error_matches_the_literal_formula():
    W = weights()
    A, B, residual = qpissa_factors(W, 8, generator=gen(1), double_quant=True)
    want = torch.linalg.matrix_norm(
        W.double() - deq64(residual[0]) - A.double() @ B.double()
    ) / torch.linalg.matrix_norm(W.double())
    torch.testing.assert_close(reconstruction_error(W, residual[0], A, B), want, rtol=1e-12, atol=0)
    dense = W - A @ B
    assert reconstruction_error(W, dense, A, B).item() < 1e-6


# ---- the alternation ------------------------------------------------------------------------------


def svd_split(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]


def test_loftq_first_round_quantizes_W_and_fits_its_error():
    W = weights()
    A, B, (q,) = loftq_factors(W, 8, exact=True)
    assert torch.equal(q.packed, quantize_nf4(W).packed) and torch.equal(q.absmax, quantize_nf4(W).absmax)
    A_ref, B_ref = svd_split(W.double() - deq64(q), 8)
    torch.testing.assert_close((A.double() @ B.double()), A_ref @ B_ref, rtol=0, atol=1e-6)


def test_qpissa_is_the_alternation_of_the_pissa_paper():
    """init="svd", 3 rounds against a literal fp64 loop: start from the principal components,
    then Q = nf4(W − A B), A, B = SVD split of W − deq(Q). Codes whose input sits on a decision
    boundary may round differently between fp32 and fp64 arithmetic, so allow a few."""
    W = weights()
    A, B, (q,) = qpissa_factors(W, 8, init="svd", iters=3)
    A_ref, B_ref = svd_split(W, 8)
    for _ in range(3):
        q_ref = quantize_nf4((W.double() - A_ref @ B_ref).float())
        A_ref, B_ref = svd_split(W.double() - deq64(q_ref), 8)
    same_codes = (q.packed == q_ref.packed).double().mean().item()
    assert same_codes > 0.999
    effective, effective_ref = deq64(q) + A.double() @ B.double(), deq64(q_ref) + A_ref @ B_ref
    assert torch.linalg.matrix_norm(effective - effective_ref) < 1e-3 * torch.linalg.matrix_norm(W.double())


@pytest.mark.parametrize("factors", ["qpissa", "loftq"])
def test_per_matrix_generators_make_a_batch_equal_its_matrices_alone(factors):
    run = qpissa_factors if factors == "qpissa" else loftq_factors
    W = weights(batch=(3,))
    A, B, residual = run(W, 8, iters=2, generator=[gen(10 + i) for i in range(3)])
    assert A.shape == (3, 96, 8) and B.shape == (3, 8, 160) and len(residual) == 3
    for i in range(3):
        A1, B1, (q1,) = run(W[i], 8, iters=2, generator=gen(10 + i))
        assert (residual[i].packed == q1.packed).double().mean().item() > 0.999
        torch.testing.assert_close(
            deq64(residual[i]) + A[i].double() @ B[i].double(), deq64(q1) + A1.double() @ B1.double(), rtol=0, atol=1e-3
        )


@pytest.mark.parametrize(
    "init, options",
    [("svd", {}), ("rsvd", {}), ("random", {}), ("cur", {"u": "optimal"})],
    ids=["svd", "rsvd", "random", "cur"],
)
def test_every_init_can_start_qpissa(init, options):
    W = weights()
    A, B, residual = qpissa_factors(W, 8, init=init, generator=gen(1), **options)
    assert reduction_reference(W, residual[0], A, B).item() > 0.05


def test_bf16_weights_give_bf16_factors_and_residuals():
    W = weights().bfloat16()
    A, B, (q,) = qpissa_factors(W, 8, iters=2, generator=gen(1))
    assert A.dtype == B.dtype == q.dtype == q.dequantize().dtype == torch.bfloat16
    assert quantization_error_reduction(W, q, A, B).item() > 0.05


def test_bad_arguments_are_clear_errors():
    W = weights()
    with pytest.raises(ValueError, match="quant_iters must be an int >= 1, got 0"):
        qpissa_factors(W, 8, iters=0)
    with pytest.raises(ValueError, match="init must be one of"):
        qpissa_factors(W, 8, init="pca")
    with pytest.raises(ValueError, match=r"rank must be in \[1, 96\], got 97"):
        loftq_factors(W, 97)


# ---- the PiSSA paper's orderings on real weights ------------------------------------------------------


def test_qpissa_orderings_on_minilm_rank_16():
    """On all 36 MiniLM linears at rank 16 (rsvd, NF4, blocksize 64), per matrix: QPiSSA removes
    part of QLoRA's error; 5 rounds beat 1; QPiSSA beats LoftQ at the same number of rounds."""
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for _, w in sorted(minilm_linear_weights().items()):
        groups.setdefault(tuple(w.shape), []).append(w)
    results: dict[str, list[float]] = {}
    for label, run, iters in [
        ("qpissa-1", qpissa_factors, 1),
        ("qpissa-5", qpissa_factors, 5),
        ("loftq-1", loftq_factors, 1),
        ("loftq-5", loftq_factors, 5),
    ]:
        values = []
        for ws in groups.values():
            W = torch.stack(ws)
            A, B, residual = run(W, 16, iters=iters, generator=[gen(i) for i in range(len(ws))])
            values += quantization_error_reduction(W, residual, A, B).tolist()
        results[label] = values
    print({label: f"mean {statistics.mean(v):.1%}, min {min(v):.1%}, max {max(v):.1%}" for label, v in results.items()})
    assert min(results["qpissa-1"]) > 0
    for better, worse in [("qpissa-5", "qpissa-1"), ("qpissa-1", "loftq-1"), ("qpissa-5", "loftq-5")]:
        assert all(b > w for b, w in zip(results[better], results[worse])), (better, worse)
