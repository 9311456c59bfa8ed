"""Triton Gram kernel against the fp64 oracle, under the bound of tests/gram_cases.py (shared
with the C++ kernel's tests). fp32 inputs: the products are not exact, and on GPUs they are
3xTF32 (lowrank_kernels/triton/tiling.py), so the bound grows by 12 ulps per product; the
interpreter computes the dots in fp32, where it is slack. Under the interpreter the tile is
16 x 16 with 16 rows per step; the shapes exceed it in every dimension somewhere, and the chunk
size is lowered so that several row chunks are summed.
"""

from __future__ import annotations

import math

import pytest
import torch
from gram_cases import NON_CONTIGUOUS_VIEWS, SHAPES, assert_bound_catches_wrong_results, assert_gram_within, make_y

from lowrank_kernels.triton import gram as tgram

#: 3xTF32 products are within 6 fp32 ulps (12 * 2^-24) of |y_i||y_j| each.
TF32X3_PRODUCT_ULPS = 12


def assert_within(g: torch.Tensor, y: torch.Tensor) -> None:
    assert_gram_within(g, y, TF32X3_PRODUCT_ULPS if y.dtype == torch.float32 else 0)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 32 rows (at least 8k): the chunk loop and the torch.sum of chunks run on
    interpreter-sized shapes."""
    monkeypatch.setattr(tgram, "_MIN_CHUNK_ROWS", 32)


@pytest.mark.parametrize("lead, m, k", SHAPES, ids=str)
def test_matches_reference(lead, m, k, dtype, triton_device):
    y = make_y(lead, m, k, dtype, triton_device)
    g = tgram.gram(y)
    assert_within(g, y)
    assert torch.equal(g, g.mT)


@pytest.mark.parametrize("lead, m, k", [((), 150, 17), ((2,), 401, 20)], ids=str)
def test_row_chunks(lead, m, k, dtype, triton_device, small_chunks):
    assert tgram._chunking(math.prod(lead), m, k)[1] > 1
    y = make_y(lead, m, k, dtype, triton_device)
    g = tgram.gram(y)
    assert_within(g, y)
    assert torch.equal(g, g.mT)
    assert torch.equal(g, tgram.gram(y))  # deterministic: no atomics


@pytest.mark.parametrize("view", NON_CONTIGUOUS_VIEWS.values(), ids=list(NON_CONTIGUOUS_VIEWS))
def test_non_contiguous(view, triton_device):
    y = view(make_y((2,), 61, 40, torch.bfloat16, triton_device))
    assert not y.is_contiguous()
    g = tgram.gram(y)
    assert_within(g, y)
    assert torch.equal(g, g.mT)


def test_empty_dimensions(triton_device):
    g = tgram.gram(torch.empty(0, 5, device=triton_device))
    assert g.dtype == torch.float32 and g.shape == (5, 5) and g.eq(0).all()
    assert tgram.gram(torch.empty(2, 0, 5, dtype=torch.float16, device=triton_device)).eq(0).all()
    assert tgram.gram(torch.empty(7, 0, device=triton_device)).shape == (0, 0)
    assert tgram.gram(torch.empty(0, 7, 4, device=triton_device)).shape == (0, 4, 4)


def test_bound_catches_wrong_results(triton_device):
    y = make_y((), 100, 17, torch.float32, triton_device)
    assert_bound_catches_wrong_results(tgram.gram, y, TF32X3_PRODUCT_ULPS)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: torch.randn(5, device=d), r"got shape \(5,\), dtype torch.float32"),
        (lambda d: torch.ones(4, 3, dtype=torch.int64, device=d), r"got shape \(4, 3\), dtype torch.int64"),
        (lambda d: torch.ones(4, 3, dtype=torch.float64, device=d), "dtype torch.float64"),
    ],
    ids=["1-D", "int64", "float64"],
)
def test_rejects_bad_input(make, message, triton_device):
    with pytest.raises(ValueError, match=message):
        tgram.gram(make(triton_device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors are accepted under the interpreter")
def test_rejects_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="y must be a CUDA tensor"):
        tgram.gram(torch.randn(8, 4))
