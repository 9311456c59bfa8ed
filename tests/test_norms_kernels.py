"""The row_col_sq_norms C++ CPU kernel against the fp64 reference: dtypes, odd and empty
shapes, batches, non-contiguous input, large magnitudes, NaN/Inf, determinism, errors, opcheck."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import lowrank_kernels  # noqa: F401  (loads the compiled ops)
from norms_cases import check_norms

ops = torch.ops.lowrank_kernels

# (m, n) covering: 1x1, single rows/columns, sizes that are no multiple of the 8-wide vectors
# or the 4-row groups, several row chunks with a ragged last chunk (301 x 1000), and more than
# one column tile (n > 16384).
SHAPES = [(1, 1), (1, 7), (7, 1), (3, 5), (37, 100), (129, 65), (301, 1000), (9, 20000)]


def check(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return check_norms(ops.row_col_sq_norms, w)


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    check(randn(*shape, dtype=dtype))


@pytest.mark.parametrize("shape", [(3, 37, 45), (2, 3, 17, 9), (2, 301, 1000), (24, 38, 38)], ids=str)
def test_batched_matches_reference(shape, dtype):
    w = randn(*shape, dtype=dtype)
    rows, cols = check(w)
    assert rows.shape == shape[:-1] and cols.shape == (*shape[:-2], shape[-1])
    # Batch elements are independent: each equals the op on that matrix alone.
    first = ops.row_col_sq_norms(w.reshape(-1, *shape[-2:])[0])
    assert torch.equal(rows.reshape(-1, shape[-2])[0], first[0])
    assert torch.equal(cols.reshape(-1, shape[-1])[0], first[1])


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (2, 0, 3), (2, 3, 0), (0, 4, 5)], ids=str)
def test_empty_dimensions_give_zeros(shape, dtype):
    rows, cols = ops.row_col_sq_norms(torch.empty(shape, dtype=dtype))
    assert rows.shape == shape[:-1] and cols.shape == (*shape[:-2], shape[-1])
    assert rows.dtype == cols.dtype == torch.float32
    assert not rows.any() and not cols.any()


@pytest.mark.parametrize(
    "make",
    [
        lambda d: randn(70, 50, dtype=d).T,  # a transposed matrix
        lambda d: randn(3, 45, 37, dtype=d).mT,  # a batch of transposed matrices
        lambda d: randn(40, 90, dtype=d)[:, ::2],  # strided columns
        lambda d: randn(5, 3, 33, 21, dtype=d).permute(1, 0, 2, 3),  # permuted batch dims
        lambda d: randn(33, 1, dtype=d).expand(33, 17),  # a broadcast view (stride 0)
    ],
    ids=["T", "batched-mT", "strided", "permuted-batch", "expanded"],
)
def test_non_contiguous_input(make, dtype):
    w = make(dtype)
    assert not w.is_contiguous()
    check(w)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e18), (torch.bfloat16, 1e18), (torch.float16, 6e4)],
                         ids=["fp32", "bf16", "fp16"])
def test_large_magnitudes(dtype, scale):
    """Values near the top of the range whose squares (and their sums) are still finite."""
    g = torch.Generator().manual_seed(3)
    w = ((torch.rand(21, 35, generator=g) * 2 - 1) * scale).to(dtype)
    rows, cols = check(w)
    assert torch.isfinite(rows).all() and torch.isfinite(cols).all()


def test_squares_overflow_to_inf():
    rows, cols = ops.row_col_sq_norms(torch.full((2, 3), 1e20))
    assert torch.isinf(rows).all() and torch.isinf(cols).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("shape", [(5, 7), (301, 1000)], ids=str)
def test_non_finite_values_propagate(shape, bad, dtype):
    w = randn(*shape, dtype=dtype)
    w[2, 3] = bad
    rows, cols = ops.row_col_sq_norms(w)
    expected = float("nan") if bad != bad else float("inf")
    torch.testing.assert_close(rows[2], torch.tensor(expected), equal_nan=True)
    torch.testing.assert_close(cols[3], torch.tensor(expected), equal_nan=True)
    assert torch.isfinite(rows[torch.arange(shape[0]) != 2]).all()
    assert torch.isfinite(cols[torch.arange(shape[1]) != 3]).all()


def test_deterministic_across_calls_and_thread_counts():
    """Chunks are a function of the shape only, so results are bitwise identical whatever the
    thread count."""
    w = randn(2, 301, 1000)
    first = ops.row_col_sq_norms(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.row_col_sq_norms(w)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, single):
        assert torch.equal(a, b)
    for a, b in zip(first, ops.row_col_sq_norms(w)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "w,match",
    [
        (torch.randn(5), r"w must have at least 2 dimensions.*\[5\].*Float"),
        (torch.tensor(1.0), r"w must have at least 2 dimensions"),
        (torch.ones(3, 4, dtype=torch.int32), r"w must be float32, float16 or bfloat16, got Int.*\[3, 4\]"),
        (torch.ones(3, 4, dtype=torch.float64), r"w must be float32, float16 or bfloat16, got Double"),
    ],
    ids=["1-D", "0-D", "int32", "float64"],
)
def test_rejects_bad_input(w, match):
    with pytest.raises(RuntimeError, match=match):
        ops.row_col_sq_norms(w)


@pytest.mark.parametrize("shape", [(37, 100), (2, 3, 17, 9)], ids=str)
def test_opcheck(shape):
    import lowrank_kernels.decompose  # noqa: F401  (registers the op's fake kernel)

    opcheck(ops.row_col_sq_norms, (randn(*shape),))
