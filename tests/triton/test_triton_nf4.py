"""Triton NF4 kernels against the PyTorch reference (and so bitsandbytes), same cases as C++."""
from __future__ import annotations

import pytest
import torch

from lowrank_kernels.reference import nf4 as ref
from lowrank_kernels.triton import nf4 as triton_nf4
from nf4_cases import BLOCKSIZES, CASES, make_weight

# The interpreter runs kernels in numpy: keep to the small shapes of the case list.
SHAPES = [(1,), (7,), (64,), (1, 1), (3, 5), (33, 77), (127, 129)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_matches_reference(shape, blocksize, case, dtype, triton_device):
    w = make_weight(shape, dtype, case).to(triton_device)
    packed, absmax = triton_nf4.quantize_nf4(w, blocksize)
    ref_packed, ref_absmax = ref.quantize_nf4_ref(w, blocksize)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_absmax)
    out = triton_nf4.dequantize_nf4(ref_packed, ref_absmax, blocksize, w.numel(), dtype)
    assert torch.equal(out, ref.dequantize_nf4_ref(ref_packed, ref_absmax, blocksize, w.numel(), dtype))


def test_triton_flags_non_finite_blocks(triton_device):
    w = torch.randn(4, 64, device=triton_device)
    w[2, 5] = float("nan")
    w[3, 1] = float("inf")
    _, absmax = triton_nf4.quantize_nf4(w, 64)
    assert torch.isfinite(absmax).tolist() == [True, True, False, False]


def test_triton_agrees_with_cpp_kernels(triton_device):
    import lowrank_kernels as lk

    w = make_weight((100, 200), torch.bfloat16, "normal", seed=5)
    q = lk.quantize_nf4(w, 128)
    packed, absmax = triton_nf4.quantize_nf4(w.to(triton_device), 128)
    assert torch.equal(packed.cpu(), q.packed) and torch.equal(absmax.cpu(), q.absmax)
    out = triton_nf4.dequantize_nf4(packed, absmax, 128, w.numel(), torch.bfloat16)
    assert torch.equal(out.cpu().view(w.shape), q.dequantize())


def test_triton_launcher_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        triton_nf4.quantize_nf4(torch.randn(64), 64)
