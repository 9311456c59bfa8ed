"""Triton fused QPiSSA linear (forward and grad-input) against the fp64 oracle.

Every comparison is against lowrank_kernels.reference.fused_linear evaluated in fp64 (inputs are
widened exactly, so the oracle is unrounded). The tolerance is a worst-case error bound, per
element, from the magnitudes of the terms that are summed:

    |out - exact| <= (eps + (depth + 4) * eps_fp32) * mag + tiny

with ``mag = |x| |W|^T + |scale| |lowrank_x| |up|^T + |bias|`` (resp. the grad-input terms),
``eps`` the output dtype's machine epsilon (half for rounding the output once, half for rounding
the decoded weight tile to bf16/fp16 before tl.dot), ``depth`` the length of the fp32 sums. For
random data ``mag`` is about sqrt(K) times |out|, i.e. eps * sqrt(K) relative. The bound is
checked to be discriminative: the kernel output must *fail* it against oracles built from
deliberately mis-decoded weights (swapped nibbles, byte-aligned rows, per-row blocks, transposed
storage, one flipped code) -- the bugs a fused NF4 GEMM is likely to have.

The interpreter runs kernels in numpy (one small tile config): shapes stay small but exceed the
tile (16 x 32 x 32) in every dimension somewhere, so masking and multi-step loops are exercised.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

from lowrank_kernels.codebooks import nf4_code
from lowrank_kernels.reference.fused_linear import nf4_lowrank_linear_grad_input_ref, nf4_lowrank_linear_ref
from lowrank_kernels.reference.nf4 import dequantize_nf4_ref, quantize_nf4_ref
from lowrank_kernels.triton import fused_linear as tfl

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (M, N, K, r, blocksize): K odd -> rows start mid-byte; K % blocksize != 0 -> blocks straddle rows.
SHAPES = [
    (37, 45, 77, 3, 64),  # odd K, straddling blocks, nothing tile-aligned
    (5, 33, 128, 16, 32),  # K a multiple of blocksize and tile, N one past a tile
    (1, 70, 63, 1, 128),  # one token, r = 1, blocks span several rows
    (16, 64, 96, 16, 64),  # tile-aligned M/N, K % 64 = 32
    (37, 17, 129, 3, 128),  # K one past a multiple of everything, N < tile
]


# --------------------------------------------------------------------------------------------
# problem construction and the error bound


def _randn(shape, gen, std=1.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * std


def make_nf4(n, k, blocksize, seed):
    """NF4 storage of a random [n, k] weight, and the oracle's fp64 view of it."""
    gen = torch.Generator().manual_seed(seed)
    packed, absmax = quantize_nf4_ref((_randn((n, k), gen, 0.05)).float(), blocksize)
    return packed, absmax, dequantize_nf4_ref(packed, absmax, blocksize, n * k, torch.float64).view(n, k)


def d(t):
    return None if t is None else t.double().cpu()


# fp32 dots run as 3xTF32 on GPUs (lowrank_kernels/triton/tiling.py): each product is off by at
# most about 3 * 2^-22 = 6 fp32 ulps of |a||b| beyond an fp32 product. The interpreter computes
# dots in fp32, so here this term is slack; on a GPU it is what the bound has to allow.
TF32X3_PRODUCT_ULPS = 6


def error_bound(mag, dtype, depth):
    eps32 = torch.finfo(torch.float32).eps
    dot = TF32X3_PRODUCT_ULPS * eps32 if dtype == torch.float32 else 0.0
    return (torch.finfo(dtype).eps + (depth + 4) * eps32 + dot) * mag + torch.finfo(dtype).tiny


def excess(out, exact, bound):
    """max(|out - exact| - bound): <= 0 iff out is within the bound everywhere."""
    if out.numel() == 0:
        return float("-inf")
    return ((out.double().cpu() - exact).abs() - bound).max().item()


@dataclasses.dataclass(frozen=True)
class Product:
    """One of the two fused products of ``W [N, K]``, as the tests drive it:
    ``out [M, C] = a [M, D] op(W) + scale * left [M, r] right' + bias [C]``. The forward:
    ``a = x [M, K]``, ``op(W) = W^T``, ``right = up [N, r]`` (``right' = up^T``), a bias; the
    grad-input: ``a = grad_y [M, N]``, ``op(W) = W``, ``right = down [r, K]``, no bias."""

    name: str
    launcher: Callable
    reference: Callable
    w_transposed: bool

    @property
    def has_bias(self) -> bool:
        return self.w_transposed

    def dims(self, n, k):
        """(D, C): the reduction and output widths for ``W [n, k]``."""
        return (k, n) if self.w_transposed else (n, k)

    def make(self, m, n, k, r, blocksize, dtype, device, seed=0, bias=True):
        """Random arguments (a dict of a, packed, absmax, left, right, bias) and the fp64 W."""
        packed, absmax, w = make_nf4(n, k, blocksize, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        depth, cols = self.dims(n, k)
        a = _randn((m, depth), gen).to(dtype)
        left = _randn((m, r), gen).to(dtype)
        right = _randn((cols, r) if self.w_transposed else (r, cols), gen, 0.1).to(dtype)
        b = _randn((cols,), gen, 0.5).to(dtype) if bias and self.has_bias else None
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dict(a=to(a), packed=to(packed), absmax=to(absmax), left=to(left), right=to(right), bias=to(b)), w

    def run(self, args, blocksize, cols, scale):
        bias = (args["bias"],) if self.has_bias else ()
        return self.launcher(
            args["a"], args["packed"], args["absmax"], blocksize, cols, args["left"], args["right"], scale, *bias
        )

    def oracle(self, args, blocksize, cols, scale, w=None):
        """fp64 oracle (unrounded: fp64 inputs) and the magnitude of its summed terms. ``w``
        replaces the weight (for the deliberately wrong oracles)."""
        packed, absmax = args["packed"].cpu(), args["absmax"].cpu()
        a, left, right, bias = d(args["a"]), d(args["left"]), d(args["right"]), d(args["bias"])
        wrong = w is not None
        if not wrong:
            n, k = self.dims(a.shape[1], cols)  # dims() is its own inverse
            w = dequantize_nf4_ref(packed, absmax, blocksize, n * k, torch.float64).view(n, k)
        op_w, right_t = (w.T, right.T) if self.w_transposed else (w, right)
        bias_t = torch.zeros(cols, dtype=torch.float64) if bias is None else bias
        if wrong:
            exact = a @ op_w + scale * (left @ right_t) + bias_t
        else:
            exact = self.reference(
                a, packed, absmax, blocksize, cols, left, right, scale, *((bias,) if self.has_bias else ())
            )
        mag = a.abs() @ op_w.abs() + abs(scale) * (left.abs() @ right_t.abs()) + bias_t.abs()
        return exact, mag

    def check(self, args, blocksize, cols, scale):
        out = self.run(args, blocksize, cols, scale)
        a = args["a"]
        assert out.shape == (a.shape[0], cols) and out.dtype == a.dtype and out.device == a.device
        exact, mag = self.oracle(args, blocksize, cols, scale)
        bound = error_bound(mag, out.dtype, a.shape[1] + args["left"].shape[1])
        assert excess(out, exact, bound) <= 0, f"max error {(out.double().cpu() - exact).abs().max():.3g}"
        return out


FORWARD = Product("forward", tfl.nf4_lowrank_linear, nf4_lowrank_linear_ref, w_transposed=True)
GRAD_INPUT = Product(
    "grad_input", tfl.nf4_lowrank_linear_grad_input, nf4_lowrank_linear_grad_input_ref, w_transposed=False
)
PRODUCTS = pytest.mark.parametrize("product", [FORWARD, GRAD_INPUT], ids=lambda p: p.name)


# --------------------------------------------------------------------------------------------
# both products against the oracle


@PRODUCTS
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_oracle(product, shape, dtype, triton_device):
    m, n, k, r, bs = shape
    args, _ = product.make(m, n, k, r, bs, dtype, triton_device, seed=sum(shape), bias=m % 2 == 1)
    product.check(args, bs, product.dims(n, k)[1], scale=0.75)


@PRODUCTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rank_changes_between_calls(product, dtype, triton_device):
    """Ranks 3 -> 40 -> 3 on one layer shape: 40 spans two rank chunks (BLOCK_R <= 32) and
    changes BLOCK_R, which the autotune key must tell apart."""
    m, n, k, bs = 19, 40, 70, 64
    for seed, r in enumerate((3, 40, 3)):
        args, _ = product.make(m, n, k, r, bs, dtype, triton_device, seed=seed)
        product.check(args, bs, product.dims(n, k)[1], scale=0.5)


@pytest.mark.parametrize(
    "product, bias",
    [(FORWARD, False), (FORWARD, True), (GRAD_INPUT, False)],
    ids=["forward-no_bias", "forward-bias", "grad_input"],
)
@pytest.mark.parametrize("scale", [0.0, -1.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_and_bias(product, bias, scale, dtype, triton_device):
    args, _ = product.make(5, 40, 51, 3, 32, dtype, triton_device, seed=3, bias=bias)
    cols = product.dims(40, 51)[1]
    out = product.check(args, 32, cols, scale)
    if scale == 0.0:  # the low-rank term vanishes exactly
        zero = dict(args, left=torch.zeros_like(args["left"]))
        assert torch.equal(out, product.run(zero, 32, cols, 1.0))


@PRODUCTS
@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(product, layout, dtype, triton_device):
    m, n, k, r, bs = 37, 45, 77, 3, 64
    args, _ = product.make(m, n, k, r, bs, dtype, triton_device, seed=4)
    cols = product.dims(n, k)[1]
    if layout == "transposed":  # column-major views
        for name in ("a", "left", "right"):
            args[name] = args[name].T.contiguous().T
    else:  # every other column of a wider buffer
        depth = args["a"].shape[1]
        wide = torch.zeros(m, 2 * depth, dtype=dtype, device=triton_device)
        wide[:, ::2] = args["a"]
        args["a"] = wide[:, ::2]
    assert not args["a"].is_contiguous()
    out = product.check(args, bs, cols, -0.5)
    args["a"] = args["a"].contiguous()
    assert torch.equal(out, product.run(args, bs, cols, -0.5))


@PRODUCTS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_tokens(product, dtype, triton_device):
    args, _ = product.make(0, 45, 77, 3, 64, dtype, triton_device)
    cols = product.dims(45, 77)[1]
    out = product.run(args, 64, cols, 1.0)
    assert out.shape == (0, cols) and out.dtype == dtype


@PRODUCTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_weight_dims(product, dtype, triton_device):
    """N = 0 or K = 0: with no reduction, out = scale * left right' (+ bias); with no output
    columns an empty [M, 0]. r = 0: no low-rank term."""
    for n, k, r in ((45, 0, 3), (0, 77, 3), (45, 77, 0)):
        args, _ = product.make(5, n, k, r, 64, dtype, triton_device)
        cols = product.dims(n, k)[1]
        if cols == 0:
            assert product.run(args, 64, cols, 1.0).shape == (5, 0)
        else:
            product.check(args, 64, cols, -1.25)


# --------------------------------------------------------------------------------------------
# the bound catches wrong kernels


def decode(packed, absmax, n, k, blocksize, bug=None):
    """fp64 W [n, k] decoded by explicit indexing; ``bug`` names a plausible decoding mistake."""
    rows = torch.arange(n)[:, None]
    cols = torch.arange(k)[None, :]
    i = rows * k + cols
    byte, high, block = i // 2, i % 2 == 0, i // blocksize
    if bug == "swapped_nibbles":
        high = ~high
    elif bug == "byte_aligned_rows":  # assumes every row starts on a byte
        byte, high = rows * ((k + 1) // 2) + cols // 2, cols % 2 == 0
    elif bug == "per_row_blocks":  # assumes blocks restart at each row
        block = rows * -(-k // blocksize) + cols // blocksize
    elif bug == "transposed_storage":
        i = cols * n + rows
        byte, high, block = i // 2, i % 2 == 0, i // blocksize
    byte, block = byte.clamp(max=packed.numel() - 1), block.clamp(max=absmax.numel() - 1)
    p = packed.long()[byte]
    nibble = torch.where(high, p >> 4, p & 0xF)
    if bug == "one_flipped_code":
        nibble = nibble.clone()
        nibble[n // 2, k // 2] ^= 1
    return (nf4_code()[nibble] * absmax[block]).double()  # the product is formed in fp32, as stored


BUGS = ["swapped_nibbles", "byte_aligned_rows", "per_row_blocks", "transposed_storage", "one_flipped_code"]


@PRODUCTS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bound_rejects_misdecoded_weights(product, dtype, triton_device):
    m, n, k, r, bs = 37, 45, 77, 3, 64  # odd K and straddling blocks: every bug changes W
    args, w = product.make(m, n, k, r, bs, dtype, triton_device, seed=8)
    packed, absmax = args["packed"].cpu(), args["absmax"].cpu()
    assert torch.equal(decode(packed, absmax, n, k, bs), w)
    depth, cols = product.dims(n, k)
    out = product.check(args, bs, cols, 0.75)
    for bug in BUGS:
        if bug == "one_flipped_code" and dtype != torch.float32:
            continue  # one weight off by one code step is within bf16/fp16 rounding of the sum
        exact, mag = product.oracle(args, bs, cols, 0.75, w=decode(packed, absmax, n, k, bs, bug))
        assert excess(out, exact, error_bound(mag, dtype, depth + r)) > 0, bug


# --------------------------------------------------------------------------------------------
# argument checks


def test_launchers_reject_mismatched_arguments(triton_device):
    a, _ = FORWARD.make(5, 45, 77, 3, 64, torch.float32, triton_device)
    x, packed, absmax, lowrank_x, up = a["a"], a["packed"], a["absmax"], a["left"], a["right"]
    with pytest.raises(ValueError, match=r"up must have shape \(45, 3\).*got shape \(44, 3\)"):
        tfl.nf4_lowrank_linear(x, packed, absmax, 64, 45, lowrank_x, up[:44], 1.0, None)
    with pytest.raises(ValueError, match="bias must have .*dtype torch.float32, got .*torch.bfloat16"):
        tfl.nf4_lowrank_linear(x, packed, absmax, 64, 45, lowrank_x, up, 1.0, a["bias"].bfloat16())
    with pytest.raises(ValueError, match=r"packed must have shape"):
        tfl.nf4_lowrank_linear(x, packed, absmax, 64, 46, lowrank_x, up, 1.0, None)
    with pytest.raises(ValueError, match=r"absmax must have shape"):
        tfl.nf4_lowrank_linear(x, packed, absmax, 32, 45, lowrank_x, up, 1.0, None)
    with pytest.raises(ValueError, match=r"x must be a 2-D .*got shape \(5, 77, 1\)"):
        tfl.nf4_lowrank_linear(x[..., None], packed, absmax, 64, 45, lowrank_x, up, 1.0, None)
    with pytest.raises(ValueError, match=r"out_features must be >= 0, got -1"):
        tfl.nf4_lowrank_linear(x, packed, absmax, 64, -1, lowrank_x, up, 1.0, None)
    b, _ = GRAD_INPUT.make(5, 45, 77, 3, 64, torch.bfloat16, triton_device)
    grad_y, packed, absmax, lowrank_grad, down = b["a"], b["packed"], b["absmax"], b["left"], b["right"]
    with pytest.raises(ValueError, match=r"down must have shape \(3, 77\) and dtype torch.bfloat16"):
        tfl.nf4_lowrank_linear_grad_input(grad_y, packed, absmax, 64, 77, lowrank_grad, down.float(), 1.0)
    with pytest.raises(ValueError, match=r"lowrank_grad must have shape \(5, 3\)"):
        tfl.nf4_lowrank_linear_grad_input(grad_y, packed, absmax, 64, 77, lowrank_grad[:4], down, 1.0)
    with pytest.raises(ValueError, match=r"grad_y must be a 2-D .*dtype torch.float64"):
        tfl.nf4_lowrank_linear_grad_input(grad_y.double(), packed, absmax, 64, 77, lowrank_grad, down, 1.0)
    with pytest.raises(ValueError, match=r"in_features must be >= 0, got -2"):
        tfl.nf4_lowrank_linear_grad_input(grad_y, packed, absmax, 64, -2, lowrank_grad, down, 1.0)


@pytest.mark.parametrize("product, name", [(FORWARD, "x"), (GRAD_INPUT, "grad_y")], ids=["forward", "grad_input"])
def test_launchers_reject_cpu_tensors_without_interpreter(product, name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args, _ = product.make(5, 45, 77, 3, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"{name} must be a CUDA tensor"):
        product.run(args, 64, product.dims(45, 77)[1], 1.0)


# ---- the CUDA registrations of lowrank_kernels.fused_linear, run on CPU tensors -------------------


@pytest.mark.parametrize("m", [1, 8, 9, 20])
def test_cuda_dispatch_routes_by_token_count(m, monkeypatch, triton_device):
    """M <= cuda_gemv_max_tokens goes to the GEMV op (its CPU kernel stands in for CUDA C++ here),
    more tokens to the Triton GEMM; both give the reference result, and so does the backward."""
    from lowrank_kernels import _registry, ops
    from lowrank_kernels.reference import nf4_lowrank_linear_grad_input_ref, nf4_lowrank_linear_ref
    from lowrank_kernels.reference.nf4 import quantize_nf4_ref

    triton_calls = []
    original = _registry.triton_or_reference_gemm

    def spy():
        triton_calls.append(m)
        return original()

    monkeypatch.setattr(_registry, "triton_or_reference_gemm", spy)
    g = torch.Generator().manual_seed(m)
    packed, absmax = quantize_nf4_ref(torch.randn(24, 64, generator=g), 32)
    x, lx, up = torch.randn(m, 64, generator=g), torch.randn(m, 3, generator=g), torch.randn(24, 3, generator=g)
    args = [
        t.to(triton_device) if isinstance(t, torch.Tensor) else t
        for t in (x, packed, absmax, 32, 24, lx, up, 0.5, None)
    ]
    y = _registry.nf4_lowrank_linear_cuda(*args)
    assert bool(triton_calls) == (m > ops.cuda_gemv_max_tokens())
    torch.testing.assert_close(y, nf4_lowrank_linear_ref(*args), rtol=1e-5, atol=1e-4)

    grad_args = (
        torch.randn(m, 24, generator=g),
        packed,
        absmax,
        32,
        64,
        torch.randn(m, 3, generator=g),
        torch.randn(3, 64, generator=g),
        0.5,
    )
    grad_args = [t.to(triton_device) if isinstance(t, torch.Tensor) else t for t in grad_args]
    dx = _registry.nf4_lowrank_grad_input_cuda(*grad_args)
    torch.testing.assert_close(dx, nf4_lowrank_linear_grad_input_ref(*grad_args), rtol=1e-5, atol=1e-4)
    gemv = _registry.nf4_lowrank_gemv_cuda(*args)
    torch.testing.assert_close(gemv, nf4_lowrank_linear_ref(*args), rtol=1e-5, atol=1e-4)
