"""Test matrices and the rigorous error bound shared by the C++ and Triton row_col_sq_norms tests
(tests/test_norms_kernels.py, tests/triton/test_triton_norms.py)."""

from __future__ import annotations

import torch

from lowrank_kernels.reference import row_col_sq_norms_ref

U32 = 2.0**-24  # unit roundoff of fp32

# (m, n) for every implementation: 1x1, single rows and columns, sizes that are no multiple of the
# C++ kernel's 8-wide vectors and 4-row groups, one and several of the Triton interpreter's
# 16 x 32 tiles with ragged edges.
SHAPES = [(1, 1), (1, 7), (7, 1), (1, 33), (17, 1), (3, 5), (16, 32), (37, 100), (129, 65)]
# Batched 3-D and 4-D shapes for every implementation.
BATCHED_SHAPES = [(3, 37, 45), (2, 3, 17, 9)]

# Shapes with an empty dimension: the norms are zeros of the other dimension's length.
EMPTY_SHAPES = [(0, 5), (5, 0), (0, 0), (2, 0, 3), (2, 3, 0), (0, 4, 5)]

# Non-contiguous inputs, by id: (shape of the contiguous matrix, the view taken of it).
NON_CONTIGUOUS_VIEWS = {
    "T": ((70, 50), lambda t: t.T),  # a transposed matrix
    "batched-mT": ((3, 45, 37), lambda t: t.mT),  # a batch of transposed matrices
    "strided": ((40, 90), lambda t: t[:, ::2]),  # strided columns
    "permuted-batch": ((5, 3, 33, 21), lambda t: t.permute(1, 0, 2, 3)),  # permuted batch dims
    "expanded": ((33, 1), lambda t: t.expand(33, 17)),  # a broadcast view (stride 0)
}

# (dtype, scale) of values near the top of the range whose squares (and their sums) stay finite.
LARGE_MAGNITUDES = {"fp32": (torch.float32, 1e18), "bf16": (torch.bfloat16, 1e18), "fp16": (torch.float16, 6e4)}


def randn(*shape, dtype=torch.float32, device="cpu", seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def large_magnitudes(dtype, scale, device="cpu") -> torch.Tensor:
    """A 21 x 35 matrix uniform in (-scale, scale)."""
    g = torch.Generator().manual_seed(3)
    return ((torch.rand(21, 35, generator=g) * 2 - 1) * scale).to(dtype).to(device)


def assert_norms_within(got: torch.Tensor, ref: torch.Tensor, count: int) -> None:
    """|got - ref| <= (count + 2) u ref: every term is non-negative, so an fp32 sum of `count`
    squares (each rounded once), in any order, is within count·u of the exact sum, and ref
    within u of it."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    excess = (got.double() - ref.double()).abs() - (count + 2) * U32 * ref.double()
    assert (excess <= 0).all(), f"error exceeds the bound by {excess.max().item():.3g} (count {count})"


def check_norms(row_col_sq_norms, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both norms of ``w`` by the implementation under test, each within the bound; returned."""
    rows, cols = row_col_sq_norms(w)
    ref_rows, ref_cols = row_col_sq_norms_ref(w)
    assert_norms_within(rows, ref_rows, w.shape[-1])
    assert_norms_within(cols, ref_cols, w.shape[-2])
    return rows, cols


def check_empty_gives_zeros(row_col_sq_norms, w: torch.Tensor) -> None:
    """An input with an empty dimension gives fp32 zeros of the right shapes."""
    rows, cols = row_col_sq_norms(w)
    assert rows.shape == w.shape[:-1] and cols.shape == (*w.shape[:-2], w.shape[-1])
    assert rows.dtype == cols.dtype == torch.float32
    assert not rows.any() and not cols.any()
