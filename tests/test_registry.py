"""The op registry: it matches the compiled ops, every op passes torch.library.opcheck on every
device, a missing extension raises ExtensionNotBuiltError however an op is reached, and double
backward through the fused NF4 linear equals plain torch autograd on the dequantized W_res."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huber_cases import make_inputs as huber_inputs

import lowrank_kernels as lk
from lowrank_kernels import _registry
from lowrank_kernels.codebooks import dynamic_code
from lowrank_kernels.reference import dequantize_nf4_ref

NAMESPACE = _registry.NAMESPACE


def compiled_ops() -> set[str]:
    return {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith(f"{NAMESPACE}::")}


def overload(name: str) -> torch._ops.OpOverload:
    base, _, variant = name.partition(".")
    return getattr(getattr(torch.ops.lowrank_kernels, base), variant or "default")


def test_registry_is_every_compiled_op_with_its_schema():
    assert set(_registry.REGISTRY) == compiled_ops()
    for name, entry in _registry.REGISTRY.items():
        assert overload(name)._schema == torch._C.parse_schema(f"{NAMESPACE}::{entry.schema}"), name


def test_backend_table_is_read_from_the_registry():
    backends = lk.build_info()["backends"]
    assert list(backends) == [e.name for e in _registry.OPS_TABLE if e.group != "runtime"]
    for name, per_device in backends.items():
        entry = _registry.REGISTRY[name]
        assert per_device["cpu"] == entry.describe_cpu()
        assert per_device["cuda"] == (entry.cuda_backend() if torch.version.cuda else "unavailable (CPU-only torch)")


def test_every_tensor_op_has_a_fake_kernel_and_runtime_ops_take_no_tensors():
    for entry in _registry.OPS_TABLE:
        takes_tensors = any(isinstance(a.type, torch.TensorType) for a in overload(entry.name)._schema.arguments)
        assert (entry.group == "runtime") == (not takes_tensors), entry.name
        assert (entry.fake is None) == (entry.group == "runtime"), entry.name


# ---- opcheck over the whole registry, per device --------------------------------------------------


def _nf4(device, out_features=24, in_features=64, blocksize=64):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(1)).to(device)
    return torch.ops.lowrank_kernels.quantize_nf4(w, blocksize)


def _randn(*shape, device, grad=False, seed=0):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape))).to(device)
    return t.requires_grad_(grad)


def _linear_args(device, m):
    packed, absmax = _nf4(device)
    return (
        _randn(m, 64, device=device, grad=True),
        packed,
        absmax,
        64,
        24,
        _randn(m, 3, device=device, grad=True),
        _randn(24, 3, device=device, grad=True),
        0.5,
        _randn(24, device=device, grad=True),
    )


def _blockwise8_args(device):
    return _randn(512, device=device).abs(), dynamic_code(device), 256


def _spd(device):
    a = _randn(3, 4, 6, device=device)
    return a @ a.mT + torch.eye(4, device=device), _randn(3, 4, device=device)


def _huber(d, n_args=5):
    return tuple(huber_inputs((2,), 20, 33, 4, torch.float32, device=d)[:n_args])


#: op -> sample inputs (args, kwargs) for opcheck, each a function of the device.
SAMPLES = {
    "quantize_nf4": [
        lambda d: ((_randn(8, 64, device=d), 64), {}),
        lambda d: ((_randn(30, 70, device=d).bfloat16(), 128), {}),
    ],
    "dequantize_nf4": [
        lambda d: ((*_nf4(d), 64, 24 * 64, torch.float32), {}),
        lambda d: ((*_nf4(d), 64, 24 * 64, torch.float16), {}),
    ],
    "dequantize_nf4.out": [lambda d: ((*_nf4(d), 64, 24 * 64, torch.float32), {"out": torch.empty(24 * 64, device=d)})],
    "quantize_blockwise8": [lambda d: (_blockwise8_args(d), {})],
    "dequantize_blockwise8": [
        lambda d: ((*torch.ops.lowrank_kernels.quantize_blockwise8(*_blockwise8_args(d)), dynamic_code(d), 256), {})
    ],
    "nf4_lowrank_linear": [lambda d: (_linear_args(d, 9), {})],
    "nf4_lowrank_gemv": [lambda d: (_linear_args(d, 2), {})],
    "nf4_lowrank_linear_grad_input": [
        lambda d: (
            (
                _randn(5, 24, device=d, grad=True),
                *_nf4(d),
                64,
                64,
                _randn(5, 3, device=d, grad=True),
                _randn(3, 64, device=d, grad=True),
                0.5,
            ),
            {},
        )
    ],
    "fused_pissa_linear_nf4": [
        lambda d: (
            (
                _randn(5, 64, device=d, grad=True),
                *_nf4(d),
                64,
                _randn(24, 3, device=d, grad=True),
                _randn(3, 64, device=d, grad=True),
                _randn(24, device=d, grad=True),
                0.5,
            ),
            {},
        )
    ],
    "row_col_sq_norms": [lambda d: ((_randn(2, 9, 17, device=d),), {})],
    "gram": [lambda d: ((_randn(2, 30, 6, device=d),), {})],
    "skinny_matmul": [lambda d: ((_randn(40, 30, device=d), _randn(30, 4, device=d), False), {})],
    "huber_weights": [lambda d: (_huber(d), {})],
    "spd_solve": [lambda d: (_spd(d), {})],
    "huber_normal_equations": [lambda d: (_huber(d), {})],
    "huber_loss": [lambda d: (_huber(d, 4), {})],
}


def test_opcheck_samples_cover_every_tensor_op():
    assert set(SAMPLES) == set(_registry.names())


@pytest.mark.parametrize(
    "name, case", [(name, i) for name in _registry.names() for i in range(len(SAMPLES.get(name, ())))]
)
def test_opcheck(name, case, device):
    """Schema, fake kernel (torch.compile), autograd registration and AOT dispatch of every op."""
    entry = _registry.REGISTRY[name]
    if device == "cuda" and entry.cuda is None and entry.cuda_cpp is None:
        assert lk.build_info()["backends"][name]["cuda"].startswith("unused")
        return
    args, kwargs = SAMPLES[name][case](device)
    torch.library.opcheck(overload(name), args, kwargs)


# ---- a missing extension --------------------------------------------------------------------------


def test_every_entry_point_raises_extension_not_built_without_the_extension():
    """With lowrank_kernels._C unimportable, public calls and direct torch.ops calls alike raise
    ExtensionNotBuiltError (cur used to raise AttributeError from torch.ops)."""
    code = """
import sys; sys.modules['lowrank_kernels._C'] = None
import torch, lowrank_kernels as lk
W = torch.randn(16, 12)
calls = {
    'cur': lambda: lk.cur(W, 4),
    'rsvd': lambda: lk.rsvd(W, 4),
    'huber_factorize': lambda: lk.huber_factorize(W, 2),
    'quantize_nf4': lambda: lk.quantize_nf4(torch.randn(4, 64)),
    'output_cache_info': lk.output_cache_info,
    'torch.ops gram': lambda: torch.ops.lowrank_kernels.gram(W),
    'torch.ops row_col_sq_norms': lambda: torch.ops.lowrank_kernels.row_col_sq_norms(W),
    'torch.ops build_info': torch.ops.lowrank_kernels.build_info,
}
for name, call in calls.items():
    try:
        call()
    except lk.ExtensionNotBuiltError as e:
        assert 'pip install --no-build-isolation -e .' in str(e), e
        print('ok', name)
    else:
        print('no error', name)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == [
        f"ok {name}"
        for name in (
            "cur",
            "rsvd",
            "huber_factorize",
            "quantize_nf4",
            "output_cache_info",
            "torch.ops gram",
            "torch.ops row_col_sq_norms",
            "torch.ops build_info",
        )
    ], result.stdout + result.stderr


# ---- double backward ------------------------------------------------------------------------------


def _double_backward_operands(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = lk.quantize_nf4(torch.randn(24, 128, generator=g), blocksize=64).to(device)
    leaves = dict(
        x=torch.randn(7, 128, generator=g),
        A=torch.randn(24, 4, generator=g) / 2,
        B=torch.randn(4, 128, generator=g) / 2,
        bias=torch.randn(24, generator=g),
    )
    return q, {k: v.to(device).requires_grad_() for k, v in leaves.items()}


def _gradient_penalty_grads(forward, leaves, probe):
    """Gradients of ``|∇_{x,A,B} <probe, y²>|²`` w.r.t. every leaf: second-order terms through
    every first-order gradient, whose incoming gradient ``2 probe·y`` itself depends on the leaves
    (so the W_res products of the backward must be differentiable too)."""
    y = forward(**leaves)
    first = torch.autograd.grad((probe * y * y).sum(), (leaves["x"], leaves["A"], leaves["B"]), create_graph=True)
    penalty = sum((g * g).sum() for g in first) + (y * y).sum()
    return torch.autograd.grad(penalty, tuple(leaves.values()), allow_unused=True)


def test_double_backward_through_nf4_fused_linear_equals_plain_torch(device):
    """Gradient penalty through fused_pissa_linear with an NF4 residual against the same
    expression in plain torch (x W_resᵀ with W_res dequantized, fp64); A.grad was 43 % off when
    the grad-input kernel had no autograd formula."""
    q, leaves = _double_backward_operands(device)
    w64 = dequantize_nf4_ref(q.packed, q.block_absmax(), q.blocksize, q.numel, torch.float64).view(q.shape)
    probe = torch.randn(7, 24, generator=torch.Generator().manual_seed(3)).to(device)
    got = _gradient_penalty_grads(
        lambda x, A, B, bias: lk.fused_pissa_linear(x, q, A, B, bias, scale=0.75), leaves, probe
    )
    leaves64 = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    want = _gradient_penalty_grads(
        lambda x, A, B, bias: x @ w64.T + 0.75 * (x @ B.T) @ A.T + bias, leaves64, probe.double()
    )
    for name, g, w in zip(leaves, got, want):
        assert g is not None, name
        # fp32 products of length <= 128 + 24, chained three deep: a few hundred units of roundoff.
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5 * w.abs().max().item(), msg=name)


def test_hessian_vector_product_of_the_kernel_ops_is_exact(device):
    """Third order through nf4_lowrank_linear and its transpose nf4_lowrank_linear_grad_input
    (each one's backward is the other): d³/dx³ of a cubic in x matches plain torch."""
    q, leaves = _double_backward_operands(device, seed=5)
    w64 = dequantize_nf4_ref(q.packed, q.block_absmax(), q.blocksize, q.numel, torch.float64).view(q.shape)
    args = (q.packed, q.block_absmax(), q.blocksize)

    def third_derivative(linear, x):
        y = linear(x)
        (g1,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad((g1 * x).sum(), x, create_graph=True)
        (g3,) = torch.autograd.grad(g2.sum(), x)
        return g3

    lowrank = leaves["x"].detach() @ leaves["B"].detach().T

    def kernel(x):
        return torch.ops.lowrank_kernels.nf4_lowrank_linear(x, *args, 24, lowrank, leaves["A"].detach(), 0.5, None)

    def plain(x):
        return x @ w64.T + 0.5 * lowrank.double() @ leaves["A"].detach().double().T

    got = third_derivative(kernel, leaves["x"].detach().clone().requires_grad_())
    want = third_derivative(plain, leaves["x"].detach().double().requires_grad_())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# ---- every capability test module runs per device -------------------------------------------------

CAPABILITY_MODULES = (
    "test_nf4_kernels.py",
    "test_nf4_api.py",
    "test_fused_linear_api.py",
    "test_decompose.py",
    "test_robust.py",
    "test_adapters.py",
    "test_adapters_convert.py",
)


def test_cuda_parametrisations_are_collected_on_every_machine():
    """Each capability module has tests parametrised on cuda, collected here too (and skipped
    without a GPU), so none of them can silently lose its GPU run."""
    tests = Path(__file__).parent
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *(str(tests / m) for m in CAPABILITY_MODULES),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tests.parent,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ids = result.stdout.splitlines()
    for module in CAPABILITY_MODULES:
        cuda = [i for i in ids if i.startswith(f"tests/{module}::") and re.search(r"[\[-]cuda[\]-]", i)]
        assert cuda, f"{module} has no test parametrised on cuda"
