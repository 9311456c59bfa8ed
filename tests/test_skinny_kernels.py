"""The skinny_matmul op's C++ CPU kernel, w @ x or wᵀ @ x in fp32, against the fp64 reference.

The tolerance is a worst-case bound, per element: each result element is one fp32 FMA chain
over the K = N (w @ x) or K = M (wᵀ @ x) products (bf16/fp16 widen exactly), so

    |got - ref| <= (K + 4) * 2^-24 * (|w| @ |x|)

elementwise. It is checked to be discriminative: one element perturbed, or the last term of
the reduction dropped, fails it.
"""

from __future__ import annotations

import pytest
import torch

import lowrank_kernels  # noqa: F401  (loads the compiled ops)

ops = torch.ops.lowrank_kernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (leading dims, M, N, width): odd sizes off every block (64 rows, 24/192 columns, 128-row blocks,
# 8-float vectors, 1-3 vector chunks), width = 1 .. 100, batched 3-D and 4-D.
SHAPES = [
    ((), 1, 1, 1),
    ((), 5, 7, 3),
    ((), 37, 300, 16),
    ((), 130, 257, 24),
    ((), 67, 1000, 33),
    ((), 300, 211, 64),
    ((), 129, 77, 100),
    ((), 3, 2100, 40),
    ((), 2100, 3, 17),
    ((4,), 65, 50, 8),
    ((2, 3), 31, 45, 12),
]


def make(lead, m, n, width, dtype, transpose_w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((*lead, m, n), generator=gen).to(dtype)
    x = torch.randn((*lead, m if transpose_w else n, width), generator=gen)
    return w, x


def reference(w, x, transpose_w):
    wd = w.double()
    return (wd.mT if transpose_w else wd) @ x.double()


def bound(w, x, transpose_w):
    a = w.double().abs()
    k = w.shape[-2] if transpose_w else w.shape[-1]
    return (k + 4) * 2.0**-24 * ((a.mT if transpose_w else a) @ x.double().abs())


def excess(got, w, x, transpose_w):
    ref = reference(w, x, transpose_w)
    assert got.shape == ref.shape and got.dtype == torch.float32
    return (got.double() - ref).abs() - bound(w, x, transpose_w)


def assert_within(got, w, x, transpose_w):
    over = excess(got, w, x, transpose_w) > 0
    assert not over.any(), f"error exceeds the bound at {over.nonzero()[0].tolist()}"


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, m, n, width", SHAPES, ids=str)
def test_matches_reference(lead, m, n, width, dtype, transpose_w):
    w, x = make(lead, m, n, width, dtype, transpose_w)
    assert_within(ops.skinny_matmul(w, x, transpose_w), w, x, transpose_w)


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("width", [16, 24, 32, 48, 64, 128])
def test_large(width, transpose_w):
    w, x = make((), 700, 1500, width, torch.bfloat16, transpose_w, seed=width)
    assert_within(ops.skinny_matmul(w, x, transpose_w), w, x, transpose_w)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_bound_is_discriminative(transpose_w):
    w, x = make((), 70, 90, 20, torch.float32, transpose_w)
    got = ops.skinny_matmul(w, x, transpose_w)
    assert_within(got, w, x, transpose_w)
    bad = got.clone()
    bad[3, 5] += 1e-3 * (1 + bad[3, 5].abs())
    assert (excess(bad, w, x, transpose_w) > 0).any()
    # Dropping the last term of the reduction.
    if transpose_w:
        short = ops.skinny_matmul(w[:-1], x[:-1], True)
    else:
        short = ops.skinny_matmul(w[:, :-1], x[:-1], False)
    assert (excess(short, w, x, transpose_w) > 0).any()


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(dtype, transpose_w):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(3, 90, 70, generator=gen).to(dtype).mT[:, ::1, :]  # [3, 70, 90] transposed view
    w = w[:, 1:, ::2]  # strided too: [3, 69, 45]
    assert not w.is_contiguous()
    k = w.shape[-2] if transpose_w else w.shape[-1]
    x = torch.randn(3, 2 * k, 19, generator=gen)[:, ::2]  # non-contiguous x
    assert_within(ops.skinny_matmul(w, x, transpose_w), w, x, transpose_w)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_deterministic_and_thread_independent(transpose_w):
    w, x = make((2,), 300, 500, 40, torch.float32, transpose_w)
    first = ops.skinny_matmul(w, x, transpose_w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.skinny_matmul(w, x, transpose_w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)
    assert torch.equal(first, ops.skinny_matmul(w, x, transpose_w))


@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize(
    "wshape, width",
    [((0, 5), 3), ((5, 0), 3), ((4, 6), 0), ((0, 4, 6), 2), ((2, 0, 0), 2)],
    ids=str,
)
def test_empty(wshape, width, transpose_w):
    w = torch.randn(wshape)
    k = wshape[-2] if transpose_w else wshape[-1]
    x = torch.randn(*wshape[:-2], k, width)
    got = ops.skinny_matmul(w, x, transpose_w)
    ref = (w.mT if transpose_w else w) @ x
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.equal(got, ref)  # zeros where K == 0


def test_errors():
    w = torch.randn(6, 5)
    with pytest.raises(RuntimeError, match="w must have at least 2 dimensions"):
        ops.skinny_matmul(torch.randn(5), torch.randn(5, 2), False)
    with pytest.raises(RuntimeError, match="w must be float32, float16 or bfloat16"):
        ops.skinny_matmul(w.double(), torch.randn(5, 2), False)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.skinny_matmul(w, torch.randn(5, 2).bfloat16(), False)
    with pytest.raises(RuntimeError, match=r"x must have shape \[..., 5, l\]"):
        ops.skinny_matmul(w, torch.randn(6, 2), False)
    with pytest.raises(RuntimeError, match=r"x must have shape \[..., 6, l\]"):
        ops.skinny_matmul(w, torch.randn(5, 2), True)
    with pytest.raises(RuntimeError, match="same number of dimensions"):
        ops.skinny_matmul(w, torch.randn(1, 5, 2), False)
    with pytest.raises(RuntimeError, match="batch dims of w"):
        ops.skinny_matmul(torch.randn(2, 6, 5), torch.randn(3, 5, 2), False)
