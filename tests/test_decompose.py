"""rsvd / pissa_factors / cur / random_pissa_factors: mathematical properties, exact recovery,
comparison with the exact SVD, determinism, batching, sampling statistics, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats

from lowrank_kernels import decompose as D
from lowrank_kernels._random import uniforms
from lowrank_kernels.decompose import _rsvd as randomized_svd

METHODS = ["subspace", "krylov"]


def low_rank(m, n, k, *, batch=(), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, m, k, generator=g) @ torch.randn(*batch, k, n, generator=g) / math.sqrt(k)).to(dtype)


def decaying(m, n, *, batch=(), seed=0, decay=0.8):
    """A full-rank matrix with singular values 1, 2^-decay, 3^-decay, ... (an LLM-like tail)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    return ((U * s) @ V.mT).float()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_orthonormal_columns(Q, tol=2e-5):
    eye = torch.eye(Q.shape[-1], dtype=torch.float64, device=Q.device)
    assert (Q.double().mT @ Q.double() - eye).abs().max() <= tol


def suboptimality(W, U, S, Vh, rank):
    W64 = W.double()
    best = torch.linalg.svdvals(W64)[..., rank:].square().sum(-1).sqrt()
    err = torch.linalg.matrix_norm(W64 - (U.double() * S.double()[..., None, :]) @ Vh.double())
    return (err / best - 1).max().item()


# ---- rsvd ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(60, 40), (40, 60), (33, 33)], ids=str)
def test_rsvd_recovers_low_rank_matrices_exactly(shape, method, device):
    W = low_rank(*shape, 5).to(device)
    U, S, Vh, _ = D.rsvd(W, 5, method=method, n_iter=1, generator=gen())
    assert U.shape == (shape[0], 5) and S.shape == (5,) and Vh.shape == (5, shape[1])
    assert (U @ torch.diag(S) @ Vh - W).abs().max() <= 2e-5 * W.abs().max()
    torch.testing.assert_close(S, torch.linalg.svdvals(W)[:5], rtol=2e-5, atol=0)


@pytest.mark.parametrize("n_iter", [2, 4])
def test_krylov_exhausted_space_stays_orthonormal_and_exact(n_iter):
    """W of rank 5 at rank 5: every Krylov block after the first is rounding noise, which the
    conditional second Gram-Schmidt pass must remove (skipping it leaves Q far from orthonormal
    and the Ritz values wrong)."""
    W = low_rank(120, 90, 5)
    U, S, Vh, _ = D.rsvd(W, 5, method="krylov", n_iter=n_iter, oversample=3, generator=gen())
    assert_orthonormal_columns(U)
    assert_orthonormal_columns(Vh.mT)
    assert (U @ torch.diag(S) @ Vh - W).abs().max() <= 2e-5 * W.abs().max()
    torch.testing.assert_close(S, torch.linalg.svdvals(W)[:5], rtol=2e-5, atol=0)


def test_krylov_blocks_narrower_than_the_rank_recover_low_rank_matrices_exactly():
    """block_size 2 < rank 5: the space [AΩ, ..., (AAᵀ)³AΩ] (8 columns) holds the range of W."""
    W = low_rank(70, 50, 5)
    U, S, Vh, _ = D.rsvd(W, 5, block_size=2, n_iter=3, generator=gen())
    assert_orthonormal_columns(U)
    assert (U @ torch.diag(S) @ Vh - W).abs().max() <= 2e-5 * W.abs().max()
    torch.testing.assert_close(S, torch.linalg.svdvals(W)[:5], rtol=2e-5, atol=0)


def test_krylov_space_stops_at_the_short_side_with_a_narrower_last_block(monkeypatch):
    """5-column blocks, n_iter 3 on a 40x12 matrix: the space takes 5 + 5 + 2 columns, all of
    R^12, so the result is the exact truncated SVD."""
    widths = []
    real_pass = randomized_svd._pass
    monkeypatch.setattr(
        randomized_svd, "_pass", lambda A, X, transpose=False: widths.append(X.shape[-1]) or real_pass(A, X, transpose)
    )
    W = decaying(40, 12)
    U, S, Vh, _ = D.rsvd(W, 10, block_size=5, n_iter=3, generator=gen())
    assert widths == [5, 5, 5, 5, 2, 2]  # sketch, then each block and its product with Aᵀ
    torch.testing.assert_close(S, torch.linalg.svdvals(W)[:10], rtol=1e-5, atol=1e-6)
    assert suboptimality(W, U, S, Vh, 10) <= 1e-5


def test_block_size_is_the_sketch_width_oversample_sets():
    W = decaying(60, 45, batch=(2,))
    by_block = D.rsvd(W, 6, block_size=6 + 5, n_iter=2, generator=gen(3))
    by_oversample = D.rsvd(W, 6, oversample=5, n_iter=2, generator=gen(3))
    for a, b in zip(by_block[:3], by_oversample[:3]):
        assert torch.equal(a, b)
    capped = D.rsvd(W, 6, block_size=1000, n_iter=0, generator=gen(3))  # capped at min(m, n) = 45: exact
    torch.testing.assert_close(capped.S, torch.linalg.svdvals(W)[..., :6], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_rsvd_factors_are_orthonormal_and_sorted(method, device):
    U, S, Vh, _ = D.rsvd(decaying(80, 50).to(device), 10, method=method, generator=gen())
    assert_orthonormal_columns(U)
    assert_orthonormal_columns(Vh.mT)
    assert (S[:-1] >= S[1:]).all() and (S >= 0).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rank", [1, 8])
def test_rsvd_approaches_the_optimal_rank_k_error(method, rank, device):
    W = decaying(120, 90).to(device)
    coarse = suboptimality(W, *D.rsvd(W, rank, n_iter=0, oversample=0, method=method, generator=gen())[:3], rank)
    fine = suboptimality(W, *D.rsvd(W, rank, n_iter=4, method=method, generator=gen())[:3], rank)
    assert fine <= 0.005 and fine <= coarse


def test_rsvd_error_estimate_is_the_actual_error(device):
    W = decaying(70, 50).to(device)
    U, S, Vh, error = D.rsvd(W, 6, error=True, generator=gen())
    actual = torch.linalg.matrix_norm(W.double() - (U.double() * S.double()) @ Vh.double()) / torch.linalg.matrix_norm(
        W.double()
    )
    assert abs(error.item() - actual.item()) <= 1e-4


# Odd sizes: matrix i of a packed batch then starts unaligned, where MKL rounds differently.
BATCH_SHAPES = [(50, 40), (37, 23), (23, 37), (64, 48)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", BATCH_SHAPES)
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_rsvd_batched_is_bitwise_per_matrix(method, shape, rank):
    """Each matrix of a batch gets exactly the bits of its own call (one generator shared by the
    batch, drawn matrix after matrix); one matrix is tiny, so its blocks differ in scale."""
    W = decaying(*shape, batch=(4,))
    W[1] *= 1e-3
    batched = D.rsvd(W, rank, method=method, generator=gen(7), error=True)
    g = gen(7)
    for i in range(4):
        single = D.rsvd(W[i], rank, method=method, generator=g, error=True)
        for a, b in zip(batched, single):
            assert torch.equal(a[i], b)


UNPACKED_BATCHES = {  # batches whose matrices are dense but not stored one after another
    "expanded": lambda W: W[0].expand(3, *W.shape[-2:]),
    "every-other": lambda W: torch.cat([W, W.flip(0)])[::2],
    "swapped-batch-dims": lambda W: torch.stack([W, 2 * W]).transpose(0, 1),
}


@pytest.mark.parametrize("layout", sorted(UNPACKED_BATCHES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpacked_batches_are_bitwise_per_matrix(layout, dtype):
    """The path of each pass is chosen by each matrix's layout, not the batch's."""
    W = UNPACKED_BATCHES[layout](decaying(50, 40, batch=(3,))).to(dtype)
    batch = W.shape[:-2]
    matrices = W.reshape(-1, 50, 40)
    batched = D.pissa_factors(W, 3, generator=[gen(i) for i in range(batch.numel())])
    for i, matrix in enumerate(matrices):
        single = D.pissa_factors(matrix, 3, generator=gen(i))
        assert all(torch.equal(a.reshape(-1, *a.shape[-2:])[i], b) for a, b in zip(batched, single))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_pissa_factors_batched_is_bitwise_per_matrix(exact, shape):
    W = decaying(*shape, batch=(3,))
    batched = D.pissa_factors(W, 3, exact=exact, generator=[gen(i) for i in range(3)])
    for i in range(3):
        single = D.pissa_factors(W[i], 3, exact=exact, generator=gen(i))
        assert all(torch.equal(a[i], b) for a, b in zip(batched, single))


def test_rsvd_four_dim_batch_and_same_generator_same_result():
    W = decaying(30, 20, batch=(2, 3))
    first = D.rsvd(W, 3, generator=gen(1))
    second = D.rsvd(W, 3, generator=gen(1))
    assert first.U.shape == (2, 3, 30, 3)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rsvd_half_precision_matches_fp32(dtype, device):
    W = decaying(128, 96).to(device)
    half = D.rsvd(W.to(dtype), 6, generator=gen())
    full = D.rsvd(W.to(dtype).float(), 6, generator=gen())
    torch.testing.assert_close(half.S, full.S, rtol=4 * torch.finfo(dtype).eps * 8, atol=0)
    assert_orthonormal_columns(half.U)


def test_rsvd_of_zero_matrix_is_defined():
    U, S, Vh, error = D.rsvd(torch.zeros(20, 12), 3, error=True, generator=gen())
    assert torch.equal(S, torch.zeros(3)) and torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert_orthonormal_columns(U)


def test_orthonormalize_handles_ill_conditioned_and_rank_deficient_blocks():
    g = gen()
    Y = torch.randn(200, 6, generator=g)
    Y[:, 5] = Y[:, 4] * (1 + 1e-7)  # numerically dependent columns: Cholesky of YᵀY fails
    Q = D.orthonormalize(Y)
    assert torch.isfinite(Q).all()
    assert_orthonormal_columns(Q[:, :5], tol=1e-4)
    scaled = torch.randn(200, 6, generator=g) * torch.logspace(0, -5, 6)  # condition number 1e5
    Q = D.orthonormalize(scaled)
    assert_orthonormal_columns(Q)
    torch.testing.assert_close(Q @ (Q.T @ scaled), scaled, rtol=0, atol=1e-5)


def test_orthonormalize_takes_each_batch_element_down_its_own_path():
    """An ill-conditioned block in a batch must not change how its well-conditioned neighbours are
    orthonormalised (CholeskyQR2 for them, the fallbacks only for it): bitwise their result alone."""
    g = gen()
    Y = torch.randn(3, 200, 6, generator=g)
    Y[1, :, 5] = Y[1, :, 4] * (1 + 1e-7)
    Q = D.orthonormalize(Y)
    for i in (0, 2):
        torch.testing.assert_close(Q[i], D.orthonormalize(Y[i].clone()), rtol=0, atol=0)
    assert torch.isfinite(Q[1]).all()


# ---- PiSSA factors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exact", [False, True])
def test_pissa_factors_reconstruct_w(exact, dtype, device):
    W = decaying(64, 48).to(device, dtype)
    A, B, W_res = D.pissa_factors(W, 8, exact=exact, **({} if exact else {"generator": gen(), "n_iter": 4}))
    assert A.shape == (64, 8) and B.shape == (8, 48) and W_res.dtype == dtype
    product = A.float() @ B.float()
    # W_res is W − A B rounded once to W's dtype: the sum is W to within that rounding.
    eps = torch.finfo(dtype).eps
    assert ((W_res.float() + product - W.float()).abs() <= eps * (W.float() - product).abs() + 1e-7).all()
    # A = U√S, B = √S Vh: balanced factors, and A B is the best rank-8 approximation.
    torch.testing.assert_close(
        A.float().norm(dim=0), B.float().norm(dim=1), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=0
    )
    S = torch.linalg.svdvals(W.float())
    torch.testing.assert_close(
        torch.linalg.svdvals(product)[:8], S[:8], rtol=2e-2 if dtype != torch.float32 else 1e-3, atol=0
    )


def test_random_pissa_keeps_top_components_and_picks_minor_ones(device):
    W = decaying(40, 30).to(device)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    A, B, W_res = D.random_pissa_factors(W, 6, n_random=2, generator=gen(3))
    torch.testing.assert_close(W_res + A @ B, W, rtol=0, atol=1e-5)
    adapter_sv = torch.linalg.svdvals(A.double() @ B.double())[:6]
    torch.testing.assert_close(adapter_sv[:4], S[:4], rtol=1e-4, atol=0)
    assert (adapter_sv[4:] < S[5]).all()  # the two others are minor components
    again = D.random_pissa_factors(W, 6, n_random=2, generator=gen(3))
    assert torch.equal(again.A, A)
    other = D.random_pissa_factors(W, 6, n_random=2, generator=gen(4))
    assert not torch.equal(other.A, A)


# ---- CUR -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("u", ["pinv", "stable", "optimal"])
def test_cur_recovers_low_rank_matrices_exactly(u, device):
    W = low_rank(50, 70, 4, seed=2).to(device)
    C, U, R, rows, cols = D.cur(W, 4, u=u, generator=gen())
    assert torch.equal(C, W[:, cols]) and torch.equal(R, W[rows, :])
    assert torch.linalg.matrix_rank(W[rows][:, cols]) == 4  # the sampled core is nonsingular
    assert (C @ U @ R - W).abs().max() <= 1e-3 * W.abs().max()


def test_cur_factors_split_and_optimal_core_is_best(device):
    W = decaying(60, 50).to(device)
    A, B, W_res = D.cur_factors(W, 6, generator=gen(5))
    torch.testing.assert_close(A @ B + W_res, W, rtol=0, atol=1e-6)
    errors = {}
    for u in ("pinv", "optimal"):
        C, U, R, _, _ = D.cur(W, 6, u=u, generator=gen(5))
        errors[u] = torch.linalg.matrix_norm(W - C @ U @ R)
    assert errors["optimal"] <= errors["pinv"] * (1 + 1e-5)


LOW_RANK_PART = {  # the part of each decomposition's result that does not depend on sign conventions
    "rsvd": lambda r: (r.U * r.S[..., None, :]) @ r.Vh,
    "cur": lambda r: torch.cat([r.rows, r.cols], dim=-1),
    "random_pissa_factors": lambda r: r.A @ r.B,
}


@pytest.mark.parametrize("decomposition", sorted(LOW_RANK_PART))
def test_one_generator_per_matrix_makes_each_result_independent_of_the_batch(decomposition):
    """generator=[g_0, g_1, ...]: matrix i of a batch gets what it gets alone with g_i (per-layer seeds)."""
    W = decaying(30, 25, batch=(3,))
    part, run = LOW_RANK_PART[decomposition], getattr(D, decomposition)
    batched = part(run(W, 4, generator=[gen(10 + i) for i in range(3)]))
    for i in range(3):
        single = part(run(W[i], 4, generator=gen(10 + i)))
        assert torch.equal(batched[i], single)
        other = part(run(W[i], 4, generator=gen(20 + i)))
        assert not torch.equal(single, other)  # the generator matters, so the equality above means something


@pytest.mark.parametrize("u", ["pinv", "stable", "optimal"])
@pytest.mark.parametrize("shape", [(30, 25), (64, 48)])
def test_cur_batched_is_bitwise_per_matrix_and_deterministic(u, shape):
    W = decaying(*shape, batch=(4,))
    batched = D.cur(W, 3, u=u, generator=gen(9))
    g = gen(9)
    for i in range(4):
        single = D.cur(W[i], 3, u=u, generator=g)
        assert all(torch.equal(a[i], b) for a, b in zip(batched, single))
    again = D.cur(W, 3, u=u, generator=gen(9))
    assert all(torch.equal(a, b) for a, b in zip(batched, again))


def test_cur_of_zero_matrix_and_zero_rows_is_defined():
    C, U, R, rows, cols = D.cur(torch.zeros(10, 8), 3, generator=gen())
    assert rows.unique().numel() == 3 and cols.unique().numel() == 3
    assert not U.abs().any() and not C.any() and not R.any()
    W = torch.zeros(10, 8)
    W[2, :] = 1.0  # one non-zero row: it is always sampled first
    _, _, _, rows, _ = D.cur(W, 2, generator=gen())
    assert 2 in rows.tolist()


def inclusion_probabilities(weights: list[float], k: int) -> list[float]:
    """Exact P(i in sample) for successive sampling without replacement ∝ weight (enumeration)."""
    n = len(weights)
    probs = [0.0] * n
    for order in itertools.permutations(range(n), k):
        p, remaining = 1.0, sum(weights)
        for i in order:
            p *= weights[i] / remaining
            remaining -= weights[i]
        for i in order:
            probs[i] += p
    return probs


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sampling_frequencies_match_the_norm_distribution(k):
    """Chi-square test of the inclusion counts of 40000 draws against the exact inclusion
    probabilities of successive weighted sampling (fixed seed; fails only with p < 1e-4)."""
    weights = torch.tensor([5.0, 1.0, 0.5, 3.0, 0.0, 2.0])
    trials = 40000
    (uniform,) = uniforms((trials,), (6,), gen(11), "cpu")
    samples = D.sample_proportional(weights.expand(trials, 6), k, uniform)
    counts = torch.zeros(6).index_add_(0, samples.reshape(-1), torch.ones(trials * k))
    assert counts[4] == 0  # a zero-norm row is never sampled while others remain
    expected = torch.tensor(inclusion_probabilities(weights.tolist(), k)) * trials
    keep = expected > 0
    chi2 = (((counts - expected)[keep]) ** 2 / expected[keep]).sum().item()
    # Inclusion indicators of one draw are dependent (they sum to k): the statistic is compared
    # with chi2 on n - 1 degrees of freedom scaled by k, a conservative bound.
    assert stats.chi2.sf(chi2 / k, keep.sum().item() - 1) > 1e-4


# ---- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: D.rsvd(torch.randn(10, 8), 0), ValueError, r"rank must be in \[1, 8\], got 0"),
        (lambda: D.rsvd(torch.randn(10, 8), 9), ValueError, r"rank must be in \[1, 8\], got 9"),
        (lambda: D.rsvd(torch.randn(10, 8), 2.0), TypeError, "rank must be an int"),
        (lambda: D.rsvd(torch.randn(10, 8), 2, oversample=-1), ValueError, "oversample must be >= 0"),
        (lambda: D.rsvd(torch.randn(10, 8), 2, n_iter=-1), ValueError, "n_iter must be >= 0"),
        (lambda: D.rsvd(torch.randn(10, 8), 2, block_size=0), ValueError, "block_size must be >= 1, got 0"),
        (
            lambda: D.rsvd(torch.randn(10, 8), 6, block_size=2, n_iter=1),
            ValueError,
            "n_iter=1 and block_size=2.*must hold rank = 6",
        ),
        (lambda: D.rsvd(torch.randn(10, 8), 2, block_size=1, n_iter=0), ValueError, "must hold rank = 2"),
        (lambda: D.rsvd(torch.randn(10, 8), 2, block_size=2, oversample=1), ValueError, "alternative to oversample"),
        (lambda: D.rsvd(torch.randn(10, 8), 2, block_size=2, method="subspace"), ValueError, "method='krylov'"),
        (lambda: D.rsvd(torch.randn(10, 8), 2, method="lanczos"), ValueError, "method must be one of"),
        (lambda: D.rsvd(torch.randn(10), 2), ValueError, r"W must be a matrix.*shape \(10,\)"),
        (lambda: D.rsvd(torch.ones(10, 8, dtype=torch.int32), 2), TypeError, "W must be float32.*int32"),
        (lambda: D.rsvd(torch.full((4, 4), float("nan")), 2), ValueError, "NaN or Inf"),
        (lambda: D.rsvd(torch.full((50, 40), 3e38), 2), ValueError, "too large for fp32"),
        (lambda: D.rsvd(torch.zeros(0, 4), 1), ValueError, "m, n >= 1"),
        (lambda: D.rsvd(torch.zeros(0, 10, 8), 2), ValueError, r"batch holds no matrices.*\(0, 10, 8\)"),
        (lambda: D.cur(torch.zeros(2, 0, 10, 8), 2), ValueError, "batch holds no matrices"),
        (lambda: D.cur(torch.randn(10, 8), 0), ValueError, "rank must be in"),
        (lambda: D.cur(torch.randn(10, 8), 2, u="svd"), ValueError, "u must be one of"),
        (lambda: D.cur(torch.tensor([[1.0, float("inf")]]), 1), ValueError, "NaN or Inf"),
        (lambda: D.pissa_factors(torch.randn(3, 3), 4), ValueError, "rank must be in"),
        (lambda: D.random_pissa_factors(torch.randn(6, 6), 4, n_random=5), ValueError, r"n_random must be in \[0, 4\]"),
        (
            lambda: D.rsvd(torch.randn(3, 6, 5), 2, generator=[gen(1), gen(2)]),
            ValueError,
            r"sequence of 3 torch.Generators",
        ),
        (lambda: D.cur(torch.randn(2, 6, 5), 2, generator=[gen(1), 7]), ValueError, r"sequence of 2 torch.Generators"),
    ],
)
def test_bad_input_is_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
