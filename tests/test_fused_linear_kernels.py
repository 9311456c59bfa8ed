"""The fused NF4 linear kernel ops (C++ CPU) against the fp64 reference, both CPU paths
(decode for few tokens, dequantized-panel GEMM for many), and opcheck on every op."""

from __future__ import annotations

import pytest
import torch
from fused_linear_cases import (
    RANKS,
    SHAPES,
    assert_within,
    forward_bound,
    forward_case,
    grad_input_bound,
    grad_input_case,
)
from torch.library import opcheck

from lowrank_kernels import ops as registry
from lowrank_kernels.reference import nf4_lowrank_linear_grad_input_ref, nf4_lowrank_linear_ref

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
    assert_within(getattr(ops, op)(*args), ref, forward_bound(args, ref))


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grad_input_matches_reference(shape, m, r, dtype):
    args = grad_input_case(*shape, m, r, dtype)
    ref = nf4_lowrank_linear_grad_input_ref(*args)
    assert_within(ops.nf4_lowrank_linear_grad_input(*args), ref, grad_input_bound(args, ref))


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
