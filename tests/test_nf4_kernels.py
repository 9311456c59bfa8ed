"""The compiled NF4 / blockwise-8-bit kernels against the PyTorch reference, and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from nf4_cases import BLOCKSIZES, CASES, SHAPES, make_weight

import lowrank_kernels as lk
from lowrank_kernels import ops
from lowrank_kernels.codebooks import NF4_CODE, dynamic_code
from lowrank_kernels.reference import nf4 as ref

CODE = torch.tensor(NF4_CODE, dtype=torch.float64)
HALF_MAX_GAP = float((CODE[1:] - CODE[:-1]).max()) / 2


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_match_reference(shape, blocksize, case, dtype, device):
    w = make_weight(shape, dtype, case).to(device)
    packed, absmax = ops.op("quantize_nf4")(w, blocksize)
    ref_packed, ref_absmax = ref.quantize_nf4_ref(w, blocksize)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    out = ops.op("dequantize_nf4")(packed, absmax, blocksize, w.numel(), dtype)
    assert torch.equal(out, ref.dequantize_nf4_ref(packed, absmax, blocksize, w.numel(), dtype))


def test_reference_decodes_nibbles_in_documented_order():
    # Format fact (ARCHITECTURE.md, notation): two codes per byte, first element in the high nibble.
    packed = torch.tensor([0xF0, 0x7A], dtype=torch.uint8)
    out = ref.dequantize_nf4_ref(packed, torch.tensor([2.0]), 64, 3, torch.float32)
    assert out.tolist() == [2.0 * NF4_CODE[15], 2.0 * NF4_CODE[0], 2.0 * NF4_CODE[7]]


@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    blocksize=st.sampled_from([32, 64, 128, 256, 512, 4096]),
    scale=st.floats(1e-30, 1e30),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_bound_property(rows, cols, blocksize, scale, seed):
    """|W - deq(q(W))| <= half the largest code gap x block absmax, elementwise (fp32)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    q = lk.quantize_nf4(w, blocksize=blocksize)
    err = (w.double() - q.dequantize().double()).abs().reshape(-1)
    bound = q.absmax.double().repeat_interleave(blocksize)[: w.numel()] * HALF_MAX_GAP
    assert bool((err <= bound * (1 + 1e-6) + 1e-45).all())


@given(n=st.integers(1, 2000), seed=st.integers(0, 2**31 - 1))
def test_quantize_picks_nearest_code(n, seed):
    """Each code is a nearest code of x / absmax (a property, independent of the reference)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    packed, absmax = ops.op("quantize_nf4")(w, 64)
    nibbles = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1)[:n].long()
    scaled = w.double() / absmax.double().repeat_interleave(64)[:n]
    dist = (scaled[:, None] - CODE[None, :]).abs()
    chosen = dist.gather(1, nibbles[:, None]).squeeze(1)
    assert bool((chosen <= dist.min(1).values + 1e-6).all())


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000, 4096 + 3])
def test_blockwise8_kernels_match_reference(n, device):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 3).to(device)
    code = dynamic_code(device)
    q, absmax = ops.op("quantize_blockwise8")(x, code, 256)
    ref_q, ref_absmax = ref.quantize_blockwise8_ref(x, code, 256)
    assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)
    out = ops.op("dequantize_blockwise8")(q, absmax, code, 256)
    assert torch.equal(out, ref.dequantize_blockwise8_ref(q, absmax, code, 256))


def test_blockwise8_ties_and_extremes_match_reference(device):
    code = dynamic_code(device)
    mids = (code[:-1] + code[1:]) / 2
    x = torch.cat([torch.ones(1, device=device), mids, code, -torch.ones(1, device=device), code[:1] - 1e-3])
    q, absmax = ops.op("quantize_blockwise8")(x, code, 256)
    ref_q, ref_absmax = ref.quantize_blockwise8_ref(x, code, 256)
    assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)


def test_blockwise8_is_nearest_code_and_matches_bitsandbytes_absmax():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(30000, generator=torch.Generator().manual_seed(0))
    code = dynamic_code()
    q, absmax = ops.op("quantize_blockwise8")(x, code, 256)
    bq, state = bnb_functional.quantize_blockwise(x, blocksize=256)
    assert torch.equal(absmax, state.absmax)
    search = torch.cat([torch.tensor([-1.0]), code[1:]]).double()
    normed = x.double() / absmax.double().repeat_interleave(256)[: x.numel()]
    dist = (normed[:, None] - search[None, :]).abs()
    assert torch.equal(dist.gather(1, q.long()[:, None]).squeeze(1), dist.min(1).values)
    assert (q != bq).float().mean() < 0.005  # bitsandbytes' CPU search misses the nearest code rarely


def test_dequantize_out_variant_writes_in_place(dtype):
    w = make_weight((70, 90), dtype, "normal")
    q = lk.quantize_nf4(w, blocksize=64, double_quant=True)
    out = torch.full_like(w, float("nan"))
    result = q.dequantize(out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, lk.dequantize_nf4(q))


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_large_dequantize_matches_reference(offset):
    """fp32 outputs of >= 8 MiB take the streaming-store path where the output is 64-byte aligned
    (AVX-512 kernels), else the cached path; both give code * absmax, with a partial last block."""
    numel = (8 << 20) // 4 + 96  # 8 MiB of fp32 and a tail that is not a whole block of 64
    w = torch.randn(numel, generator=torch.Generator().manual_seed(3))
    packed, absmax = ops.op("quantize_nf4")(w, 64)
    expected = ref.dequantize_nf4_ref(packed, absmax, 64, numel, torch.float32)
    storage = torch.full((numel + offset,), float("nan"))
    out = storage[offset:]
    ops.op("dequantize_nf4").out(packed, absmax, 64, numel, torch.float32, out=out)
    assert torch.equal(out, expected)
    assert torch.equal(ops.op("dequantize_nf4")(packed, absmax, 64, numel, torch.float32), expected)


def test_empty_weight_round_trips():
    q = lk.quantize_nf4(torch.empty(0, 16), blocksize=64)
    assert q.packed.numel() == 0 and q.absmax.numel() == 0
    assert lk.dequantize_nf4(q).shape == (0, 16)
