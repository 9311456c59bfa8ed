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

import pytest
import torch

from lowrank_kernels.codebooks import nf4_code
from lowrank_kernels.reference.fused_linear import nf4_lowrank_linear_grad_input_ref, nf4_lowrank_linear_ref
from lowrank_kernels.reference.nf4 import dequantize_nf4_ref, quantize_nf4_ref
from lowrank_kernels.triton import fused_linear as tfl

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (M, N, K, r, blocksize): K odd -> rows start mid-byte; K % blocksize != 0 -> blocks straddle rows.
SHAPES = [
    (37, 45, 77, 3, 64),     # odd K, straddling blocks, nothing tile-aligned
    (5, 33, 128, 16, 32),    # K a multiple of blocksize and tile, N one past a tile
    (1, 70, 63, 1, 128),     # one token, r = 1, blocks span several rows
    (16, 64, 96, 16, 64),    # tile-aligned M/N, K % 64 = 32
    (37, 17, 129, 3, 128),   # K one past a multiple of everything, N < tile
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


def make_forward(m, n, k, r, blocksize, dtype, device, seed=0, bias=True):
    packed, absmax, w = make_nf4(n, k, blocksize, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = _randn((m, k), gen).to(dtype)
    lowrank_x = _randn((m, r), gen).to(dtype)
    up = _randn((n, r), gen, 0.1).to(dtype)
    b = _randn((n,), gen, 0.5).to(dtype) if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(x=to(x), packed=to(packed), absmax=to(absmax), lowrank_x=to(lowrank_x), up=to(up), bias=to(b)), w


def make_backward(m, n, k, r, blocksize, dtype, device, seed=0):
    packed, absmax, w = make_nf4(n, k, blocksize, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    grad_y = _randn((m, n), gen).to(dtype)
    lowrank_grad = _randn((m, r), gen, 0.1).to(dtype)
    down = _randn((r, k), gen).to(dtype)
    return dict(grad_y=grad_y.to(device), packed=packed.to(device), absmax=absmax.to(device),
                lowrank_grad=lowrank_grad.to(device), down=down.to(device)), w


def d(t):
    return None if t is None else t.double().cpu()


def forward_oracle(a, blocksize, n, scale, w=None):
    """fp64 oracle (unrounded: fp64 inputs) and the magnitude of its summed terms. ``w`` replaces
    the weight (for the deliberately wrong oracles)."""
    packed, absmax = a["packed"].cpu(), a["absmax"].cpu()
    x, lx, up, bias = d(a["x"]), d(a["lowrank_x"]), d(a["up"]), d(a["bias"])
    if w is None:
        y = nf4_lowrank_linear_ref(x, packed, absmax, blocksize, n, lx, up, scale, bias)
        w = dequantize_nf4_ref(packed, absmax, blocksize, n * x.shape[1], torch.float64).view(n, -1)
    else:
        y = x @ w.T + scale * (lx @ up.T) + (0 if bias is None else bias)
    mag = x.abs() @ w.abs().T + abs(scale) * (lx.abs() @ up.abs().T) + (0 if bias is None else bias.abs())
    return y, mag


def backward_oracle(a, blocksize, k, scale, w=None):
    packed, absmax = a["packed"].cpu(), a["absmax"].cpu()
    g, lg, down = d(a["grad_y"]), d(a["lowrank_grad"]), d(a["down"])
    if w is None:
        dx = nf4_lowrank_linear_grad_input_ref(g, packed, absmax, blocksize, k, lg, down, scale)
        w = dequantize_nf4_ref(packed, absmax, blocksize, g.shape[1] * k, torch.float64).view(-1, k)
    else:
        dx = g @ w + scale * (lg @ down)
    mag = g.abs() @ w.abs() + abs(scale) * (lg.abs() @ down.abs())
    return dx, mag


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


def run_forward(a, blocksize, n, scale):
    return tfl.nf4_lowrank_linear(a["x"], a["packed"], a["absmax"], blocksize, n, a["lowrank_x"], a["up"],
                                  scale, a["bias"])


def run_backward(a, blocksize, k, scale):
    return tfl.nf4_lowrank_linear_grad_input(a["grad_y"], a["packed"], a["absmax"], blocksize, k,
                                             a["lowrank_grad"], a["down"], scale)


def check_forward(a, blocksize, n, scale):
    y = run_forward(a, blocksize, n, scale)
    m, k = a["x"].shape
    assert y.shape == (m, n) and y.dtype == a["x"].dtype and y.device == a["x"].device
    exact, mag = forward_oracle(a, blocksize, n, scale)
    bound = error_bound(mag, y.dtype, k + a["up"].shape[1])
    assert excess(y, exact, bound) <= 0, f"max error {(y.double().cpu() - exact).abs().max():.3g}"
    return y


def check_backward(a, blocksize, k, scale):
    dx = run_backward(a, blocksize, k, scale)
    m, n = a["grad_y"].shape
    assert dx.shape == (m, k) and dx.dtype == a["grad_y"].dtype and dx.device == a["grad_y"].device
    exact, mag = backward_oracle(a, blocksize, k, scale)
    bound = error_bound(mag, dx.dtype, n + a["down"].shape[0])
    assert excess(dx, exact, bound) <= 0, f"max error {(dx.double().cpu() - exact).abs().max():.3g}"
    return dx


# --------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_oracle(shape, dtype, triton_device):
    m, n, k, r, bs = shape
    a, _ = make_forward(m, n, k, r, bs, dtype, triton_device, seed=sum(shape), bias=m % 2 == 1)
    check_forward(a, bs, n, scale=0.75)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rank_changes_between_calls(dtype, triton_device):
    """Ranks 3 -> 40 -> 3 on one layer shape, forward and grad-input: 40 spans two rank chunks
    (BLOCK_R <= 32) and changes BLOCK_R, which the autotune key must tell apart."""
    m, n, k, bs = 19, 40, 70, 64
    for seed, r in enumerate((3, 40, 3)):
        a, _ = make_forward(m, n, k, r, bs, dtype, triton_device, seed=seed)
        check_forward(a, bs, n, scale=0.5)
        g, _ = make_backward(m, n, k, r, bs, dtype, triton_device, seed=seed)
        check_backward(g, bs, k, scale=0.5)


@pytest.mark.parametrize("scale", [0.0, -1.5, 2.0])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_scale_and_bias(scale, bias, dtype, triton_device):
    a, _ = make_forward(5, 40, 51, 3, 32, dtype, triton_device, seed=3, bias=bias)
    y = check_forward(a, 32, 40, scale)
    if scale == 0.0:  # the low-rank term vanishes exactly
        a0 = dict(a, lowrank_x=torch.zeros_like(a["lowrank_x"]))
        assert torch.equal(y, run_forward(a0, 32, 40, 1.0))


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_non_contiguous(layout, dtype, triton_device):
    m, n, k, r, bs = 37, 45, 77, 3, 64
    a, _ = make_forward(m, n, k, r, bs, dtype, triton_device, seed=4)
    if layout == "transposed":  # column-major views
        a["x"] = a["x"].T.contiguous().T
        a["lowrank_x"] = a["lowrank_x"].T.contiguous().T
        a["up"] = a["up"].T.contiguous().T
    else:  # every other column of a wider buffer
        wide = torch.zeros(m, 2 * k, dtype=dtype, device=triton_device)
        wide[:, ::2] = a["x"]
        a["x"] = wide[:, ::2]
    assert not a["x"].is_contiguous()
    y = check_forward(a, bs, n, -0.5)
    a["x"] = a["x"].contiguous()
    assert torch.equal(y, run_forward(a, bs, n, -0.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_zero_tokens(dtype, triton_device):
    a, _ = make_forward(0, 45, 77, 3, 64, dtype, triton_device)
    y = run_forward(a, 64, 45, 1.0)
    assert y.shape == (0, 45) and y.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_empty_weight_dims(dtype, triton_device):
    # K = 0: y = scale * lowrank_x up^T + bias.
    a, _ = make_forward(5, 45, 0, 3, 64, dtype, triton_device)
    check_forward(a, 64, 45, 1.25)
    # N = 0: an empty [M, 0] output.
    a, _ = make_forward(5, 0, 77, 3, 64, dtype, triton_device)
    assert run_forward(a, 64, 0, 1.0).shape == (5, 0)
    # r = 0: no low-rank term.
    a, _ = make_forward(5, 45, 77, 0, 64, dtype, triton_device)
    check_forward(a, 64, 45, 1.0)


# --------------------------------------------------------------------------------------------
# grad-input


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_input_matches_oracle(shape, dtype, triton_device):
    m, n, k, r, bs = shape
    a, _ = make_backward(m, n, k, r, bs, dtype, triton_device, seed=sum(shape))
    check_backward(a, bs, k, scale=0.75)


@pytest.mark.parametrize("scale", [0.0, -1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_input_scale(scale, dtype, triton_device):
    a, _ = make_backward(5, 40, 51, 3, 32, dtype, triton_device, seed=6)
    check_backward(a, 32, 51, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grad_input_non_contiguous(dtype, triton_device):
    m, n, k, r, bs = 37, 45, 77, 3, 64
    a, _ = make_backward(m, n, k, r, bs, dtype, triton_device, seed=7)
    a["grad_y"] = a["grad_y"].T.contiguous().T
    a["down"] = a["down"].T.contiguous().T
    assert not a["grad_y"].is_contiguous()
    dx = check_backward(a, bs, k, 1.5)
    a["grad_y"] = a["grad_y"].contiguous()
    assert torch.equal(dx, run_backward(a, bs, k, 1.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_input_zero_tokens(dtype, triton_device):
    a, _ = make_backward(0, 45, 77, 3, 64, dtype, triton_device)
    dx = run_backward(a, 64, 77, 1.0)
    assert dx.shape == (0, 77) and dx.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_input_empty_weight_dims(dtype, triton_device):
    # N = 0: dx = scale * lowrank_grad down.
    a, _ = make_backward(5, 0, 77, 3, 64, dtype, triton_device)
    check_backward(a, 64, 77, -2.0)
    # K = 0: an empty [M, 0] gradient.
    a, _ = make_backward(5, 45, 0, 3, 64, dtype, triton_device)
    assert run_backward(a, 64, 0, 1.0).shape == (5, 0)


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bound_rejects_misdecoded_weights_forward(dtype, triton_device):
    m, n, k, r, bs = 37, 45, 77, 3, 64  # odd K and straddling blocks: every bug changes W
    a, w = make_forward(m, n, k, r, bs, dtype, triton_device, seed=8)
    packed, absmax = a["packed"].cpu(), a["absmax"].cpu()
    assert torch.equal(decode(packed, absmax, n, k, bs), w)
    y = check_forward(a, bs, n, 0.75)
    for bug in BUGS:
        if bug == "one_flipped_code" and dtype != torch.float32:
            continue  # one weight off by one code step is within bf16/fp16 rounding of the sum
        exact, mag = forward_oracle(a, bs, n, 0.75, w=decode(packed, absmax, n, k, bs, bug))
        assert excess(y, exact, error_bound(mag, dtype, k + r)) > 0, bug


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bound_rejects_misdecoded_weights_grad_input(dtype, triton_device):
    m, n, k, r, bs = 37, 45, 77, 3, 64
    a, w = make_backward(m, n, k, r, bs, dtype, triton_device, seed=9)
    packed, absmax = a["packed"].cpu(), a["absmax"].cpu()
    assert torch.equal(decode(packed, absmax, n, k, bs), w)
    dx = check_backward(a, bs, k, 0.75)
    for bug in BUGS:
        if bug == "one_flipped_code" and dtype != torch.float32:
            continue
        exact, mag = backward_oracle(a, bs, k, 0.75, w=decode(packed, absmax, n, k, bs, bug))
        assert excess(dx, exact, error_bound(mag, dtype, n + r)) > 0, bug


# --------------------------------------------------------------------------------------------
# argument checks


def test_launchers_reject_mismatched_arguments(triton_device):
    a, _ = make_forward(5, 45, 77, 3, 64, torch.float32, triton_device)
    with pytest.raises(ValueError, match=r"up must have shape \(45, 3\).*got shape \(44, 3\)"):
        tfl.nf4_lowrank_linear(a["x"], a["packed"], a["absmax"], 64, 45, a["lowrank_x"], a["up"][:44], 1.0, None)
    with pytest.raises(ValueError, match="bias must have .*dtype torch.float32, got .*torch.bfloat16"):
        tfl.nf4_lowrank_linear(a["x"], a["packed"], a["absmax"], 64, 45, a["lowrank_x"], a["up"], 1.0,
                               a["bias"].bfloat16())
    with pytest.raises(ValueError, match=r"packed must have shape"):
        tfl.nf4_lowrank_linear(a["x"], a["packed"], a["absmax"], 64, 46, a["lowrank_x"], a["up"], 1.0, None)
    with pytest.raises(ValueError, match=r"absmax must have shape"):
        tfl.nf4_lowrank_linear(a["x"], a["packed"], a["absmax"], 32, 45, a["lowrank_x"], a["up"], 1.0, None)
    with pytest.raises(ValueError, match=r"x must be a 2-D .*got shape \(5, 77, 1\)"):
        tfl.nf4_lowrank_linear(a["x"][..., None], a["packed"], a["absmax"], 64, 45, a["lowrank_x"], a["up"],
                               1.0, None)
    b, _ = make_backward(5, 45, 77, 3, 64, torch.bfloat16, triton_device)
    with pytest.raises(ValueError, match=r"down must have shape \(3, 77\) and dtype torch.bfloat16"):
        tfl.nf4_lowrank_linear_grad_input(b["grad_y"], b["packed"], b["absmax"], 64, 77, b["lowrank_grad"],
                                          b["down"].float(), 1.0)
    with pytest.raises(ValueError, match=r"lowrank_grad must have shape \(5, 3\)"):
        tfl.nf4_lowrank_linear_grad_input(b["grad_y"], b["packed"], b["absmax"], 64, 77, b["lowrank_grad"][:4],
                                          b["down"], 1.0)
    with pytest.raises(ValueError, match=r"grad_y must be a 2-D .*dtype torch.float64"):
        tfl.nf4_lowrank_linear_grad_input(b["grad_y"].double(), b["packed"], b["absmax"], 64, 77,
                                          b["lowrank_grad"], b["down"], 1.0)


def test_launchers_reject_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, _ = make_forward(5, 45, 77, 3, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        run_forward(a, 64, 45, 1.0)
    b, _ = make_backward(5, 45, 77, 3, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="grad_y must be a CUDA tensor"):
        run_backward(b, 64, 77, 1.0)


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
    args = [t.to(triton_device) if isinstance(t, torch.Tensor) else t
            for t in (x, packed, absmax, 32, 24, lx, up, 0.5, None)]
    y = _registry.nf4_lowrank_linear_cuda(*args)
    assert bool(triton_calls) == (m > ops.cuda_gemv_max_tokens())
    torch.testing.assert_close(y, nf4_lowrank_linear_ref(*args), rtol=1e-5, atol=1e-4)

    grad_args = (torch.randn(m, 24, generator=g), packed, absmax, 32, 64, torch.randn(m, 3, generator=g),
                 torch.randn(3, 64, generator=g), 0.5)
    grad_args = [t.to(triton_device) if isinstance(t, torch.Tensor) else t for t in grad_args]
    dx = _registry.nf4_lowrank_grad_input_cuda(*grad_args)
    torch.testing.assert_close(dx, nf4_lowrank_linear_grad_input_ref(*grad_args), rtol=1e-5, atol=1e-4)
    gemv = _registry.nf4_lowrank_gemv_cuda(*args)
    torch.testing.assert_close(gemv, nf4_lowrank_linear_ref(*args), rtol=1e-5, atol=1e-4)
