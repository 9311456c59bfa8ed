"""The row_col_sq_norms C++ CPU kernel against the fp64 reference: dtypes, odd and empty
shapes, batches, non-contiguous input, large magnitudes, NaN/Inf, determinism, errors, opcheck."""

from __future__ import annotations

import pytest
import torch
from norms_cases import (
    BATCHED_SHAPES,
    EMPTY_SHAPES,
    LARGE_MAGNITUDES,
    NON_CONTIGUOUS_VIEWS,
    SHAPES,
    check_empty_gives_zeros,
    check_norms,
    large_magnitudes,
    randn,
)
from torch.library import opcheck

import lowrank_kernels  # noqa: F401  (loads the compiled ops)

ops = torch.ops.lowrank_kernels

# Beyond the shared shapes: several row chunks with a ragged last chunk (301 x 1000), more than one
# column tile (n > 16384), and batches of those and of many small matrices.
CHUNKED_SHAPES = [(301, 1000), (9, 20000)]
CHUNKED_BATCHED_SHAPES = [(2, 301, 1000), (24, 38, 38)]


def check(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return check_norms(ops.row_col_sq_norms, w)


@pytest.mark.parametrize("shape", SHAPES + CHUNKED_SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    check(randn(*shape, dtype=dtype))


@pytest.mark.parametrize("shape", BATCHED_SHAPES + CHUNKED_BATCHED_SHAPES, ids=str)
def test_batched_matches_reference(shape, dtype):
    w = randn(*shape, dtype=dtype)
    rows, cols = check(w)
    assert rows.shape == shape[:-1] and cols.shape == (*shape[:-2], shape[-1])
    # Batch elements are independent: each equals the op on that matrix alone.
    first = ops.row_col_sq_norms(w.reshape(-1, *shape[-2:])[0])
    assert torch.equal(rows.reshape(-1, shape[-2])[0], first[0])
    assert torch.equal(cols.reshape(-1, shape[-1])[0], first[1])


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_dimensions_give_zeros(shape, dtype):
    check_empty_gives_zeros(ops.row_col_sq_norms, torch.empty(shape, dtype=dtype))


@pytest.mark.parametrize("shape, view", NON_CONTIGUOUS_VIEWS.values(), ids=list(NON_CONTIGUOUS_VIEWS))
def test_non_contiguous_input(shape, view, dtype):
    w = view(randn(*shape, dtype=dtype))
    assert not w.is_contiguous()
    check(w)


@pytest.mark.parametrize("dtype, scale", LARGE_MAGNITUDES.values(), ids=list(LARGE_MAGNITUDES))
def test_large_magnitudes(dtype, scale):
    """Values near the top of the range whose squares (and their sums) are still finite."""
    rows, cols = check(large_magnitudes(dtype, scale))
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
