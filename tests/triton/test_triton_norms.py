"""Triton row_col_sq_norms against the fp64 reference (and the C++ kernel): dtypes, odd and
empty shapes, batches, strided input, large magnitudes, NaN/Inf, errors."""

from __future__ import annotations

import pytest
import torch
from norms_cases import (
    BATCHED_SHAPES,
    EMPTY_SHAPES,
    LARGE_MAGNITUDES,
    NON_CONTIGUOUS_VIEWS,
    SHAPES,
    U32,
    check_empty_gives_zeros,
    check_norms,
    large_magnitudes,
    randn,
)

from lowrank_kernels.triton import norms as triton_norms


def check(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return check_norms(triton_norms.row_col_sq_norms, w)


@pytest.mark.parametrize("shape", SHAPES + BATCHED_SHAPES, ids=str)
def test_triton_matches_reference(shape, dtype, triton_device):
    rows, cols = check(randn(*shape, dtype=dtype, device=triton_device))
    assert rows.shape == shape[:-1] and cols.shape == (*shape[:-2], shape[-1])


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_triton_empty_dimensions_give_zeros(shape, triton_device):
    check_empty_gives_zeros(triton_norms.row_col_sq_norms, torch.empty(shape, device=triton_device))


@pytest.mark.parametrize("shape, view", NON_CONTIGUOUS_VIEWS.values(), ids=list(NON_CONTIGUOUS_VIEWS))
def test_triton_non_contiguous_input(shape, view, dtype, triton_device):
    w = view(randn(*shape, dtype=dtype, device=triton_device))
    assert not w.is_contiguous()
    check(w)


@pytest.mark.parametrize("dtype, scale", LARGE_MAGNITUDES.values(), ids=list(LARGE_MAGNITUDES))
def test_triton_large_magnitudes(dtype, scale, triton_device):
    rows, cols = check(large_magnitudes(dtype, scale, triton_device))
    assert torch.isfinite(rows).all() and torch.isfinite(cols).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_triton_non_finite_values_propagate(bad, triton_device):
    w = randn(37, 70, device=triton_device)
    w[20, 40] = bad
    rows, cols = triton_norms.row_col_sq_norms(w)
    expected = torch.tensor(bad)
    torch.testing.assert_close(rows[20].cpu(), expected, equal_nan=True)
    torch.testing.assert_close(cols[40].cpu(), expected, equal_nan=True)
    assert torch.isfinite(rows[torch.arange(37) != 20]).all() and torch.isfinite(cols[torch.arange(70) != 40]).all()


def test_triton_agrees_with_cpp_kernel(triton_device):
    import lowrank_kernels  # noqa: F401  (loads the compiled ops)

    w = randn(2, 100, 300, dtype=torch.bfloat16, seed=5)
    rows, cols = triton_norms.row_col_sq_norms(w.to(triton_device))
    cpp_rows, cpp_cols = torch.ops.lowrank_kernels.row_col_sq_norms(w)
    # Both are within (count + 2) u of the exact sums, so within twice that of each other.
    torch.testing.assert_close(rows.cpu(), cpp_rows, rtol=2 * 302 * U32, atol=0)
    torch.testing.assert_close(cols.cpu(), cpp_cols, rtol=2 * 102 * U32, atol=0)


@pytest.mark.parametrize(
    "w,match",
    [
        (torch.randn(5), r"w must have at least 2 dimensions.*\[5\]"),
        (torch.ones(3, 4, dtype=torch.int32), r"w must be float32, float16 or bfloat16, got torch.int32"),
    ],
    ids=["1-D", "int32"],
)
def test_triton_rejects_bad_input(w, match, triton_device):
    with pytest.raises(RuntimeError, match=match):
        triton_norms.row_col_sq_norms(w.to(triton_device))


def test_triton_launcher_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        triton_norms.row_col_sq_norms(torch.randn(4, 4))
