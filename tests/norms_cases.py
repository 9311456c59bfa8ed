"""The rigorous error bound shared by the C++ and Triton row_col_sq_norms tests."""
from __future__ import annotations

import torch

from lowrank_kernels.reference import row_col_sq_norms_ref

U32 = 2.0**-24  # unit roundoff of fp32


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
