"""The gram op's C++ CPU kernel, G = yᵀ y in fp32, against the fp64 reference.

The tolerance is a worst-case bound, per element: G is a sum of m products of fp32 values
(bf16/fp16 widen exactly), accumulated in fp32 by FMA chains over row parts plus a short sum of
the parts, and the reference is the exact value rounded once to fp32, so

    |G - gram_ref(y)| <= (m + 2) * 2^-24 * (|y|ᵀ |y|)

elementwise. It is checked to be discriminative: one element perturbed, or the last row of y
dropped, fails it.
"""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import lowrank_kernels  # noqa: F401  (loads the compiled ops)
from lowrank_kernels.reference.decompose import gram_ref

ops = torch.ops.lowrank_kernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (leading dims, m, k): k = 1, odd k, k on and off the 8-column panels, m off every block size,
# a single row, batched 3-D and 4-D, and shapes split into several row parts.
SHAPES = [
    ((), 1, 1),
    ((), 37, 3),
    ((), 300, 17),
    ((), 1000, 33),
    ((), 129, 8),
    ((), 1, 24),
    ((), 257, 40),
    ((), 4099, 26),
    ((), 2500, 144),
    ((5,), 77, 9),
    ((2, 3), 130, 18),
    ((3,), 1500, 31),
]


def make_y(lead, m, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((*lead, m, k), generator=gen).to(dtype)


def bound(y: torch.Tensor) -> torch.Tensor:
    a = y.double().abs()
    return (y.shape[-2] + 2) * 2.0**-24 * (a.mT @ a)


def assert_within(g: torch.Tensor, y: torch.Tensor) -> None:
    ref = gram_ref(y)
    assert g.shape == ref.shape and g.dtype == torch.float32
    err = (g.double() - ref.double()).abs()
    over = err > bound(y)
    assert not over.any(), f"error {err[over].max().item():.3g} exceeds the bound at {over.nonzero()[0].tolist()}"


@pytest.mark.parametrize("lead, m, k", SHAPES, ids=str)
def test_matches_reference(lead, m, k, dtype):
    y = make_y(lead, m, k, dtype)
    g = ops.gram(y)
    assert_within(g, y)
    assert torch.equal(g, g.mT)  # mirrored, not computed twice


def test_scaled_columns():
    """Columns of very different magnitudes (an ill-conditioned block): the bound is relative
    to |y|ᵀ|y| elementwise, so small entries are checked at their own scale."""
    y = make_y((), 700, 20, torch.float32) * torch.logspace(-6, 6, 20)
    g = ops.gram(y)
    assert_within(g, y)
    assert torch.equal(g, g.mT)


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t.mT.contiguous().mT,          # column-major: rows contiguous
        lambda t: t[:, ::2, 1:],                 # strided rows, offset columns
        lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),  # batch dim innermost-but-one
        lambda t: t[..., ::3],                   # column stride 3
    ],
    ids=["transposed", "sliced", "batch-strided", "col-strided"],
)
def test_non_contiguous(view, dtype):
    y = view(make_y((3,), 211, 28, dtype))
    assert not y.is_contiguous()
    g = ops.gram(y)
    assert_within(g, y)
    assert torch.equal(g, ops.gram(y.contiguous()))  # same arithmetic whatever the layout


def test_empty_dimensions(dtype):
    g = ops.gram(torch.empty(0, 5, dtype=dtype))
    assert g.dtype == torch.float32 and torch.equal(g, torch.zeros(5, 5))
    assert ops.gram(torch.empty(2, 0, 5, dtype=dtype)).eq(0).all()
    assert ops.gram(torch.empty(7, 0, dtype=dtype)).shape == (0, 0)
    assert ops.gram(torch.empty(0, 7, 4, dtype=dtype)).shape == (0, 4, 4)


def test_deterministic():
    y = make_y((), 6000, 50, torch.bfloat16)
    g = ops.gram(y)
    assert torch.equal(g, ops.gram(y.clone()))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the row parts depend on the shape only, not the thread count
        assert torch.equal(g, ops.gram(y))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("m, k", [(300, 17), (4099, 26)])
def test_bound_catches_wrong_results(m, k):
    """The bound fails a result with one element off by an fp16 rounding (2^-11 relative), and a
    kernel that drops the last row (the ragged tail of the last row block)."""
    y = make_y((), m, k, torch.float32)
    g = ops.gram(y)
    wrong = g.clone()
    wrong[1, 1] *= 1 + 2.0**-11
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_within(wrong, y)
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_within(ops.gram(y[:-1]), y)


@pytest.mark.parametrize(
    "y, message",
    [
        (torch.randn(5), r"at least 2 dimensions .*shape \[5\] and dtype Float"),
        (torch.ones(4, 3, dtype=torch.int64), r"y must be float32, float16 or bfloat16, got Long with shape \[4, 3\]"),
        (torch.ones(4, 3, dtype=torch.float64), r"got Double with shape \[4, 3\]"),
    ],
    ids=["1-D", "int64", "float64"],
)
def test_rejects_bad_input(y, message):
    with pytest.raises(RuntimeError, match=message):
        ops.gram(y)


def _has_fake_kernel() -> bool:
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        import lowrank_kernels.decompose  # noqa: F401  (registers the decomposition ops' fake kernels)
    except Exception:  # noqa: BLE001  (the module is optional here: the test then skips)
        return False
    try:
        with FakeTensorMode():
            ops.gram(torch.empty(4, 3))
    except Exception:  # noqa: BLE001  (no fake kernel: FakeTensorMode raises its own errors)
        return False
    return True


@pytest.mark.parametrize("shape", [(50, 7), (2, 30, 9)], ids=str)
def test_opcheck_schema_and_autograd(shape):
    opcheck(ops.gram, (torch.randn(shape),), test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("shape", [(50, 7), (2, 30, 9)], ids=str)
def test_opcheck_fake(shape):
    if not _has_fake_kernel():
        pytest.skip("fake kernel registered by lowrank_kernels.decompose (lead)")
    opcheck(ops.gram, (torch.randn(shape),), test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
