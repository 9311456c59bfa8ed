"""The huber_weights C++ CPU kernel (Robust PiSSA's fused residual / weight / loss pass) against
the fp64 reference: dtypes, odd shapes, batches with per-matrix deltas, determinism, errors, opcheck."""

from __future__ import annotations

import pytest
import torch
from huber_cases import CASES, assert_matches_reference, assert_normal_equations_match, make_inputs
from torch.library import opcheck

import lowrank_kernels  # noqa: F401  (loads the compiled ops)

ops = torch.ops.lowrank_kernels


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, dtype):
    inputs = make_inputs(*case, dtype)
    assert_matches_reference(ops.huber_weights(*inputs), *inputs)


def test_a_wrong_element_breaks_the_bound():
    """The bound is tight enough to catch a single wrong residual."""
    W, A, B, wd, ld = make_inputs((), 37, 29, 8, torch.float32)
    omega, psi, stats = ops.huber_weights(W, A, B, wd, ld)
    psi[3, 5] += 0.1 * wd
    with pytest.raises(AssertionError):
        assert_matches_reference((omega, psi, stats), W, A, B, wd, ld)


def test_batch_elements_are_independent_and_deterministic():
    W, A, B, wd, ld = make_inputs((3,), 64, 257, 5, torch.float32)
    batched = ops.huber_weights(W, A, B, wd, ld)
    again = ops.huber_weights(W, A, B, wd, ld)
    single = ops.huber_weights(W[1], A[1], B[1], wd[1], ld[1])
    for b, a, s in zip(batched, again, single):
        assert torch.equal(b, a)
        assert torch.equal(b[1], s)


def test_thread_count_does_not_change_bits():
    W, A, B, wd, ld = make_inputs((2,), 300, 130, 4, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.huber_weights(W, A, B, wd, ld)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(one, ops.huber_weights(W, A, B, wd, ld)):
        assert torch.equal(x, y)


def test_empty_matrix_gives_zero_sums():
    omega, psi, stats = ops.huber_weights(
        torch.empty(2, 0, 5), torch.empty(2, 0, 3), torch.empty(2, 3, 5), torch.ones(2), torch.ones(2)
    )
    assert omega.shape == (2, 0, 5) and stats.shape == (2, 2) and not stats.any()


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda W, A, B, d: (W.int(), A, B, d, d), "w must be float32"),
        (lambda W, A, B, d: (W, A.double(), B, d, d), "a and b must be float32"),
        (lambda W, A, B, d: (W, A[:, :2], B, d, d), r"a must be \[..., m, r\]"),
        (lambda W, A, B, d: (W, A, B[..., :3], d, d), r"b \[..., r, n\]"),
        (lambda W, A, B, d: (W[0], A, B, d, d), "dimensions"),
        (lambda W, A, B, d: (W, A, B, d[:1], d), "batch shape"),
        (lambda W, A, B, d: (W, A, B, d, d.double()), "float32 tensors"),
        (lambda W, A, B, d: (W, A, B, -d, d), "positive and finite"),
        (lambda W, A, B, d: (W, A, B, d, d * float("inf")), "positive and finite"),
    ],
    ids=["int-w", "double-a", "a-rank", "b-cols", "w-dims", "delta-shape", "delta-dtype", "negative", "inf"],
)
def test_bad_arguments_raise(args, match):
    W, A, B, wd, _ = make_inputs((2,), 6, 7, 3, torch.float32)
    with pytest.raises(RuntimeError, match=match):
        ops.huber_weights(*args(W, A, B, wd))


def test_opcheck():
    opcheck(ops.huber_weights, make_inputs((2,), 9, 40, 3, torch.float32))


# ---- huber_normal_equations / huber_loss: the fused IRLS half-step -----------------------------------


@pytest.mark.parametrize("case", CASES + [((2,), 130, 37, 8)], ids=str)
def test_normal_equations_match_reference(case, dtype):
    inputs = make_inputs(*case, dtype)
    got = ops.huber_normal_equations(*inputs)
    assert_normal_equations_match(got, *inputs)
    W, A, B, _, ld = inputs
    assert torch.equal(ops.huber_loss(W, A, B, ld), ops.huber_normal_equations(W, A, B, ld, ld)[2])


def test_normal_equations_bound_catches_a_wrong_term():
    inputs = make_inputs((), 37, 29, 8, torch.float32)
    gram, grad, stats = ops.huber_normal_equations(*inputs)
    gram[4, 2, 3] *= 1.001
    with pytest.raises(AssertionError):
        assert_normal_equations_match((gram, grad, stats), *inputs)


def test_gpu_composition_equals_the_fused_cpu_kernel():
    """The CUDA registration (huber_weights + GEMMs) computes the same normal equations."""
    from lowrank_kernels._registry import huber_loss_composed, huber_normal_equations_composed

    inputs = make_inputs((3,), 40, 70, 5, torch.float32)
    assert_normal_equations_match(huber_normal_equations_composed(*inputs), *inputs)
    W, A, B, _, ld = inputs
    assert torch.allclose(huber_loss_composed(W, A, B, ld), ops.huber_loss(W, A, B, ld), rtol=1e-6)


def test_normal_equations_thread_count_does_not_change_bits():
    inputs = make_inputs((2,), 300, 130, 4, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.huber_normal_equations(*inputs)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(one, ops.huber_normal_equations(*inputs)):
        assert torch.equal(x, y)


def test_normal_equations_errors_and_opcheck():
    W, A, B, wd, ld = make_inputs((2,), 9, 40, 3, torch.float32)
    with pytest.raises(RuntimeError, match="a and b must be float32"):
        ops.huber_normal_equations(W, A.double(), B, wd, ld)
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="positive and finite"):
            ops.huber_loss(W, A, B, torch.tensor([1.0, bad]))
    opcheck(ops.huber_normal_equations, (W, A, B, wd, ld))
    opcheck(ops.huber_loss, (W, A, B, ld))


# ---- spd_solve ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, r", [((), 1), ((5,), 3), ((2, 7), 8), ((40,), 17)], ids=str)
def test_spd_solve_matches_fp64_solve(shape, r):
    g = torch.Generator().manual_seed(r)
    X = torch.randn(*shape, r, r + 3, generator=g)
    G, rhs = X @ X.mT, torch.randn(*shape, r, generator=g)
    x = ops.spd_solve(G, rhs)
    ref = torch.linalg.solve(G.double(), rhs.double())
    # Backward stable in fp64, then rounded to fp32: the fp32 input is the problem solved exactly.
    assert torch.allclose(x.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_spd_solve_singular_system_gets_a_descent_step():
    """A rank-deficient G (a zero column in the factor) is solved with a ridge: finite, and a
    descent direction for the quadratic with that G (gᵀx > 0)."""
    G = torch.tensor([[[4.0, 0.0], [0.0, 0.0]], [[2.0, 1.0], [1.0, 0.5]]])
    rhs = torch.tensor([[1.0, 0.0], [1.0, 0.5]])
    x = ops.spd_solve(G, rhs)
    assert torch.isfinite(x).all()
    assert ((x * rhs).sum(-1) > 0).all()
    assert torch.allclose(x[0, 0], torch.tensor(0.25))
    from lowrank_kernels._registry import spd_solve_batched

    assert torch.allclose(spd_solve_batched(G, rhs), x, rtol=1e-4)


def test_spd_solve_gives_each_system_the_bits_it_gets_alone():
    """Systems are factored several at a time: a system's result must not depend on its
    neighbours, its position, or a singular neighbour taking the ridge path."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(11, 5, 7, generator=g)
    G, rhs = X @ X.mT, torch.randn(11, 5, generator=g)
    G[6, :, 2] = G[6, 2, :] = 0  # singular: Cholesky fails, ridge path
    together = ops.spd_solve(G, rhs)
    for start in (0, 3, 6):  # the same systems at other offsets and group sizes
        torch.testing.assert_close(ops.spd_solve(G[start:], rhs[start:]), together[start:], rtol=0, atol=0)
    for i in range(11):
        torch.testing.assert_close(ops.spd_solve(G[i], rhs[i]), together[i], rtol=0, atol=0)
    assert torch.isfinite(together).all()


def test_spd_solve_returns_nan_for_a_nan_system_instead_of_hanging():
    code = (
        "import torch, lowrank_kernels; G = torch.eye(3).repeat(5, 1, 1); G[2, 1, 1] = float('nan'); "
        "x = torch.ops.lowrank_kernels.spd_solve(G, torch.ones(5, 3)); "
        "print(x[2].isnan().all().item(), torch.equal(x[[0, 1, 3, 4]], torch.ones(4, 3)))"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_spd_solve_errors_and_opcheck():
    with pytest.raises(RuntimeError, match="float32"):
        ops.spd_solve(torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"\[..., r, r\]"):
        ops.spd_solve(torch.eye(3), torch.ones(4))
    opcheck(ops.spd_solve, (torch.eye(3).expand(4, 3, 3).contiguous(), torch.ones(4, 3)))
