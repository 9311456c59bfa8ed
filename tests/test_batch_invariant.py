"""batch_invariant: each matrix of a batch gets bitwise what the same call gives it alone, and
the products are right (against fp64 torch)."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowrank_kernels import batch_invariant as bi


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def operand(batch, rows, cols, *, column_major=False, dtype=torch.float32, seed=0):
    """A [batch, rows, cols] batch, row-major or as the transposed view of a row-major one."""
    if column_major:
        return torch.randn(batch, cols, rows, generator=gen(seed), dtype=dtype).mT
    return torch.randn(batch, rows, cols, generator=gen(seed), dtype=dtype)


# (m, k, n): odd sizes start matrices of a packed batch unaligned; n = 1 and 11-row cases take
# other kernels in ATen's bmm than in mm; n = 200 is wider than the skinny kernel takes.
SHAPES = [(11, 16, 48), (50, 11, 11), (37, 23, 1), (64, 48, 8), (5, 7, 200), (1, 9, 3)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("a_cm,b_cm", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmul_gives_each_matrix_its_single_bits(m, k, n, a_cm, b_cm, dtype):
    a = operand(5, m, k, column_major=a_cm, dtype=dtype, seed=1)
    b = operand(5, k, n, column_major=b_cm, dtype=dtype, seed=2)
    batched = bi.matmul(a, b)
    assert batched.shape == (5, m, n) and batched.dtype == dtype
    for i in range(5):
        assert torch.equal(batched[i], bi.matmul(a[i].clone(), b[i].clone()))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(batched.double(), a.double() @ b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matmul_per_matrix_and_addmm_are_torch_single_calls(m, k, n):
    a, b, c = operand(4, m, k, seed=1), operand(4, k, n, seed=2), operand(4, m, n, seed=3)
    products, sums = bi.matmul_per_matrix(a, b), bi.addmm(c, a, b, alpha=-1)
    for i in range(4):
        assert torch.equal(products[i], a[i].clone() @ b[i].clone())
        assert torch.equal(sums[i], torch.addmm(c[i].clone(), a[i].clone(), b[i].clone(), alpha=-1))


def test_two_batch_dims_and_a_strided_batch():
    """A batch of [2, 3] matrices, and one whose matrices are every other of a larger batch."""
    a = torch.randn(2, 3, 13, 9, generator=gen(1))
    b = torch.randn(2, 3, 9, 40, generator=gen(2))[..., :5]  # not dense: each row keeps 5 of 40
    batched = bi.matmul_per_matrix(a, b)
    assert batched.shape == (2, 3, 13, 5)
    for i, j in itertools.product(range(2), range(3)):
        assert torch.equal(batched[i, j], a[i, j].clone() @ b[i, j].contiguous())
    every_other = torch.randn(6, 11, 11, dtype=torch.float64, generator=gen(3))[::2]
    G = every_other.mT @ every_other
    values, vectors = bi.per_matrix(torch.linalg.eigh, G, always=True)
    for i in range(3):
        alone = torch.linalg.eigh(G[i].clone())
        assert torch.equal(values[i], alone.eigenvalues) and torch.equal(vectors[i], alone.eigenvectors)


@pytest.mark.parametrize("size", [11, 16, 33])
def test_per_matrix_linalg_gives_each_matrix_its_single_bits(size):
    X = torch.randn(5, 3 * size, size, generator=gen(size))
    G = X.mT @ X
    R, info = bi.per_matrix(torch.linalg.cholesky_ex, G, upper=True)
    inverse = bi.per_matrix(torch.linalg.solve_triangular, R, torch.eye(size), upper=True)
    values, vectors = bi.per_matrix(torch.linalg.eigh, G.double(), always=True)
    assert not info.any()
    for i in range(5):
        single_R = torch.linalg.cholesky_ex(G[i].clone(), upper=True).L
        assert torch.equal(R[i], single_R)
        assert torch.equal(inverse[i], torch.linalg.solve_triangular(single_R, torch.eye(size), upper=True))
        alone = torch.linalg.eigh(G[i].double())
        assert torch.equal(values[i], alone.eigenvalues) and torch.equal(vectors[i], alone.eigenvectors)
        # LAPACK's column-major results stay column-major, as a single call's are
        assert vectors[i].stride() == alone.eigenvectors.stride()


def test_mismatched_batches_are_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"\[2, 4, 3\].*\[3, 3, 5\]"):
        bi.matmul(torch.ones(2, 4, 3), torch.ones(3, 3, 5))
    with pytest.raises(ValueError, match="batch shape"):
        bi.addmm(torch.ones(2, 4, 5), torch.ones(4, 3), torch.ones(3, 5), alpha=1)


def test_off_the_cpu_the_plain_batched_calls_run():
    """Meta tensors stand for a GPU here: the calls keep their batched shapes and dtypes."""
    a, b, c = (torch.empty(shape, device="meta") for shape in ((3, 7, 5), (3, 5, 2), (3, 7, 2)))
    assert bi.matmul(a, b).shape == (3, 7, 2) and bi.matmul(a, b).device.type == "meta"
    assert bi.addmm(c, a, b, alpha=-1).shape == (3, 7, 2)
    assert bi.per_matrix(torch.linalg.pinv, a, always=True).shape == (3, 5, 7)


def test_a_batch_of_no_matrices_gives_empty_results():
    a, b, c = torch.ones(0, 4, 3), torch.ones(0, 3, 5), torch.ones(0, 4, 5)
    assert bi.matmul(a, b).shape == (0, 4, 5) and bi.matmul_per_matrix(a, b).shape == (0, 4, 5)
    assert bi.addmm(c, a, b, alpha=-1).shape == (0, 4, 5)
    values, vectors = bi.per_matrix(torch.linalg.eigh, torch.ones(2, 0, 3, 3, dtype=torch.float64), always=True)
    assert values.shape == (2, 0, 3) and vectors.shape == (2, 0, 3, 3)
