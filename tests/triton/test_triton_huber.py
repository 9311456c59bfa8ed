"""Triton huber_weights against the fp64 reference under the same residual bound as the C++
kernel: dtypes, odd shapes spanning several tiles, batches with per-matrix deltas, errors; and
the op's CUDA registration routing to it."""

from __future__ import annotations

import pytest
import torch
from huber_cases import CASES, assert_matches_reference, make_inputs

from lowrank_kernels.triton import huber as triton_huber

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference(case, dtype, triton_device):
    inputs = make_inputs(*case, dtype, device=triton_device)
    assert_matches_reference(triton_huber.huber_weights(*inputs), *inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_rank_spans_several_chunks(dtype, triton_device):
    """r = 70: three BLOCK_R = 32 chunks of the rank loop, the last one masked."""
    inputs = make_inputs((), 37, 45, 70, dtype, device=triton_device)
    assert_matches_reference(triton_huber.huber_weights(*inputs), *inputs)


def test_triton_batch_elements_are_independent(triton_device):
    W, A, B, wd, ld = make_inputs((3,), 40, 70, 5, torch.float32, device=triton_device)
    batched = triton_huber.huber_weights(W, A, B, wd, ld)
    single = triton_huber.huber_weights(W[2], A[2], B[2], wd[2], ld[2])
    for b, s in zip(batched, single):
        assert torch.equal(b[2], s)


def test_triton_empty_matrix_gives_zero_sums(triton_device):
    omega, psi, stats = triton_huber.huber_weights(
        *(torch.empty(s, device=triton_device) for s in [(2, 0, 5), (2, 0, 3), (2, 3, 5)]),
        torch.ones(2, device=triton_device),
        torch.ones(2, device=triton_device),
    )
    assert omega.shape == (2, 0, 5) and stats.shape == (2, 2) and not stats.any()


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda W, A, B, d: (W.int(), A, B, d, d), "w must be a float32"),
        (lambda W, A, B, d: (W, A.double(), B, d, d), "a must be float32"),
        (lambda W, A, B, d: (W, A, B[..., :3], d, d), "b float32"),
        (lambda W, A, B, d: (W, A, B, d[:1], d), "weight_delta must be float32"),
    ],
    ids=["int-w", "double-a", "b-cols", "delta-shape"],
)
def test_triton_bad_arguments_raise(args, match, triton_device):
    W, A, B, wd, _ = make_inputs((2,), 6, 7, 3, torch.float32, device=triton_device)
    with pytest.raises(RuntimeError, match=match):
        triton_huber.huber_weights(*args(W, A, B, wd))


def test_cuda_registration_routes_to_triton(triton_device, monkeypatch):
    """The op's CUDA kernel (_registry.huber_weights_cuda) is this Triton kernel."""
    from lowrank_kernels import _registry

    inputs = make_inputs((2,), 20, 33, 4, torch.float32, device=triton_device)
    calls = []
    real = triton_huber.huber_weights
    monkeypatch.setattr(triton_huber, "huber_weights", lambda *a: calls.append(1) or real(*a))
    assert_matches_reference(_registry.huber_weights_cuda(*inputs), *inputs)
    assert calls
