"""Robust PiSSA (huber_factorize, robust_pissa_factors): recovery under sparse outliers, ℓ1 beats
the truncated SVD on the textbook examples (checked against a brute-force ℓ1 search), batched ==
per-matrix, determinism, bf16, monotone IRLS loss, the seed's Algorithm 1 reproduced, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels import robust
from lowrank_kernels.adapters import init_factors


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def low_rank_plus_outliers(m=120, n=80, rank=4, fraction=0.01, seed=0, batch=(), device="cpu"):
    """L = U V (rank `rank`, entries ~ N(0, 1)) and S with `fraction` of entries ±10, on `device`."""
    g = gen(seed)
    L = torch.randn(*batch, m, rank, generator=g) @ torch.randn(*batch, rank, n, generator=g) / math.sqrt(rank)
    mask = torch.rand(*batch, m, n, generator=g) < fraction
    S = torch.where(mask, 10 * torch.sign(torch.randn(*batch, m, n, generator=g)), torch.zeros(()))
    return L.to(device), (L + S).to(device)


def truncated_svd(W, rank):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]


def l1(W, approx):
    return (W.double() - approx.double()).abs().sum().item()


def brute_force_rank1_l1(W, steps=241):
    """min over rank-1 u vᵀ of ‖W − u vᵀ‖₁ for a 3-row W: u on a grid of the unit sphere's upper
    half (u and −u give the same set), and for each u the exact best v: v_j is the weighted median
    of W_ij / u_i with weights |u_i| (the ℓ1 regression of column j on u)."""
    theta = torch.linspace(0, math.pi, steps, dtype=torch.float64)
    phi = torch.linspace(0, 2 * math.pi, 2 * steps, dtype=torch.float64)
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    u = torch.stack([t.cos(), t.sin() * p.cos(), t.sin() * p.sin()], -1).reshape(-1, 3)
    u = u[(u.abs() > 1e-9).all(-1)]  # the weighted median below divides by u_i
    W = W.double()
    best = torch.full((u.shape[0],), 0.0, dtype=torch.float64)
    for j in range(W.shape[1]):
        # The optimum of Σ_i |u_i| |W_ij/u_i − v| is attained at one of the breakpoints W_ij/u_i.
        candidates = W[:, j] / u  # [grid, 3]
        cost = (W[None, :, j, None] - u[:, :, None] * candidates[:, None, :]).abs().sum(1)  # [grid, 3]
        best += cost.min(-1).values
    return best.min().item()


# ---- recovery and ℓ1 quality ------------------------------------------------------------------------


def test_recovers_low_rank_part_under_sparse_outliers(device):
    L, W = low_rank_plus_outliers(device=device)
    A, B, _, _ = lk.huber_factorize(W, 4, delta=1e-3, n_iter=200, generator=gen())
    ours = ((A @ B).double() - L.double()).norm() / L.double().norm()
    svd = (truncated_svd(W, 4) - L.double()).norm() / L.double().norm()
    print(f"relative error of the low-rank part: huber_factorize {ours:.2e}, truncated SVD {svd:.2e}")
    assert svd > 0.1  # the outliers do pull the SVD away...
    assert ours < 1e-3  # ...and the robust fit ignores them


TEXTBOOK = [
    # The seed report's example (§5): the truncated SVD keeps the 3 (ℓ1 error 4); the rank-1 ℓ1
    # optimum fits the block of ones (error 3).
    torch.tensor([[3.0, 0, 0], [0, 1, 1], [0, 1, 1]]),
    # A rank-1 matrix with one corrupted entry: ℓ1 ignores the outlier, the SVD is pulled by it.
    torch.tensor([[1.0, 2, 3], [2, 4, 6], [1, 2, 12]]),
]


@pytest.mark.parametrize("W", TEXTBOOK, ids=["seed-3x3", "outlier-3x3"])
def test_rank1_l1_beats_truncated_svd_and_reaches_the_brute_force_optimum(W, device):
    optimum = brute_force_rank1_l1(W)
    svd = l1(W, truncated_svd(W, 1))
    A, B, _, _ = lk.huber_factorize(W.to(device), 1, delta=1e-5, n_iter=300, generator=gen())
    ours = l1(W, (A @ B).cpu())
    print(f"ℓ1 error: huber_factorize {ours:.4f}, brute force {optimum:.4f}, truncated SVD {svd:.4f}")
    assert optimum < svd - 0.5
    assert ours <= optimum + 1e-3


def test_heavy_tailed_matrix_mae_below_svd(device):
    g = gen(3)
    W = torch.distributions.StudentT(2.0).sample((96, 64)) + torch.randn(96, 3, generator=g) @ torch.randn(
        3, 64, generator=g
    )
    A, B, _, _ = lk.huber_factorize(W.to(device), 3, generator=gen())
    assert (W - (A @ B).cpu()).abs().mean() < 0.97 * (W.double() - truncated_svd(W, 3)).abs().mean()


# ---- the IRLS method's properties ---------------------------------------------------------------------


def test_irls_loss_history_is_non_increasing_and_decreases(device):
    _, W = low_rank_plus_outliers(seed=1, device=device)
    _, _, loss, mae = lk.huber_factorize(W, 4, n_iter=40, return_history=True, generator=gen())
    assert loss.dtype == torch.float64 and loss.shape == mae.shape and loss.dim() == 1
    assert (loss[1:] <= loss[:-1]).all()
    assert loss[-1] < 0.5 * loss[0]


def test_history_matches_the_returned_factors(device):
    _, W = low_rank_plus_outliers(m=40, n=30, seed=2, device=device)
    delta = 0.05
    A, B, loss, mae = lk.huber_factorize(W, 2, delta=delta, n_iter=15, return_history=True, generator=gen())
    E = (A.double() @ B.double() - W.double()).abs()
    huber = torch.where(E <= delta, 0.5 * E * E, delta * (E - 0.5 * delta)).mean()
    assert math.isclose(loss[-1].item(), huber.item(), rel_tol=1e-5)
    assert math.isclose(mae[-1].item(), E.mean().item(), rel_tol=1e-5)


@pytest.mark.parametrize("method", ["irls", "adam"])
def test_batched_equals_per_matrix(method):
    """With the default start (the SVD for IRLS: bitwise, odd sizes included; the Adam reference
    runs torch's batched autograd GEMMs, whose bits may differ from single ones, so it is
    compared to a tolerance)."""
    _, W = low_rank_plus_outliers(m=50, n=40, batch=(3,), seed=4)
    W[1] *= 5  # matrices of different scales get their own δ and stop at their own sweep
    n_iter = 30 if method == "irls" else 200
    A, B, loss, _ = lk.huber_factorize(W, 3, method=method, n_iter=n_iter, return_history=True, generator=gen())
    loop_generator = gen()  # a batch draws what a loop over its matrices draws from one generator
    for i in range(3):
        Ai, Bi, loss_i, _ = lk.huber_factorize(
            W[i], 3, method=method, n_iter=n_iter, return_history=True, generator=loop_generator
        )
        if method == "irls":
            assert torch.equal(A[i], Ai) and torch.equal(B[i], Bi)
            assert torch.equal(loss[: len(loss_i), i], loss_i) and (loss[len(loss_i) :, i] == loss_i[-1]).all()
            continue
        scale = W[i].abs().max()
        assert torch.allclose(A[i] @ B[i], Ai @ Bi, atol=1e-3 * scale, rtol=0)
        assert torch.allclose(loss[:, i], loss_i, rtol=1e-4)


def test_irls_batch_gives_each_matrix_the_bits_of_its_own_call():
    """Matrices stop on their own and the active ones are gathered as others converge: each
    matrix's factors and loss history are exactly those of its own call, and a matrix that
    stopped early repeats its last loss. Two batch dims; matrices 0 and 2 are the same, with the
    same seed, so they stop at the same sweep."""
    _, W = low_rank_plus_outliers(m=50, n=40, batch=(4,), seed=4)
    W[1] *= 5
    W[2] = W[0]
    W[3] = W[3] + torch.randn(50, 40, generator=gen(9))  # noisier: converges later
    W = W.reshape(2, 2, 50, 40)
    seeds = (1, 2, 1, 3)
    A, B, loss, mae = lk.huber_factorize(W, 3, n_iter=60, return_history=True, generator=[gen(s) for s in seeds])
    assert A.shape == (2, 2, 50, 3) and B.shape == (2, 2, 3, 40) and loss.shape[1:] == (2, 2)
    lengths = []
    for (i, j), seed in zip(((0, 0), (0, 1), (1, 0), (1, 1)), seeds):
        alone = lk.huber_factorize(W[i, j], 3, n_iter=60, return_history=True, generator=gen(seed))
        k = len(alone.loss_history)
        lengths.append(k)
        assert torch.equal(A[i, j], alone.A) and torch.equal(B[i, j], alone.B)
        assert torch.equal(loss[:k, i, j], alone.loss_history) and torch.equal(mae[:k, i, j], alone.mae_history)
        assert (loss[k:, i, j] == alone.loss_history[-1]).all()
    assert lengths[0] == lengths[2] and len(set(lengths)) == 3 and len(loss) == max(lengths)


def test_a_batch_starts_where_the_loop_over_its_matrices_starts():
    """A shared generator is drawn matrix after matrix, both start SVDs of a matrix included, and
    the default δ does not depend on the batch. On flat spectra the start depends on the sketch
    (drawing the batch's plain SVDs first, then the clipped ones, moved it by ~2 % here)."""
    W = torch.randn(3, 50, 40, generator=gen(3))
    batched = lk.huber_factorize(W, 3, n_iter=0, generator=gen())
    loop_generator = gen()
    for i in range(3):
        alone = lk.huber_factorize(W[i], 3, n_iter=0, generator=loop_generator)
        assert torch.allclose(batched.A[i] @ batched.B[i], alone.A @ alone.B, atol=1e-5 * W[i].abs().max(), rtol=0)
    big = torch.randn(6, 384, 384, generator=gen(4))
    deltas = robust._check_delta(None, big)
    assert all(torch.equal(deltas[i], robust._check_delta(None, big[i])) for i in range(6))


@pytest.mark.parametrize("method", ["irls", "adam"])
def test_same_generator_same_result(method, device):
    _, W = low_rank_plus_outliers(m=30, n=20, seed=5, device=device)
    first = lk.huber_factorize(W, 2, method=method, n_iter=20, generator=gen(7))
    second = lk.huber_factorize(W, 2, method=method, n_iter=20, generator=gen(7))
    assert torch.equal(first.A, second.A) and torch.equal(first.B, second.B)


def test_bf16_matches_fp32_within_bf16_tolerance(device):
    L, W = low_rank_plus_outliers(seed=6, device=device)
    A32, B32, _, _ = lk.huber_factorize(W, 4, generator=gen())
    A16, B16, _, _ = lk.huber_factorize(W.bfloat16(), 4, generator=gen())
    assert A16.dtype == B16.dtype == torch.bfloat16
    fit32, fit16 = A32.double() @ B32.double(), A16.double() @ B16.double()
    assert (fit16 - fit32).norm() / fit32.norm() < 2e-2  # bf16 has 8 bits of mantissa
    assert (fit16 - L.double()).norm() / L.double().norm() < 3e-2


def test_adam_reproduces_the_seeds_algorithm_1():
    """method="adam" is Algorithm 1: Gaussian start (A B of W's RMS), nn.HuberLoss, Adam lr 1e-2."""
    _, W = low_rank_plus_outliers(m=30, n=20, seed=8)
    rank, delta, steps = 3, 0.01, 50
    A, B, _, _ = lk.huber_factorize(W, rank, method="adam", delta=delta, n_iter=steps, generator=gen(1))
    g = gen(1)
    sigma = (W.square().mean() / rank) ** 0.25
    A_ref = (torch.randn(30, rank, generator=g) * sigma).requires_grad_()
    B_ref = (torch.randn(rank, 20, generator=g) * sigma).requires_grad_()
    optimizer = torch.optim.Adam([A_ref, B_ref], lr=1e-2)
    loss_fn = torch.nn.HuberLoss(delta=delta)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(A_ref @ B_ref, W).backward()
        optimizer.step()
    assert torch.allclose(A, A_ref.detach(), atol=1e-5) and torch.allclose(B, B_ref.detach(), atol=1e-5)


def test_robust_pissa_factors_split_is_exact(device):
    _, W = low_rank_plus_outliers(batch=(2,), seed=9, device=device)
    A, B, W_res = lk.robust_pissa_factors(W, 4, generator=gen())
    assert A.shape == (2, 120, 4) and B.shape == (2, 4, 80) and W_res.shape == W.shape
    assert torch.allclose(W_res + A @ B, W, atol=1e-5)
    A2, B2, W_res2 = init_factors(W, 4, "robust", generator=gen())
    assert torch.equal(A, A2) and torch.equal(W_res, W_res2)


def test_zero_iterations_return_the_svd_start(device):
    _, W = low_rank_plus_outliers(m=30, n=20, seed=10, device=device)
    A, B, _, _ = lk.huber_factorize(W, 2, n_iter=0, init="svd", generator=gen())
    clipped = W.clamp(-1.5 * W.abs().median(), 1.5 * W.abs().median())  # 600 entries: all sampled
    fits = [truncated_svd(W, 2), truncated_svd(clipped, 2)]
    assert min((A.double() @ B.double() - f).norm() / f.norm() for f in fits) < 1e-5


def test_all_zero_matrix_gives_zero_fit(device):
    A, B, _, _ = lk.huber_factorize(torch.zeros(3, 10, 8, device=device), 2, generator=gen())
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert (A @ B).abs().max() == 0


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda W: lk.huber_factorize(W, 0), ValueError, "rank"),
        (lambda W: lk.huber_factorize(W, 21), ValueError, "rank"),
        (lambda W: lk.huber_factorize(W, 2, delta=0.0), ValueError, "delta must be positive"),
        (lambda W: lk.huber_factorize(W, 2, delta=-1.0), ValueError, "delta must be positive"),
        (lambda W: lk.huber_factorize(W, 2, delta=torch.ones(3)), ValueError, "batch shape"),
        (lambda W: lk.huber_factorize(W, 2, delta="big"), TypeError, "delta"),
        (lambda W: lk.huber_factorize(W, 2, delta=True), TypeError, "delta must be a float or a tensor, got bool"),
        (lambda W: lk.huber_factorize(W, 2, n_iter=-1), ValueError, "n_iter"),
        (lambda W: lk.huber_factorize(W, 2, tol=2.0), ValueError, "tol"),
        (lambda W: lk.huber_factorize(W, 2, method="lbfgs"), ValueError, "method"),
        (lambda W: lk.huber_factorize(W, 2, init="cur"), ValueError, "init"),
        (lambda W: lk.huber_factorize(W[0], 1), ValueError, "matrix"),
        (lambda W: lk.huber_factorize(W.int(), 2), TypeError, "float32"),
        (
            lambda W: lk.huber_factorize(
                W.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(float("nan"))), 2
            ),
            ValueError,
            "NaN or Inf",
        ),
        (
            lambda W: lk.huber_factorize(
                W.index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(float("inf"))), 2
            ),
            ValueError,
            "NaN or Inf",
        ),
        (lambda W: lk.huber_factorize(W.expand(0, 30, 20), 2), ValueError, "batch holds no matrices"),
    ],
    ids=[
        "rank-0",
        "rank-too-large",
        "delta-0",
        "delta-negative",
        "delta-shape",
        "delta-type",
        "delta-bool",
        "n_iter",
        "tol",
        "method",
        "init",
        "1-D",
        "int",
        "nan",
        "inf",
        "empty-batch",
    ],
)
def test_bad_input_raises_clear_errors(call, error, match):
    W = torch.randn(30, 20, generator=gen())
    with pytest.raises(error, match=match):
        call(W)


@pytest.mark.parametrize("method", ["irls", "adam"])
def test_one_generator_per_matrix_makes_each_result_independent_of_the_batch(method, device):
    """Per-layer seeds (model conversion): with a generator per matrix, a matrix's factors are
    what it gets alone with its own generator."""
    _, W = low_rank_plus_outliers(m=30, n=20, batch=(3,), seed=11, device=device)
    n_iter = 10 if method == "irls" else 30
    batched = lk.huber_factorize(W, 2, method=method, n_iter=n_iter, generator=[gen(s) for s in (5, 6, 7)])
    alone = lk.huber_factorize(W[2], 2, method=method, n_iter=n_iter, generator=gen(7))
    assert torch.allclose(batched.A[2] @ batched.B[2], alone.A @ alone.B, atol=1e-5)
