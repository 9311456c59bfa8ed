"""The gram op's C++ CPU kernel, G = yᵀ y in fp32, against the fp64 reference under the
worst-case elementwise bound of tests/gram_cases.py (FMA chains: the products are exact), checked
there to fail a result with one element perturbed or the last row of y dropped.
"""

from __future__ import annotations

import pytest
import torch
from gram_cases import (
    NON_CONTIGUOUS_VIEWS,
    ROW_PART_SHAPES,
    SHAPES,
    assert_bound_catches_wrong_results,
    assert_gram_within,
    make_y,
)
from torch.library import opcheck

import lowrank_kernels  # noqa: F401  (loads the compiled ops)

ops = torch.ops.lowrank_kernels


@pytest.mark.parametrize("lead, m, k", SHAPES + ROW_PART_SHAPES, ids=str)
def test_matches_reference(lead, m, k, dtype):
    y = make_y(lead, m, k, dtype)
    g = ops.gram(y)
    assert_gram_within(g, y)
    assert torch.equal(g, g.mT)  # mirrored, not computed twice


def test_scaled_columns():
    """Columns of very different magnitudes (an ill-conditioned block): the bound is relative
    to |y|ᵀ|y| elementwise, so small entries are checked at their own scale."""
    y = make_y((), 700, 20, torch.float32) * torch.logspace(-6, 6, 20)
    g = ops.gram(y)
    assert_gram_within(g, y)
    assert torch.equal(g, g.mT)


@pytest.mark.parametrize("view", NON_CONTIGUOUS_VIEWS.values(), ids=list(NON_CONTIGUOUS_VIEWS))
def test_non_contiguous(view, dtype):
    y = view(make_y((3,), 211, 28, dtype))
    assert not y.is_contiguous()
    g = ops.gram(y)
    assert_gram_within(g, y)
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
    assert_bound_catches_wrong_results(ops.gram, make_y((), m, k, torch.float32))


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
