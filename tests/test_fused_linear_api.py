"""fused_pissa_linear: values and gradients against fp64 references, gradcheck, torch.compile,
autocast, a real training step, the memory bound, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import on_gpu
from fused_linear_cases import FP32_UNIT_ROUNDOFF

import lowrank_kernels as lk
from lowrank_kernels.reference import dequantize_nf4_ref

IN, OUT, R = 100, 37, 3
#: fp32 on a GPU: the Triton GEMM kernels multiply in TF32 (10-bit mantissa, unit roundoff 2^-11).
TF32_UNIT_ROUNDOFF = 2.0**-11


def make_operands(dtype, *, double_quant=False, leading=(6,), seed=0, requires_grad=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g).to(device)
    q = lk.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    tensors = dict(
        x=torch.randn(*leading, IN, generator=g),
        A=torch.randn(OUT, R, generator=g) / 2,
        B=torch.randn(R, IN, generator=g) / 2,
        bias=torch.randn(OUT, generator=g),
    )
    tensors = {k: v.to(device, dtype).requires_grad_(requires_grad) for k, v in tensors.items()}
    return q, tensors


def dense_residual(q: lk.NF4Weight) -> torch.Tensor:
    """W_res in fp64 from the reference dequantizer."""
    return dequantize_nf4_ref(q.packed, q.block_absmax(), q.blocksize, q.numel, torch.float64).view(q.shape)


def reference(x, w64, A, B, bias, scale):
    """The forward in fp64 with autograd, on fp64 leaf copies of the operands."""
    leaves = {k: v.detach().double().requires_grad_() for k, v in dict(x=x, A=A, B=B).items()}
    if bias is not None:
        leaves["bias"] = bias.detach().double().requires_grad_()
    y = leaves["x"] @ w64.T + scale * (leaves["x"] @ leaves["B"].T) @ leaves["A"].T
    if bias is not None:
        y = y + leaves["bias"]
    return y, leaves


def tolerance(dtype, magnitude, device="cpu"):
    """Error bound for fp32 accumulation; bf16/fp16 activations also round x@B^T and the outputs;
    fp32 on a GPU also rounds both factors of every product to TF32."""
    if dtype == torch.float32:
        tf32 = 2 * TF32_UNIT_ROUNDOFF * magnitude if on_gpu(device) else 0
        return (IN + R + 4) * FP32_UNIT_ROUNDOFF * magnitude + tf32 + 1e-30
    return 4 * torch.finfo(dtype).eps * magnitude


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("residual", ["nf4", "nf4-double-quant", "dense"])
@pytest.mark.parametrize("leading", [(0,), (1,), (2, 3), (40,)], ids=str)
def test_forward_and_gradients_match_fp64_reference(leading, residual, with_bias, dtype, device):
    q, t = make_operands(dtype, double_quant=residual == "nf4-double-quant", leading=leading, device=device)
    bias = t["bias"] if with_bias else None
    w_res = q if residual != "dense" else q.dequantize().to(dtype)
    y = lk.fused_pissa_linear(t["x"], w_res, t["A"], t["B"], bias, scale=0.5)
    w64 = dense_residual(q) if residual != "dense" else w_res.double()
    ref, leaves = reference(t["x"], w64, t["A"], t["B"], bias, 0.5)
    assert y.shape == (*leading, OUT) and y.dtype == dtype
    x64 = t["x"].detach().double().abs()
    magnitude = x64 @ w64.abs().T + 0.5 * (x64 @ t["B"].detach().double().abs().T) @ t["A"].detach().double().abs().T
    if with_bias:
        magnitude += t["bias"].detach().double().abs()
    assert ((y.double() - ref).abs() <= tolerance(dtype, magnitude, device)).all()

    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    y.backward(grad_y)
    ref.backward(grad_y.double())
    for name, leaf in leaves.items():
        got, want = t[name].grad.double(), leaf.grad
        assert got.shape == want.shape
        if not want.numel():
            continue
        scale = want.abs().amax()
        # Gradients are sums over tokens and features: compare relative to their largest entry.
        limit = 4e-6 * (IN + OUT + 40) if dtype == torch.float32 else 12 * torch.finfo(dtype).eps
        if dtype == torch.float32 and on_gpu(device):
            limit += 4 * TF32_UNIT_ROUNDOFF
        assert (got - want).abs().max() <= limit * scale + 1e-12, name


def test_dense_residual_gradcheck_fp64(device):
    g = torch.Generator().manual_seed(0)
    w, x, A, B, bias = (
        torch.randn(*shape, dtype=torch.float64, generator=g).to(device)
        for shape in ((7, 5), (2, 3, 5), (7, 2), (2, 5), (7,))
    )
    x, A, B, bias = (t.requires_grad_() for t in (x, A, B, bias))
    assert torch.autograd.gradcheck(
        lambda *a: lk.fused_pissa_linear(a[0], w, a[1], a[2], a[3], scale=0.7), (x, A, B, bias)
    )
    assert torch.autograd.gradgradcheck(
        lambda *a: lk.fused_pissa_linear(a[0], w, a[1], a[2], None, scale=0.7), (x, A, B)
    )


@pytest.mark.parametrize("tokens", [3, 40])
def test_nf4_and_dense_residual_agree(tokens, device):
    """The two residual kinds are the same function of the same weights (to TF32 on a GPU)."""
    q, t = make_operands(torch.float32, leading=(tokens,), device=device)
    y_nf4 = lk.fused_pissa_linear(t["x"], q, t["A"], t["B"], t["bias"], 0.5)
    y_dense = lk.fused_pissa_linear(t["x"], q.dequantize(), t["A"], t["B"], t["bias"], 0.5)
    tol = 4 * TF32_UNIT_ROUNDOFF if on_gpu(device) else 1e-5
    torch.testing.assert_close(y_nf4, y_dense, rtol=tol, atol=tol)


@pytest.mark.parametrize("residual", ["nf4", "dense"])
def test_compiled_equals_eager(residual, device):
    q, t = make_operands(torch.float32, leading=(2, 9), device=device)
    w = q if residual == "nf4" else q.dequantize()

    def step(x, A, B, bias):
        return lk.fused_pissa_linear(x, w, A, B, bias, scale=0.5).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    args = [t[k] for k in ("x", "A", "B", "bias")]
    eager_loss = step(*args)
    eager_grads = torch.autograd.grad(eager_loss, args)
    compiled_loss = compiled(*args)
    compiled_grads = torch.autograd.grad(compiled_loss, args)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)


def test_autocast_runs_in_the_autocast_dtype(device):
    q, t = make_operands(torch.float32, requires_grad=False, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = lk.fused_pissa_linear(t["x"], q, t["A"], t["B"], t["bias"], 0.5)
        dense = F.linear(t["x"], q.dequantize(), t["bias"]) + 0.5 * F.linear(F.linear(t["x"], t["B"]), t["A"])
    assert y.dtype == torch.bfloat16 == dense.dtype
    cast = {k: v.bfloat16() for k, v in t.items()}
    expected = lk.fused_pissa_linear(cast["x"], q, cast["A"], cast["B"], cast["bias"], 0.5)
    assert torch.equal(y, expected)


def test_training_step_updates_only_the_adapter(device):
    torch.manual_seed(0)
    teacher = torch.randn(OUT, IN).to(device)
    q = lk.quantize_nf4(torch.randn(OUT, IN).to(device), blocksize=64)
    packed, absmax = q.packed.clone(), q.absmax.clone()
    A = torch.nn.Parameter(torch.zeros(OUT, 8, device=device))
    B = torch.nn.Parameter((torch.randn(8, IN) / 10).to(device))
    optimizer = torch.optim.Adam([A, B], lr=0.05)
    x = torch.randn(64, IN).to(device)
    target = x @ teacher.T
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.mse_loss(lk.fused_pissa_linear(x, q, A, B), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, absmax)


def _allocated(fn, device) -> int:
    """Every allocation of fn, summed (an upper bound on the peak; on a GPU the allocator's peak)."""
    from torch.profiler import ProfilerActivity, profile

    if on_gpu(device):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each allocation counts once, in the innermost op that made it (aten::empty*, or a
    # kernel allocating its output directly, e.g. dequantize_nf4 from the output cache).
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def _training_step_allocations(tokens, device, dtype):
    """(fused, dequantize-then-matmul) allocations of forward + backward, W_res [4096, 2048]."""
    q = lk.quantize_nf4(torch.randn(4096, 2048).to(device))
    A = torch.randn(4096, 16).to(device, dtype).requires_grad_()
    B = torch.randn(16, 2048).to(device, dtype).requires_grad_()
    x = torch.randn(tokens, 2048).to(device, dtype).requires_grad_()
    fused = _allocated(lambda: lk.fused_pissa_linear(x, q, A, B).sum().backward(), device)
    unfused = _allocated(lambda: lk.fused_pissa_linear(x, q.dequantize().to(dtype), A, B).sum().backward(), device)
    return fused, unfused


@pytest.mark.parametrize("tokens", [4, 64])
def test_never_materialises_the_dequantized_residual(tokens, device):
    """Forward + backward allocate less than half the dequantized fp32 W_res, while a
    dequantize-then-matmul path allocates more than all of it."""
    fused, unfused = _training_step_allocations(tokens, device, torch.float32)
    dense_bytes = 4096 * 2048 * 4
    assert unfused >= dense_bytes  # the accounting sees a materialised weight
    assert fused < dense_bytes / 2, f"fused forward+backward allocated {fused / 2**20:.1f} MiB"


def test_bf16_gemm_path_never_materialises_the_dequantized_residual(monkeypatch):
    """The CPU's bf16 GEMM path holds one bf16 panel per product (each at most an eighth of W's
    fp32 bytes): forward + backward allocate less than one bf16 copy of W_res in all."""
    monkeypatch.setenv("LOWRANK_KERNELS_CPU_BF16_GEMM", "on")
    fused, unfused = _training_step_allocations(64, "cpu", torch.bfloat16)
    dense_bytes = 4096 * 2048 * 2
    assert unfused >= dense_bytes
    assert fused < dense_bytes, f"fused forward+backward allocated {fused / 2**20:.1f} MiB"


# ---- bad input --------------------------------------------------------------------------------


def _call(**overrides):
    q, t = make_operands(torch.float32, requires_grad=False)
    args = dict(x=t["x"], w_res=q, A=t["A"], B=t["B"], bias=t["bias"], scale=0.5)
    args.update(overrides)
    return lk.fused_pissa_linear(**args)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(x=torch.randn(6, IN + 1)), ValueError, r"x has 101 input features but w_res is \[37, 100\]"),
        (dict(x=torch.randn(6, IN).double()), TypeError, "x must be float32.*float64"),
        (dict(x=torch.randint(0, 3, (6, IN))), TypeError, "x must be float32"),
        (dict(x=torch.tensor(1.0)), ValueError, r"x must have shape \[..., in_features\]"),
        (dict(A=torch.randn(OUT + 1, R)), ValueError, r"A must have shape \[37, r\].*\(38, 3\)"),
        (dict(B=torch.randn(R, IN - 1)), ValueError, r"B must have shape \[r, 100\]"),
        (dict(B=torch.randn(R + 1, IN)), ValueError, "disagree on r"),
        (dict(A=torch.randn(OUT, R).half()), TypeError, "A must have x's dtype torch.float32.*float16"),
        (dict(bias=torch.randn(OUT + 2)), ValueError, r"bias must have shape \[37\]"),
        (dict(bias=torch.randn(OUT).bfloat16()), TypeError, "bias must have x's dtype"),
        (dict(A=torch.randn(OUT, R, device="meta")), ValueError, "A is on meta but x is on cpu"),
        (dict(w_res=torch.randint(0, 15, (OUT, IN), dtype=torch.uint8)), TypeError, "integer tensor is not NF4"),
        (dict(w_res=torch.randn(OUT, IN).half()), TypeError, "dense w_res must have x's dtype"),
        (dict(w_res=torch.randn(OUT, IN, requires_grad=True)), ValueError, "frozen residual"),
        (dict(w_res=lk.quantize_nf4(torch.randn(OUT * IN))), ValueError, "2-D"),
        (dict(w_res=torch.randn(OUT, IN).numpy()), TypeError, "w_res must be a torch.Tensor"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite"),
        (dict(scale=float("inf")), ValueError, "scale must be a finite"),
        (dict(scale=torch.tensor(0.5)), ValueError, "scale must be a finite Python number"),
    ],
)
def test_bad_input_is_a_clear_error(overrides, error, message):
    with pytest.raises(error, match=message):
        _call(**overrides)
