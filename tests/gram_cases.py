"""Test matrices and the error bound of the gram op, shared by the C++ tests
(tests/test_gram_kernels.py) and the Triton tests (tests/triton/test_triton_gram.py).

G = yᵀ y in fp32 is a sum of m products of fp32 values (bf16/fp16 widen exactly), accumulated in
fp32 (FMA chains over row parts or tl.dot steps, then a short sum of the parts), and the
reference is the exact value rounded once to fp32, so elementwise

    |G - gram_ref(y)| <= (m + 2 + product_ulps) * 2^-24 * (|y|ᵀ |y|),

where product_ulps bounds the rounding of each product when the products are not exact (3xTF32
dots on a GPU: within 6 fp32 ulps = 12 * 2^-24 of |y_i||y_j|). `assert_bound_catches_wrong_results`
checks that the bound fails a result with one element perturbed or the last row dropped.
"""

from __future__ import annotations

import pytest
import torch

from lowrank_kernels.reference.decompose import gram_ref

# (leading dims, m, k) for every implementation: k = 1, odd k, k on and off the C++ kernel's
# 8-column panels and the Triton interpreter's 16-wide tile, a single row, m off every block size
# (C++ row blocks, Triton's 16-row steps), batched 3-D and 4-D.
SHAPES = [
    ((), 1, 1),
    ((), 37, 3),
    ((), 100, 17),
    ((), 129, 8),
    ((), 1, 24),
    ((), 75, 33),
    ((3,), 29, 16),
    ((5,), 77, 9),
    ((2, 3), 50, 18),
]

# Larger shapes for the C++ kernel: m up to 4099 (split into several row parts), k up to 144 (many
# 8-column panels). The Triton tests reach their row chunks by lowering the chunk size instead.
ROW_PART_SHAPES = [((), 300, 17), ((), 1000, 33), ((), 257, 40), ((), 4099, 26), ((), 2500, 144), ((3,), 1500, 31)]

# Non-contiguous layouts of a batched y [b, m, k], by id.
NON_CONTIGUOUS_VIEWS = {
    "transposed": lambda t: t.mT.contiguous().mT,  # column-major: rows contiguous
    "sliced": lambda t: t[:, ::2, 1:],  # strided rows, offset columns
    "batch-strided": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),  # batch dim innermost-but-one
    "col-strided": lambda t: t[..., ::3],  # column stride 3
}


def make_y(lead, m, k, dtype, device="cpu", seed=0) -> torch.Tensor:
    """Standard normal y of shape (*lead, m, k) in ``dtype`` on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((*lead, m, k), generator=gen).to(dtype).to(device)


def assert_gram_within(g: torch.Tensor, y: torch.Tensor, product_ulps: int = 0) -> None:
    """g (fp32, [..., k, k]) within the bound of the module docstring of gram_ref(y)."""
    y64 = y.double().cpu()
    ref = gram_ref(y64).double()
    bound = (y.shape[-2] + 2 + product_ulps) * 2.0**-24 * (y64.abs().mT @ y64.abs())
    assert g.shape == ref.shape and g.dtype == torch.float32
    err = (g.double().cpu() - ref).abs()
    over = err > bound
    assert not over.any(), f"error {err[over].max().item():.3g} exceeds the bound at {over.nonzero()[0].tolist()}"


def assert_bound_catches_wrong_results(gram, y: torch.Tensor, product_ulps: int = 0) -> None:
    """The bound fails ``gram(y)`` with one element off by an fp16 rounding (2^-11 relative), and
    a kernel that drops the last row (the ragged tail of the last row block)."""
    wrong = gram(y).clone()
    wrong[1, 1] *= 1 + 2.0**-11
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_gram_within(wrong, y, product_ulps)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_gram_within(gram(y[:-1]), y, product_ulps)
