"""The fused NF4 linear kernel ops (C++ CPU) against the fp64 reference, every CPU path (decode
for few tokens, dequantized-panel GEMM for many, in fp32 or, for bf16 activations, in bf16), and
opcheck on every op."""

from __future__ import annotations

import pytest
import torch
from fused_linear_cases import (
    BF16_UNIT_ROUNDOFF,
    FP32_UNIT_ROUNDOFF,
    RANKS,
    SHAPES,
    assert_within,
    cpu_bf16_gemm_serves,
    forward_bound,
    forward_case,
    grad_input_bound,
    grad_input_case,
)
from torch.library import opcheck

import lowrank_kernels
from lowrank_kernels import ops as registry
from lowrank_kernels.reference import nf4_lowrank_linear_grad_input_ref, nf4_lowrank_linear_ref
from lowrank_kernels.reference.nf4 import dequantize_nf4_ref

ops = torch.ops.lowrank_kernels
DECODE_MAX = registry.cpu_decode_max_tokens()
# Token counts on both sides of the decode/GEMM switch, and zero tokens.
TOKENS = [0, 1, 5, DECODE_MAX, DECODE_MAX + 1, 40]


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", ["nf4_lowrank_linear", "nf4_lowrank_gemv"])
def test_forward_matches_reference(op, shape, m, r, with_bias, dtype):
    args = forward_case(*shape, m, r, dtype, with_bias)
    ref = nf4_lowrank_linear_ref(*args)
    bf16_path = op == "nf4_lowrank_linear" and cpu_bf16_gemm_serves(dtype, m)
    assert_within(getattr(ops, op)(*args), ref, forward_bound(args, ref, bf16_operands=bf16_path))


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grad_input_matches_reference(shape, m, r, dtype):
    args = grad_input_case(*shape, m, r, dtype)
    ref = nf4_lowrank_linear_grad_input_ref(*args)
    bound = grad_input_bound(args, ref, bf16_operands=cpu_bf16_gemm_serves(dtype, m))
    assert_within(ops.nf4_lowrank_linear_grad_input(*args), ref, bound)


# ---- the bf16 GEMM path (bf16 activations, many tokens), forced on or off on any CPU ------------

BF16_GEMM_TOKENS = [DECODE_MAX + 1, 40]


@pytest.fixture(params=["on", "off"])
def bf16_gemm(request, monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNELS_CPU_BF16_GEMM", request.param)
    return request.param == "on"


def test_bf16_gemm_mode_follows_the_environment(monkeypatch):
    """auto is on exactly where the avx512 kernels run on a CPU with AVX512-BF16 (the kernel's
    flags in /proc/cpuinfo); on / off force it; anything else is refused by name."""
    monkeypatch.delenv("LOWRANK_KERNELS_CPU_BF16_GEMM", raising=False)
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    hardware = lowrank_kernels.build_info()["cpu_simd"] == "avx512" and "avx512_bf16" in flags
    assert registry.cpu_bf16_gemm() is bool(hardware)
    for value, expected in (("auto", bool(hardware)), ("on", True), ("off", False)):
        monkeypatch.setenv("LOWRANK_KERNELS_CPU_BF16_GEMM", value)
        assert registry.cpu_bf16_gemm() is expected and lowrank_kernels.build_info()["cpu_bf16_gemm"] is expected
    monkeypatch.setenv("LOWRANK_KERNELS_CPU_BF16_GEMM", "fast")
    args = forward_case(37, 100, 64, 40, 3, torch.bfloat16, True)
    with pytest.raises(RuntimeError, match="LOWRANK_KERNELS_CPU_BF16_GEMM must be auto, on or off.*got 'fast'"):
        ops.nf4_lowrank_linear(*args)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m", BF16_GEMM_TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_forward_either_gemm_matches_reference(bf16_gemm, shape, m, r, with_bias):
    args = forward_case(*shape, m, r, torch.bfloat16, with_bias)
    ref = nf4_lowrank_linear_ref(*args)
    assert_within(ops.nf4_lowrank_linear(*args), ref, forward_bound(args, ref, bf16_operands=bf16_gemm))


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m", BF16_GEMM_TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bf16_grad_input_either_gemm_matches_reference(bf16_gemm, shape, m, r):
    args = grad_input_case(*shape, m, r, torch.bfloat16)
    ref = nf4_lowrank_linear_grad_input_ref(*args)
    bound = grad_input_bound(args, ref, bf16_operands=bf16_gemm)
    assert_within(ops.nf4_lowrank_linear_grad_input(*args), ref, bound)


def test_the_gemm_path_starts_right_above_the_reported_decode_max(monkeypatch):
    """The bf16 GEMM mode changes the GEMM path's bf16 results but not the decode path's, so it
    shows where the switch really is: decode at cpu_decode_max_tokens() tokens, GEMM one above."""
    outputs = {}
    for m in (DECODE_MAX, DECODE_MAX + 1):
        args = forward_case(64, 128, 64, m, 3, torch.bfloat16, True)
        for mode in ("on", "off"):
            monkeypatch.setenv("LOWRANK_KERNELS_CPU_BF16_GEMM", mode)
            outputs[m, mode] = ops.nf4_lowrank_linear(*args)
    assert torch.equal(outputs[DECODE_MAX, "on"], outputs[DECODE_MAX, "off"])
    assert not torch.equal(outputs[DECODE_MAX + 1, "on"], outputs[DECODE_MAX + 1, "off"])


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def _assert_one_rounding(y, exact, magnitude, inner):
    """|y - exact| <= gamma * magnitude (fp32 accumulation, any order) + u_bf16 * |result|."""
    gamma = (inner + 4) * FP32_UNIT_ROUNDOFF
    bound = gamma * magnitude + BF16_UNIT_ROUNDOFF * (exact.abs() + gamma * magnitude) + 1e-30
    assert_within(y, exact.to(y.dtype), bound.to(torch.float64))


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", [(64, 128, 64), (37, 100, 64), (130, 64, 128), (5, 257, 32)], ids=str)
def test_bf16_gemm_rounds_the_extended_product_once(monkeypatch, shape, with_bias):
    """The bf16 GEMM's documented semantics: each output is [x, bf16(s lx), 1] . [bf16(W), up, bias]
    (dx: [gy, bf16(s lg)] . [bf16(W); down]) accumulated in fp32 and rounded to bf16 once: within
    u = 2^-8 of the exact extended product. The fp32 GEMM path (W not rounded) misses this bound
    by 30-130x, so passing it shows the bf16 path ran."""
    monkeypatch.setenv("LOWRANK_KERNELS_CPU_BF16_GEMM", "on")
    n, k, blocksize = shape
    x, packed, absmax, _, _, lx, up, scale, bias = forward_case(n, k, blocksize, 40, 3, torch.bfloat16, with_bias)
    w = _bf16(dequantize_nf4_ref(packed, absmax, blocksize, n * k, torch.float32).view(n, k))
    slx = _bf16(scale * lx.float())
    exact = x.double() @ w.T + slx @ up.double().T + (bias.double() if with_bias else 0.0)
    magnitude = x.double().abs() @ w.abs().T + slx.abs() @ up.double().abs().T
    magnitude = magnitude + (bias.double().abs() if with_bias else 0.0)
    _assert_one_rounding(
        ops.nf4_lowrank_linear(x, packed, absmax, blocksize, n, lx, up, scale, bias), exact, magnitude, k + 4
    )

    gy, packed, absmax, _, _, lg, down, scale = grad_input_case(n, k, blocksize, 40, 3, torch.bfloat16)
    w = _bf16(dequantize_nf4_ref(packed, absmax, blocksize, n * k, torch.float32).view(n, k))
    slg = _bf16(scale * lg.float())
    exact = gy.double() @ w + slg @ down.double()
    magnitude = gy.double().abs() @ w.abs() + slg.abs() @ down.double().abs()
    dx = ops.nf4_lowrank_linear_grad_input(gy, packed, absmax, blocksize, k, lg, down, scale)
    _assert_one_rounding(dx, exact, magnitude, n + 3)


@pytest.mark.parametrize("m", [3, 40])
def test_bound_catches_a_wrong_kernel(m):
    """The error bound is tight enough to fail a kernel that gets one weight nibble wrong."""
    args = list(forward_case(37, 100, 64, m, 3, torch.float32, True))
    ref = nf4_lowrank_linear_ref(*args)
    packed = args[1].clone()
    packed[17] ^= 0x10  # one element's code off by one step
    wrong = ops.nf4_lowrank_linear(args[0], packed, *args[2:])
    with pytest.raises(AssertionError, match="exceeds the bound"):
        assert_within(wrong, ref, forward_bound(tuple(args), ref))


def test_non_contiguous_operands():
    x, packed, absmax, bs, n, lx, up, scale, bias = forward_case(37, 100, 64, 20, 3, torch.float32, True)
    args = (x.T.contiguous().T, packed, absmax, bs, n, lx.T.contiguous().T, up.T.contiguous().T, scale, bias)
    ref = nf4_lowrank_linear_ref(*args)
    for op in (ops.nf4_lowrank_linear, ops.nf4_lowrank_gemv):
        assert_within(op(*args), ref, forward_bound(args, ref))


def test_empty_weight_dimensions():
    """in_features = 0: y is the low-rank term plus bias; out_features = 0: an empty result."""
    x, packed, absmax, bs, n, lx, up, scale, bias = forward_case(8, 0, 64, 4, 2, torch.float32, True)
    for op in (ops.nf4_lowrank_linear, ops.nf4_lowrank_gemv):
        y = op(x, packed, absmax, bs, n, lx, up, scale, bias)
        torch.testing.assert_close(y, scale * lx @ up.T + bias)
    args = forward_case(0, 16, 64, 4, 2, torch.float32, False)
    assert ops.nf4_lowrank_linear(*args).shape == (4, 0)


@pytest.mark.parametrize("m", [2, 40])
def test_opcheck_kernel_ops(m):
    fwd = forward_case(37, 100, 64, m, 3, torch.float32, True)
    opcheck(ops.nf4_lowrank_linear, fwd)
    opcheck(ops.nf4_lowrank_gemv, fwd)
    opcheck(ops.nf4_lowrank_linear_grad_input, grad_input_case(37, 100, 64, m, 3, torch.float32))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [2, 40])
def test_opcheck_autograd_op(m, with_bias):
    x, packed, absmax, bs, n, _, _, _, bias = forward_case(37, 100, 64, m, 3, torch.float32, with_bias)
    A = torch.randn(n, 3, requires_grad=True)
    B = torch.randn(3, 100, requires_grad=True)
    if bias is not None:
        bias.requires_grad_()
    opcheck(ops.fused_pissa_linear_nf4, (x.requires_grad_(), packed, absmax, bs, A, B, bias, 0.5))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda a: (a["x"][:, :-1],), "packed must hold"),
        (lambda a: (a["x"].double(),), "x must be float32"),
        (lambda a: (a["x"], a["packed"].int()), "packed must be uint8"),
        (lambda a: (a["x"], a["packed"], a["absmax"][:-1]), "absmax must hold"),
        (lambda a: (a["x"], a["packed"], a["absmax"], 48), "blocksize must be a power of two"),
        (
            lambda a: (a["x"], a["packed"], a["absmax"], 64, 37, a["lx"][:-1]),
            r"lowrank_x must be a matrix of shape \[5",
        ),
        (
            lambda a: (a["x"], a["packed"], a["absmax"], 64, 37, a["lx"], a["up"][:, :2]),
            r"up must be a matrix of shape \[37, 3\]",
        ),
        (lambda a: (a["x"], a["packed"], a["absmax"], 64, 37, a["lx"], a["up"].half()), "up must be Float"),
        (
            lambda a: (a["x"], a["packed"], a["absmax"], 64, 37, a["lx"], a["up"], 1.0, a["bias"][:3]),
            "bias must be a Float vector of 37",
        ),
    ],
)
def test_kernel_op_rejects_bad_arguments(call, message):
    x, packed, absmax, bs, n, lx, up, scale, bias = forward_case(37, 100, 64, 5, 3, torch.float32, True)
    named = dict(x=x, packed=packed, absmax=absmax, lx=lx, up=up, bias=bias)
    defaults = (x, packed, absmax, bs, n, lx, up, scale, bias)
    given = call(named)
    args = given + defaults[len(given) :]
    for op in (ops.nf4_lowrank_linear, ops.nf4_lowrank_gemv):
        with pytest.raises(RuntimeError, match=message):
            op(*args)


def test_grad_input_op_rejects_bad_down():
    grad_y, packed, absmax, bs, k, lg, down, scale = grad_input_case(37, 100, 64, 5, 3, torch.float32)
    with pytest.raises(RuntimeError, match=r"down must be a matrix of shape \[3, 100\]"):
        ops.nf4_lowrank_linear_grad_input(grad_y, packed, absmax, bs, k, lg, down[:, :-1], scale)
