"""The op registry: every ``torch.ops.lowrank_kernels`` op in one table, and its registration.

Schemas and CPU kernels are C++ (``csrc/lowrank_kernels.cpp``, ``csrc/cpu``), and CUDA C++
kernels live in ``csrc/cuda``. Everything else an op needs is here, one `Op` per op:

* its schema, repeated from C++ so that without the extension every op still exists and
  raises `ExtensionNotBuiltError` however it is called (tests/test_registry.py checks that the
  two agree);
* its fake kernel (torch.compile, meta tensors);
* its autograd formula, for the ops that are differentiable (the fused linear ops: every one
  of them is differentiable again, so double backward is exact);
* its Python CUDA kernel: Triton, or a composition of ATen ops, or the PyTorch reference where
  Triton is missing; registered for ops without a CUDA C++ kernel, and for those with one when
  the extension was compiled without nvcc;
* what serves it on each device, the table `backends()` that `build_info()` reports.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable

import torch

from lowrank_kernels import _extension
from lowrank_kernels.reference import decompose as decompose_ref
from lowrank_kernels.reference import nf4 as nf4_ref
from lowrank_kernels.reference import robust as robust_ref

NAMESPACE = "lowrank_kernels"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def cuda_cpp_compiled() -> bool:
    """Whether the extension holds the CUDA C++ kernels (built with nvcc)."""
    return bool(_extension.compiled_config().get("cuda_kernels"))


def cpu_decode_max_tokens() -> int:
    """Token counts up to this run the CPU fused linear's decode kernel, larger ones its GEMM kernel."""
    return _extension.compiled_config().get("cpu_decode_max_tokens", 0)


def cpu_bf16_gemm() -> bool:
    """Whether the CPU fused linear's GEMM kernel multiplies bf16 activations in bf16 (oneDNN, fp32
    accumulation; W and s * lowrank_x rounded to bf16) rather than in fp32. Default (auto): on CPUs
    with AVX512-BF16 running the avx512 kernels; LOWRANK_KERNELS_CPU_BF16_GEMM=on|off|auto, read at
    each call, overrides it."""
    return _extension.load_error() is None and torch.ops.lowrank_kernels.cpu_bf16_gemm()


def cuda_gemv_max_tokens() -> int:
    """Token counts up to this run the CUDA GEMV kernel, larger ones the Triton GEMM kernel."""
    return _extension.compiled_config().get("cuda_gemv_max_tokens", 0)


def op(name: str):
    """The OpOverloadPacket ``torch.ops.lowrank_kernels.<name>``, or `ExtensionNotBuiltError`."""
    if not torch.compiler.is_compiling():  # checked once in eager; dynamo cannot trace the import
        _extension.require()
    return getattr(torch.ops.lowrank_kernels, name)


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of the registry.

    name:        the op, with its overload if not the default (``dequantize_nf4.out``).
    schema:      as defined in C++.
    group:       the capability it belongs to: nf4, fused_linear, decompose, robust, runtime
                 (the tensor-less ops that report and steer the extension itself).
    fake:        fake kernel, None for the tensor-less ops.
    autograd:    (backward, setup_context) for torch.library.register_autograd, None when the
                 op is not differentiable.
    cuda:        Python CUDA kernel, None if there is none.
    cuda_cpp:    name of the CUDA C++ kernel in csrc/cuda, None if there is none; when it is
                 compiled it serves the op and `cuda` is not registered.
    cpu_python:  Python CPU kernel (an op composed of other ops); None: the C++ CPU kernel.
    describe_cpu / describe_cuda: what serves the op on that device, for `backends()`.
    """

    name: str
    schema: str
    group: str
    fake: Callable | None = None
    autograd: tuple[Callable, Callable] | None = None
    cuda: Callable | None = None
    cuda_cpp: str | None = None
    cpu_python: Callable | None = None
    describe_cpu: Callable[[], str] = lambda: _cxx()
    describe_cuda: Callable[[], str] = lambda: "unavailable"

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    def cuda_backend(self) -> str:
        if self.cuda_cpp is not None and cuda_cpp_compiled():
            return self.cuda_cpp
        return self.describe_cuda()


def _cxx() -> str:
    simd = _extension.compiled_config().get("cpu_simd", "scalar")
    return f"C++ ({simd.upper() if simd != 'scalar' else 'scalar'}, OpenMP)"


def _gemm() -> str:
    """What serves the GPU GEMM-shaped work that has no CUDA C++ kernel."""
    return "Triton" if triton_available() else "PyTorch reference"


# ---- Python CUDA kernels -------------------------------------------------------------------------


def triton_or_reference(module: str, name: str, reference: Callable) -> Callable:
    """``lowrank_kernels.triton.<module>.<name>`` (imported on first call: Triton is heavy to
    import), or the PyTorch ``reference`` where Triton is missing."""

    def kernel(*args):
        if triton_available():
            return getattr(importlib.import_module(f"lowrank_kernels.triton.{module}"), name)(*args)
        return reference(*args)

    kernel.__doc__ = f"CUDA kernel: lowrank_kernels.triton.{module}.{name}, else {reference.__name__}."
    return kernel


_quantize_nf4_cuda = triton_or_reference("nf4", "quantize_nf4", nf4_ref.quantize_nf4_ref)
_dequantize_nf4_cuda = triton_or_reference("nf4", "dequantize_nf4", nf4_ref.dequantize_nf4_ref)
_gram_cuda = triton_or_reference("gram", "gram", decompose_ref.gram_ref)
_row_col_sq_norms_cuda = triton_or_reference("norms", "row_col_sq_norms", decompose_ref.row_col_sq_norms_ref)
huber_weights_cuda = triton_or_reference("huber", "huber_weights", robust_ref.huber_weights_ref)


def _dequantize_nf4_out_cuda(packed, absmax, blocksize, numel, dtype, *, out):
    out.copy_(_dequantize_nf4_cuda(packed, absmax, blocksize, numel, dtype))


def triton_or_reference_gemm() -> tuple[Callable, Callable]:
    """The GPU fused linear GEMM kernels (forward, grad-input): Triton, or the fp64 PyTorch
    reference where Triton is missing."""
    if triton_available():
        from lowrank_kernels.triton import fused_linear

        return fused_linear.nf4_lowrank_linear, fused_linear.nf4_lowrank_linear_grad_input
    from lowrank_kernels.reference import fused_linear

    return fused_linear.nf4_lowrank_linear_ref, fused_linear.nf4_lowrank_linear_grad_input_ref


def nf4_lowrank_linear_cuda(x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias):
    """Few tokens: the GEMV op (CUDA C++, or the GEMM kernel without nvcc); more: the GEMM kernel."""
    if x.shape[0] <= cuda_gemv_max_tokens():
        return torch.ops.lowrank_kernels.nf4_lowrank_gemv(
            x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias
        )
    return triton_or_reference_gemm()[0](x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias)


def nf4_lowrank_gemv_cuda(x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias):
    """CUDA GEMV when the extension was built without nvcc: the GEMM kernel serves every M."""
    return triton_or_reference_gemm()[0](x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias)


def nf4_lowrank_grad_input_cuda(grad_y, packed, absmax, blocksize, in_features, lowrank_grad, down, scale):
    return triton_or_reference_gemm()[1](grad_y, packed, absmax, blocksize, in_features, lowrank_grad, down, scale)


def huber_normal_equations_composed(w, a, b, weight_delta, loss_delta):
    """`huber_normal_equations` on a GPU: ω and ψ from the `huber_weights` kernel (Triton), then
    the normal equations as two GEMMs (cuBLAS): G = ωᵀ [a_i a_iᵀ], g = ψᵀ a. The same
    arithmetic as the fused CPU kernel, at the price of writing ω and ψ."""
    omega, psi, stats = op("huber_weights")(w, a, b, weight_delta, loss_delta)
    r = a.shape[-1]
    pairs = (a[..., :, None] * a[..., None, :]).flatten(-2)
    return (omega.mT @ pairs).unflatten(-1, (r, r)), psi.mT @ a, stats


def huber_loss_composed(w, a, b, loss_delta):
    """`huber_loss` on a GPU: the stats of the `huber_weights` kernel."""
    return op("huber_weights")(w, a, b, loss_delta, loss_delta)[2]


def spd_solve_batched(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """The `spd_solve` semantics with torch's batched Cholesky (cuSOLVER on a GPU, where batched
    small factorizations are efficient): ``gram [..., r, r]``, ``rhs [..., r]`` fp32 -> fp32
    ``(G + λI)⁻¹ g``, fp64 inside, λ = 0 unless Cholesky fails, then 1e-12 · mean diag · 1e4ᵏ
    for the systems that failed."""
    if gram.dtype != torch.float32 or rhs.dtype != torch.float32:
        raise RuntimeError(f"gram and rhs must be float32, got {gram.dtype} and {rhs.dtype}")
    if rhs.dim() < 1 or gram.shape != (*rhs.shape, rhs.shape[-1]):
        raise RuntimeError(
            f"gram must be [..., r, r] and rhs [..., r], got shapes {list(gram.shape)} and {list(rhs.shape)}"
        )
    G = gram.double()
    scale = G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-300)[..., None, None]
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    factor, info = torch.linalg.cholesky_ex(G)
    ridge = 1e-12
    while bool(info.any()) and ridge <= 1:
        failed = (info > 0)[..., None, None]
        retry, retry_info = torch.linalg.cholesky_ex(G + ridge * scale * eye)
        factor = torch.where(failed, retry, factor)
        info = torch.where(info > 0, retry_info, info)
        ridge *= 1e4
    return torch.cholesky_solve(rhs.double()[..., None], factor)[..., 0].float()


# ---- the fused linear ops: forward composition and autograd ---------------------------------------
# y = x W_resᵀ + s·lowrank_x·upᵀ + bias  (nf4_lowrank_linear / _gemv) and
# dx = dy W_res + s·lowrank_grad·down   (nf4_lowrank_linear_grad_input) are each other's
# transpose in W_res, so each one's backward is the other (at rank 0) plus thin ATen GEMMs: both
# are differentiable to any order, and so is fused_pissa_linear_nf4, whose backward uses them.


def _times_residual(x, packed, absmax, blocksize, out_features):
    """``x [M, in] @ W_resᵀ`` by the fused kernel with no low-rank term."""
    return torch.ops.lowrank_kernels.nf4_lowrank_linear(
        x, packed, absmax, blocksize, out_features, x.new_zeros(x.shape[0], 0), x.new_zeros(out_features, 0), 1.0, None
    )


def _times_residual_t(grad_y, packed, absmax, blocksize, in_features):
    """``grad_y [M, out] @ W_res`` by the fused grad-input kernel with no low-rank term."""
    return torch.ops.lowrank_kernels.nf4_lowrank_linear_grad_input(
        grad_y,
        packed,
        absmax,
        blocksize,
        in_features,
        grad_y.new_zeros(grad_y.shape[0], 0),
        grad_y.new_zeros(0, in_features),
        1.0,
    )


def _linear_setup_context(ctx, inputs, output):
    x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias = inputs
    ctx.save_for_backward(packed, absmax, lowrank_x, up)
    ctx.blocksize, ctx.scale, ctx.in_features = blocksize, scale, x.shape[1]


def _linear_backward(ctx, grad_y):
    packed, absmax, lowrank_x, up = ctx.saved_tensors
    needs_x, *_, needs_lowrank, needs_up, _, needs_bias = ctx.needs_input_grad
    grad_x = _times_residual_t(grad_y, packed, absmax, ctx.blocksize, ctx.in_features) if needs_x else None
    grad_lowrank = ctx.scale * (grad_y @ up) if needs_lowrank else None
    grad_up = ctx.scale * (grad_y.T @ lowrank_x) if needs_up else None
    grad_bias = grad_y.sum(0) if needs_bias else None
    return grad_x, None, None, None, None, grad_lowrank, grad_up, None, grad_bias


def _grad_input_setup_context(ctx, inputs, output):
    grad_y, packed, absmax, blocksize, in_features, lowrank_grad, down, scale = inputs
    ctx.save_for_backward(packed, absmax, lowrank_grad, down)
    ctx.blocksize, ctx.scale, ctx.out_features = blocksize, scale, grad_y.shape[1]


def _grad_input_backward(ctx, grad_dx):
    packed, absmax, lowrank_grad, down = ctx.saved_tensors
    needs_grad_y, *_, needs_lowrank, needs_down, _ = ctx.needs_input_grad
    grad_grad_y = _times_residual(grad_dx, packed, absmax, ctx.blocksize, ctx.out_features) if needs_grad_y else None
    grad_lowrank = ctx.scale * (grad_dx @ down.T) if needs_lowrank else None
    grad_down = ctx.scale * (lowrank_grad.T @ grad_dx) if needs_down else None
    return grad_grad_y, None, None, None, None, grad_lowrank, grad_down, None


def _fused_forward(x, packed, absmax, blocksize, A, B, bias, scale):
    """``x [M, in]`` -> ``[M, out]``: the fused kernel with the low-rank input ``x Bᵀ``."""
    return torch.ops.lowrank_kernels.nf4_lowrank_linear(
        x, packed, absmax, blocksize, A.shape[0], x @ B.T, A, scale, bias
    )


def _fused_setup_context(ctx, inputs, output):
    x, packed, absmax, blocksize, A, B, bias, scale = inputs
    ctx.save_for_backward(x, packed, absmax, A, B)
    ctx.blocksize, ctx.scale, ctx.has_bias = blocksize, scale, bias is not None


def _fused_backward(ctx, grad_y):
    """dx = dy W_res + s (dy A) B in one grad-input kernel call; dA, dB, dbias by ATen."""
    x, packed, absmax, A, B = ctx.saved_tensors
    needs_x, _, _, _, needs_A, needs_B, needs_bias, _ = ctx.needs_input_grad
    grad_lowrank = grad_y @ A  # [M, r]
    grad_x = grad_A = grad_B = grad_bias = None
    if needs_x:
        grad_x = torch.ops.lowrank_kernels.nf4_lowrank_linear_grad_input(
            grad_y, packed, absmax, ctx.blocksize, x.shape[1], grad_lowrank, B, ctx.scale
        )
    if needs_A:
        grad_A = ctx.scale * (grad_y.T @ (x @ B.T))
    if needs_B:
        grad_B = ctx.scale * (grad_lowrank.T @ x)
    if needs_bias and ctx.has_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, None, None, None, grad_A, grad_B, grad_bias, None


# ---- fake kernels --------------------------------------------------------------------------------


def _nblocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def _quantize_nf4_fake(w, blocksize):
    n = w.numel()
    return w.new_empty((n + 1) // 2, dtype=torch.uint8), w.new_empty(_nblocks(n, blocksize), dtype=torch.float32)


def _linear_fake(x, packed, absmax, blocksize, out_features, lowrank_x, up, scale, bias):
    return x.new_empty(x.shape[0], out_features)


def _huber_stats_fake(w):
    return w.new_empty((*w.shape[:-2], 2), dtype=torch.float64)


def _huber_normal_equations_fake(w, a, b, weight_delta, loss_delta):
    n, r = w.shape[-1], a.shape[-1]
    return (
        w.new_empty((*w.shape[:-2], n, r, r), dtype=torch.float32),
        w.new_empty((*w.shape[:-2], n, r), dtype=torch.float32),
        _huber_stats_fake(w),
    )


def _skinny_matmul_fake(w, x, transpose_w):
    rows = w.shape[-1] if transpose_w else w.shape[-2]
    return x.new_empty((*w.shape[:-2], rows, x.shape[-1]), dtype=torch.float32)


# ---- the table -----------------------------------------------------------------------------------


def _fused_linear_cpu(kernels: str) -> Callable[[], str]:
    m = cpu_decode_max_tokens
    return {"decode": lambda: f"{_cxx()} decode", "both": lambda: f"{_cxx()} decode (M<={m()}), panel GEMM (M>{m()})"}[
        kernels
    ]


def _gemv_label() -> str:
    return "CUDA C++ GEMV" if cuda_cpp_compiled() else _gemm()


_COMPOSED = "autograd over nf4_lowrank_linear(_grad_input)"

OPS_TABLE: tuple[Op, ...] = (
    # the extension itself
    Op("build_info", "build_info() -> str", "runtime", describe_cpu=lambda: "C++"),
    Op("cpu_bf16_gemm", "cpu_bf16_gemm() -> bool", "runtime", describe_cpu=lambda: "C++"),
    Op("output_cache_info", "output_cache_info() -> int[]", "runtime", describe_cpu=lambda: "C++"),
    Op("set_output_cache_limit", "set_output_cache_limit(int max_bytes) -> ()", "runtime", describe_cpu=lambda: "C++"),
    Op("empty_output_cache", "empty_output_cache() -> ()", "runtime", describe_cpu=lambda: "C++"),
    # NF4 storage
    Op(
        "quantize_nf4",
        "quantize_nf4(Tensor w, int blocksize) -> (Tensor packed, Tensor absmax)",
        "nf4",
        fake=_quantize_nf4_fake,
        cuda=_quantize_nf4_cuda,
        cuda_cpp="CUDA C++",
        describe_cuda=_gemm,
    ),
    Op(
        "dequantize_nf4",
        "dequantize_nf4(Tensor packed, Tensor absmax, int blocksize, int numel, ScalarType dtype) -> Tensor",
        "nf4",
        fake=lambda packed, absmax, blocksize, numel, dtype: packed.new_empty(numel, dtype=dtype),
        cuda=_dequantize_nf4_cuda,
        cuda_cpp="CUDA C++",
        describe_cuda=_gemm,
    ),
    Op(
        "dequantize_nf4.out",
        "dequantize_nf4.out(Tensor packed, Tensor absmax, int blocksize, int numel, "
        "ScalarType dtype, *, Tensor(a!) out) -> ()",
        "nf4",
        fake=lambda packed, absmax, blocksize, numel, dtype, *, out: None,
        cuda=_dequantize_nf4_out_cuda,
        cuda_cpp="CUDA C++",
        describe_cuda=_gemm,
    ),
    Op(
        "quantize_blockwise8",
        "quantize_blockwise8(Tensor x, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)",
        "nf4",
        fake=lambda x, code, blocksize: (
            x.new_empty(x.numel(), dtype=torch.uint8),
            x.new_empty(_nblocks(x.numel(), blocksize)),
        ),
        cuda=nf4_ref.quantize_blockwise8_ref,
        cuda_cpp="CUDA C++",
        describe_cuda=lambda: "PyTorch reference",
    ),
    Op(
        "dequantize_blockwise8",
        "dequantize_blockwise8(Tensor q, Tensor absmax, Tensor code, int blocksize) -> Tensor",
        "nf4",
        fake=lambda q, absmax, code, blocksize: absmax.new_empty(q.numel()),
        cuda=nf4_ref.dequantize_blockwise8_ref,
        cuda_cpp="CUDA C++",
        describe_cuda=lambda: "PyTorch reference",
    ),
    # the fused linear
    Op(
        "nf4_lowrank_linear",
        "nf4_lowrank_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, "
        "int out_features, Tensor lowrank_x, Tensor up, float scale, Tensor? bias) -> Tensor",
        "fused_linear",
        fake=_linear_fake,
        autograd=(_linear_backward, _linear_setup_context),
        cuda=nf4_lowrank_linear_cuda,
        describe_cpu=_fused_linear_cpu("both"),
        describe_cuda=lambda: (
            f"{_gemv_label()} (M<={cuda_gemv_max_tokens()}), {_gemm()} GEMM (M>{cuda_gemv_max_tokens()})"
        ),
    ),
    Op(
        "nf4_lowrank_gemv",
        "nf4_lowrank_gemv(Tensor x, Tensor packed, Tensor absmax, int blocksize, "
        "int out_features, Tensor lowrank_x, Tensor up, float scale, Tensor? bias) -> Tensor",
        "fused_linear",
        fake=_linear_fake,
        autograd=(_linear_backward, _linear_setup_context),
        cuda=nf4_lowrank_gemv_cuda,
        cuda_cpp="CUDA C++ GEMV",
        describe_cpu=_fused_linear_cpu("decode"),
        describe_cuda=_gemm,
    ),
    Op(
        "nf4_lowrank_linear_grad_input",
        "nf4_lowrank_linear_grad_input(Tensor grad_y, Tensor packed, "
        "Tensor absmax, int blocksize, int in_features, Tensor lowrank_grad, Tensor down, float scale) -> Tensor",
        "fused_linear",
        fake=lambda grad_y, packed, absmax, blocksize, in_features, lowrank_grad, down, scale: grad_y.new_empty(
            grad_y.shape[0], in_features
        ),
        autograd=(_grad_input_backward, _grad_input_setup_context),
        cuda=nf4_lowrank_grad_input_cuda,
        describe_cpu=_fused_linear_cpu("both"),
        describe_cuda=lambda: f"{_gemm()} GEMM",
    ),
    Op(
        "fused_pissa_linear_nf4",
        "fused_pissa_linear_nf4(Tensor x, Tensor packed, Tensor absmax, int blocksize, "
        "Tensor A, Tensor B, Tensor? bias, float scale) -> Tensor",
        "fused_linear",
        fake=lambda x, packed, absmax, blocksize, A, B, bias, scale: x.new_empty(x.shape[0], A.shape[0]),
        autograd=(_fused_backward, _fused_setup_context),
        cuda=_fused_forward,
        cpu_python=_fused_forward,
        describe_cpu=lambda: _COMPOSED,
        describe_cuda=lambda: _COMPOSED,
    ),
    # decompositions
    Op(
        "row_col_sq_norms",
        "row_col_sq_norms(Tensor w) -> (Tensor row_norms, Tensor col_norms)",
        "decompose",
        fake=lambda w: (
            w.new_empty(w.shape[:-1], dtype=torch.float32),
            w.new_empty((*w.shape[:-2], w.shape[-1]), dtype=torch.float32),
        ),
        cuda=_row_col_sq_norms_cuda,
        cuda_cpp="CUDA C++",
        describe_cuda=_gemm,
    ),
    Op(
        "gram",
        "gram(Tensor y) -> Tensor",
        "decompose",
        fake=lambda y: y.new_empty((*y.shape[:-2], y.shape[-1], y.shape[-1]), dtype=torch.float32),
        cuda=_gram_cuda,
        describe_cuda=_gemm,
    ),
    Op(
        "skinny_matmul",
        "skinny_matmul(Tensor w, Tensor x, bool transpose_w) -> Tensor",
        "decompose",
        fake=_skinny_matmul_fake,
        describe_cuda=lambda: "unused (rsvd uses cuBLAS)",
    ),
    # Robust PiSSA
    Op(
        "huber_weights",
        "huber_weights(Tensor w, Tensor a, Tensor b, Tensor weight_delta, Tensor loss_delta) -> "
        "(Tensor omega, Tensor psi, Tensor stats)",
        "robust",
        fake=lambda w, a, b, weight_delta, loss_delta: (
            torch.empty_like(w, dtype=torch.float32),
            torch.empty_like(w, dtype=torch.float32),
            _huber_stats_fake(w),
        ),
        cuda=huber_weights_cuda,
        describe_cuda=_gemm,
    ),
    Op(
        "spd_solve",
        "spd_solve(Tensor gram, Tensor rhs) -> Tensor",
        "robust",
        fake=lambda gram, rhs: torch.empty_like(rhs),
        cuda=spd_solve_batched,
        describe_cuda=lambda: "torch.linalg (batched Cholesky)",
    ),
    Op(
        "huber_normal_equations",
        "huber_normal_equations(Tensor w, Tensor a, Tensor b, Tensor weight_delta, "
        "Tensor loss_delta) -> (Tensor gram, Tensor grad, Tensor stats)",
        "robust",
        fake=_huber_normal_equations_fake,
        cuda=huber_normal_equations_composed,
        describe_cuda=lambda: f"huber_weights ({_gemm()}) + cuBLAS GEMMs",
    ),
    Op(
        "huber_loss",
        "huber_loss(Tensor w, Tensor a, Tensor b, Tensor loss_delta) -> Tensor",
        "robust",
        fake=lambda w, a, b, loss_delta: _huber_stats_fake(w),
        cuda=huber_loss_composed,
        describe_cuda=lambda: f"huber_weights ({_gemm()}) + cuBLAS GEMMs",
    ),
)
REGISTRY: dict[str, Op] = {entry.name: entry for entry in OPS_TABLE}


def names(group: str | None = None) -> tuple[str, ...]:
    """The ops of one group, or every op that computes on tensors (all groups but runtime)."""
    return tuple(e.name for e in OPS_TABLE if e.group == group or (group is None and e.group != "runtime"))


def backends() -> dict[str, dict[str, str]]:
    """op -> {device type -> kernel(s) serving it, with the token ranges of each}, for every op
    that computes on tensors."""

    def cuda(entry: Op) -> str:
        return entry.cuda_backend() if torch.version.cuda else "unavailable (CPU-only torch)"

    if _extension.load_error() is not None:
        return {name: {"cpu": "unavailable (extension not built)", "cuda": "unavailable"} for name in names()}
    return {name: {"cpu": REGISTRY[name].describe_cpu(), "cuda": cuda(REGISTRY[name])} for name in names()}


# ---- registration --------------------------------------------------------------------------------

_stub_library: torch.library.Library | None = None


def _define_stubs() -> None:
    """Without the extension: every op defined from its schema with a kernel that raises
    `ExtensionNotBuiltError` (or `UnsupportedIsaError`), so that even a direct
    ``torch.ops.lowrank_kernels.<op>`` call says what is missing (rather than AttributeError).

    When the shared library loaded but its module init refused the CPU kernels (a
    LOWRANK_KERNELS_ISA this CPU lacks), its schemas exist already and no CPU kernel is
    registered: the stubs then only fill the dispatch keys that have no kernel."""
    global _stub_library

    def missing(*args, **kwargs):
        _extension.require()

    defined = any(name.startswith(f"{NAMESPACE}::") for name in torch._C._dispatch_get_all_op_names())
    _stub_library = torch.library.Library(NAMESPACE, "FRAGMENT" if defined else "DEF")
    for entry in OPS_TABLE:
        if not defined:
            _stub_library.define(entry.schema)
        elif _has_kernel(entry, "CompositeImplicitAutograd", "CompositeExplicitAutograd", "CPU"):
            continue  # served by the library as it is (build_info, the output cache ops)
        for key in ("CompositeExplicitAutograd", "Meta"):
            if not _has_kernel(entry, key):
                _stub_library.impl(entry.name, missing, key)


def _has_kernel(entry: Op, *keys: str) -> bool:
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(entry.qualname, key) for key in keys)


def _register(entry: Op) -> None:
    if entry.fake is not None:
        torch.library.register_fake(entry.qualname, entry.fake)
    if entry.cpu_python is not None:
        torch.library.register_kernel(entry.qualname, "cpu", entry.cpu_python)
    if torch.version.cuda and entry.cuda is not None and (entry.cuda_cpp is None or not cuda_cpp_compiled()):
        torch.library.register_kernel(entry.qualname, "cuda", entry.cuda)
    if entry.autograd is not None:
        backward, setup_context = entry.autograd
        torch.library.register_autograd(entry.qualname, backward, setup_context=setup_context)


def register() -> None:
    """Installs the table (run once, on import)."""
    if _extension.load_error() is not None:
        _define_stubs()
        return
    for entry in OPS_TABLE:
        _register(entry)


register()
