"""Triton row_col_sq_norms against the fp64 reference (and the C++ kernel): dtypes, odd and
empty shapes, batches, strided input, large magnitudes, NaN/Inf, errors."""
from __future__ import annotations

import pytest
import torch

from lowrank_kernels.triton import norms as triton_norms
from norms_cases import U32, check_norms

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return check_norms(triton_norms.row_col_sq_norms, w)


def randn(*shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


# Under the interpreter tiles are 16 x 32: these span one and several tiles with ragged edges.
@pytest.mark.parametrize("shape", [(1, 1), (1, 33), (17, 1), (3, 5), (16, 32), (37, 100), (129, 65),
                                   (3, 37, 45), (2, 3, 17, 9)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference(shape, dtype, triton_device):
    rows, cols = check(randn(*shape, dtype=dtype, device=triton_device))
    assert rows.shape == shape[:-1] and cols.shape == (*shape[:-2], shape[-1])


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (2, 0, 3), (0, 4, 5)], ids=str)
def test_triton_empty_dimensions_give_zeros(shape, triton_device):
    rows, cols = triton_norms.row_col_sq_norms(torch.empty(shape, device=triton_device))
    assert rows.shape == shape[:-1] and cols.shape == (*shape[:-2], shape[-1])
    assert rows.dtype == cols.dtype == torch.float32
    assert not rows.any() and not cols.any()


@pytest.mark.parametrize(
    "make",
    [
        lambda d, dev: randn(70, 50, dtype=d, device=dev).T,
        lambda d, dev: randn(3, 45, 37, dtype=d, device=dev).mT,
        lambda d, dev: randn(40, 90, dtype=d, device=dev)[:, ::2],
        lambda d, dev: randn(5, 3, 33, 21, dtype=d, device=dev).permute(1, 0, 2, 3),
    ],
    ids=["T", "batched-mT", "strided", "permuted-batch"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_non_contiguous_input(make, dtype, triton_device):
    w = make(dtype, triton_device)
    assert not w.is_contiguous()
    check(w)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e18), (torch.bfloat16, 1e18), (torch.float16, 6e4)],
                         ids=["fp32", "bf16", "fp16"])
def test_triton_large_magnitudes(dtype, scale, triton_device):
    g = torch.Generator().manual_seed(3)
    w = ((torch.rand(21, 35, generator=g) * 2 - 1) * scale).to(dtype).to(triton_device)
    rows, cols = check(w)
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
