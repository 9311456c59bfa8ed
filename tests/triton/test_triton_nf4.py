"""Triton NF4 kernels against the PyTorch reference (and so bitsandbytes), same cases as C++."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from nf4_cases import BLOCKSIZES, CASES, make_weight

from lowrank_kernels.reference import nf4 as ref
from lowrank_kernels.triton import nf4 as triton_nf4
from lowrank_kernels.triton._common import round_to

# The interpreter runs kernels in numpy: keep to the small shapes of the case list.
SHAPES = [(1,), (7,), (64,), (1, 1), (3, 5), (33, 77), (127, 129)]
# 127 x 129 takes 0.5-2 s per case under the interpreter (two thirds of the Triton suite's time):
# the slow tier. 33 x 77 (2541 elements: several programs, ragged last block at every blocksize)
# keeps the multi-block cases in the fast tier.
FAST_SHAPES = [
    pytest.param(shape, id=str(shape), marks=[pytest.mark.slow] if shape == (127, 129) else []) for shape in SHAPES
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", FAST_SHAPES)
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


@triton.jit
def _round_bits_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    bits = tl.load(bits_ptr + offs, mask=offs < n, other=0)
    rounded = round_to(bits.to(tl.float32, bitcast=True), tl.bfloat16)
    tl.store(out_ptr + offs, rounded.to(tl.int16, bitcast=True), mask=offs < n)


# fp32 bit patterns -> the bf16 pattern round-to-nearest-even must give. NaNs from GPU arithmetic
# (0x7FFFFFFF), negative quiet NaNs (0xFFC00000) and signalling NaNs stay NaN (quiet, same sign).
ROUNDING = [
    (0x7FFFFFFF, 0x7FFF),
    (0xFFC00000, 0xFFC0),
    (0x7FC00000, 0x7FC0),
    (0x7F800001, 0x7FC0),
    (0xFFFFFFFF, 0xFFFF),
    (0x7F800000, 0x7F80),
    (0xFF800000, 0xFF80),  # NaNs, then +-inf
    (0x7F7FFFFF, 0x7F80),  # max float rounds up to inf
    (0x3F808000, 0x3F80),
    (0x3F818000, 0x3F82),
    (0x3F808001, 0x3F81),  # ties to even, above a tie
    (0x80000000, 0x8000),
    (0x00000001, 0x0000),  # -0, the smallest subnormal
]


def test_round_to_bf16_keeps_nan_bit_patterns(triton_device):
    bits = torch.tensor([b for b, _ in ROUNDING], dtype=torch.int64).to(torch.int32)  # wraps to int32 bits
    out = torch.empty(len(ROUNDING), dtype=torch.int16)
    bits, out = bits.to(triton_device), out.to(triton_device)
    _round_bits_kernel[(1,)](bits, out, len(ROUNDING), BLOCK=16)
    got = [v & 0xFFFF for v in out.cpu().tolist()]
    assert [hex(v) for v in got] == [hex(e) for _, e in ROUNDING]
    # The same values through torch's own rounding (c10): NaN stays NaN, the rest bit-equal.
    as_float = bits.cpu().view(torch.float32).bfloat16()
    mine = out.cpu().view(torch.bfloat16)
    assert torch.equal(mine.isnan(), as_float.isnan())
    finite = ~as_float.isnan()
    assert torch.equal(mine[finite].view(torch.int16), as_float[finite].view(torch.int16))
