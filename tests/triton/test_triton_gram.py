"""Triton Gram kernel against the fp64 oracle.

Same tolerance as the C++ kernel's tests (tests/test_gram_kernels.py): G is a sum of m exact
fp32 products accumulated in fp32 (tl.dot steps, then the sum of the row chunks) and the oracle
is the exact value rounded once, so elementwise

    |G - gram_ref(y)| <= (m + 2) * 2^-24 * (|y|ᵀ |y|),

checked to fail a result with one element perturbed or one row dropped. fp32 inputs: products are
not exact, and on GPUs they are 3xTF32 (lowrank_kernels/triton/tiling.py, within 6 fp32 ulps =
12 * 2^-24 of |y_i||y_j| each), so the bound grows by that; the interpreter computes the dots in
fp32, where it is slack. Under the interpreter
the tile is 16 x 16 with 16 rows per step; the shapes exceed it in every dimension somewhere,
and the chunk size is lowered so that several row chunks are summed.
"""
from __future__ import annotations

import math

import pytest
import torch

from lowrank_kernels.reference.decompose import gram_ref
from lowrank_kernels.triton import gram as tgram

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (leading dims, m, k): k = 1, odd k off the 16-wide tile (3, 17, 33), a single row, m off every
# block size, batched 3-D and 4-D.
SHAPES = [
    ((), 1, 1),
    ((), 37, 3),
    ((), 100, 17),
    ((), 1, 20),
    ((), 75, 33),
    ((3,), 29, 16),
    ((2, 2), 50, 9),
]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 32 rows (at least 8k): the chunk loop and the torch.sum of chunks run on
    interpreter-sized shapes."""
    monkeypatch.setattr(tgram, "_MIN_CHUNK_ROWS", 32)


def make_y(lead, m, k, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((*lead, m, k), generator=gen).to(dtype).to(device)


def assert_within(g: torch.Tensor, y: torch.Tensor) -> None:
    y64 = y.double().cpu()
    ref = gram_ref(y64).double()
    tf32x3 = 12 if y.dtype == torch.float32 else 0
    bound = (y.shape[-2] + 2 + tf32x3) * 2.0**-24 * (y64.abs().mT @ y64.abs())
    assert g.shape == ref.shape and g.dtype == torch.float32
    err = (g.double().cpu() - ref).abs()
    over = err > bound
    assert not over.any(), f"error {err[over].max().item():.3g} exceeds the bound at {over.nonzero()[0].tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("lead, m, k", SHAPES, ids=str)
def test_matches_reference(lead, m, k, dtype, triton_device):
    y = make_y(lead, m, k, dtype, triton_device)
    g = tgram.gram(y)
    assert_within(g, y)
    assert torch.equal(g, g.mT)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("lead, m, k", [((), 150, 17), ((2,), 401, 20)], ids=str)
def test_row_chunks(lead, m, k, dtype, triton_device, small_chunks):
    assert tgram._chunking(math.prod(lead), m, k)[1] > 1
    y = make_y(lead, m, k, dtype, triton_device)
    g = tgram.gram(y)
    assert_within(g, y)
    assert torch.equal(g, g.mT)
    assert torch.equal(g, tgram.gram(y))  # deterministic: no atomics


@pytest.mark.parametrize(
    "view",
    [lambda t: t.mT.contiguous().mT, lambda t: t[:, ::2, 1:], lambda t: t[..., ::3]],
    ids=["transposed", "sliced", "col-strided"],
)
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
    wrong = tgram.gram(y).clone()
    wrong[1, 1] *= 1 + 2.0**-11  # an fp16 rounding of one element
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_within(wrong, y)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_within(tgram.gram(y[:-1]), y)


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
