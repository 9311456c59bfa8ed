"""PiSSALinear: an ``nn.Linear`` replaced by a frozen residual plus a trainable low-rank adapter,
``y = x W_resᵀ + s (x Bᵀ) Aᵀ + bias`` (ARCHITECTURE.md, notation), run by `fused_pissa_linear`.

The residual is a dense buffer (PiSSA) or NF4 storage (QPiSSA) whose packed codes and absmax
statistics are buffers, so ``state_dict()`` carries them; ``A [out, r]`` and ``B [r, in]`` are the
only parameters; the bias is a frozen buffer. `adapter_split` turns weights into these tensors
(batched over same-shape layers) and is shared with model conversion.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
from torch import nn

from lowrank_kernels import decompose
from lowrank_kernels._checks import FLOAT_DTYPES, describe, is_int, is_real
from lowrank_kernels.adapters.inits import check_init, init_factors
from lowrank_kernels.adapters.qpissa import _check_iters, dense_residual, qpissa_factors
from lowrank_kernels.fused_linear import fused_pissa_linear
from lowrank_kernels.nf4 import NF4Weight, check_blocksize

QUANTIZE = (None, "nf4")
_NF4_FIELDS = ("packed", "absmax", "offset", "absmax2", "code2")  # NF4Weight's tensors, buffers "residual_<field>"


# ---- options ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdapterOptions:
    """How weights become adapters (everything but the rank-vs-shape check, which needs the weight)."""

    rank: int
    init: str = "rsvd"
    scale: float = 1.0
    quantize: str | None = None
    quant_iters: int = 1
    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        check_init(self.init)
        if not is_real(self.scale) or not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"scale must be a finite number > 0 (W = W_res + scale·A·B), got {self.scale!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be None (dense residual) or 'nf4', got {self.quantize!r}")
        _check_iters(self.quant_iters)
        check_blocksize(self.blocksize)
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {self.double_quant!r}")

    def check_weight(self, W: torch.Tensor, name: str = "linear") -> None:
        """Raises if ``W [out, in]`` cannot take this adapter (dtype, rank too large)."""
        if W.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: weight must be float32, bfloat16 or float16, got {describe(W)}")
        if self.rank > min(W.shape[-2:]):
            raise ValueError(
                f"{name}: rank {self.rank} exceeds min(out_features, in_features) = {min(W.shape[-2:])} "
                f"of its weight [out, in] = {list(W.shape[-2:])}"
            )


class AdapterSplit(NamedTuple):
    """``A [..., m, r]``, ``B [..., r, n]`` (W's dtype) and the frozen residual: dense
    ``[..., m, n]`` or one `NF4Weight` ``[m, n]`` per matrix; ``W ≈ residual + s A B``."""

    A: torch.Tensor
    B: torch.Tensor
    residual: torch.Tensor | list[NF4Weight]


def adapter_split(
    W: torch.Tensor, options: AdapterOptions, generator: decompose.Generators = None, **init_options
) -> AdapterSplit:
    """The adapter tensors of ``W [..., m, n]`` (a batch of same-shape layers at once).

    The init (or QPiSSA, when quantized) splits ``W = W_res + A B``; a scale s ≠ 1 then divides
    A and B by √s each, so that ``s A B`` is still the principal part and the adapted layer equals
    the original at init. A dense residual is then recomputed from the stored (rounded) A and B:
    it absorbs their rounding, so ``W_res + s A B`` reproduces W to one rounding of W's dtype."""
    if options.quantize is None:
        A, B, residual = init_factors(W, options.rank, options.init, generator=generator, **init_options)
    else:
        A, B, residual = qpissa_factors(
            W,
            options.rank,
            init=options.init,
            iters=options.quant_iters,
            blocksize=options.blocksize,
            double_quant=options.double_quant,
            generator=generator,
            **init_options,
        )
    if options.scale != 1:
        root = math.sqrt(options.scale)
        A, B = (A.float() / root).to(W.dtype), (B.float() / root).to(W.dtype)
        if options.quantize is None:
            residual = decompose.residual(W, A.float() * options.scale, B)
    return AdapterSplit(A, B, residual)


# ---- the module --------------------------------------------------------------------------------------


class PiSSALinear(nn.Module):
    """``y = x W_resᵀ + scale (x Bᵀ) Aᵀ + bias`` for ``x [..., in_features]``.

    Buffers: ``residual [out, in]`` (dense) or ``residual_packed`` / ``residual_absmax`` (+
    ``residual_offset`` / ``residual_absmax2`` / ``residual_code2`` with double quant), NF4 in
    bitsandbytes' layout; ``bias [out]`` or None. Parameters: ``A [out, r]``, ``B [r, in]``.
    A, B, the bias and a dense residual share one dtype (the original layer's, or what ``.to``
    casts them to); the NF4 statistics stay fp32 and the NF4 residual dequantizes to that dtype.
    Build one with `from_linear`; `merge` turns it back into an ``nn.Linear``.
    """

    def __init__(
        self,
        residual: torch.Tensor | NF4Weight,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        scale: float = 1.0,
        init: str = "rsvd",
    ) -> None:
        super().__init__()
        _check_parts(residual, A, B, bias)
        AdapterOptions(A.shape[1], init, scale)  # checks init and scale
        self.out_features, self.in_features = residual.shape
        self.rank = A.shape[1]
        self.scale = float(scale)
        self.init = init
        self.quantize = "nf4" if isinstance(residual, NF4Weight) else None
        self.blocksize = residual.blocksize if self.quantize else None
        self.double_quant = residual.double_quant if self.quantize else False
        self.A = nn.Parameter(A.detach())
        self.B = nn.Parameter(B.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        if self.quantize:
            for field in _NF4_FIELDS:
                if getattr(residual, field) is not None:
                    self.register_buffer(f"residual_{field}", getattr(residual, field))
        else:
            self.register_buffer("residual", residual.detach())

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        *,
        init: str = "rsvd",
        scale: float = 1.0,
        quantize: str | None = None,
        quant_iters: int = 1,
        blocksize: int = 64,
        double_quant: bool = False,
        generator: torch.Generator | None = None,
        **init_options,
    ) -> PiSSALinear:
        """Splits ``linear.weight [out, in]`` by the named init (svd / rsvd / cur / robust /
        random; ``init_options`` go to it) into a trainable rank-``rank`` adapter and a frozen
        residual, dense or NF4 (``quantize="nf4"``: QPiSSA with ``quant_iters`` refinement
        rounds, see `qpissa_factors`). At init the layer computes the original one's output
        (exactly up to rounding when dense, up to the NF4 error when quantized)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        options = AdapterOptions(rank, init, scale, quantize, quant_iters, blocksize, double_quant)
        weight = linear.weight.detach()
        options.check_weight(weight)
        A, B, residual = adapter_split(weight, options, generator, **init_options)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(residual[0] if isinstance(residual, list) else residual, A, B, bias, scale=scale, init=init)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` / ``.half()`` must not cast the NF4 statistics (fp32 absmax, uint8
        codes): they only follow the device. The adapter and bias take the new dtype, and the
        residual then dequantizes to it."""
        nf4 = {name: buffer for name, buffer in self._buffers.items() if self.quantize and name.startswith("residual_")}
        for name in nf4:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buffer in nf4.items():
                self._buffers[name] = buffer.to(self.A.device)
        return self

    # ---- views of the residual ----

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def residual_weight(self) -> torch.Tensor | NF4Weight:
        """The frozen residual as `fused_pissa_linear` takes it: dense ``[out, in]`` or `NF4Weight`."""
        if not self.quantize:
            return self.residual
        tensors = {field: getattr(self, f"residual_{field}", None) for field in _NF4_FIELDS}
        return NF4Weight(
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.dtype,
            blocksize=self.blocksize,
            **tensors,
        )

    def dequantized_residual(self) -> torch.Tensor:
        """Dense ``[out, in]`` residual in the layer's dtype."""
        return dense_residual(self.residual_weight())

    # ---- compute ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_pissa_linear(x, self.residual_weight(), self.A, self.B, self.bias, self.scale)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``deq(W_res) + scale·A·B`` (summed in fp32, rounded once
        to the layer's dtype) and this layer's bias: the same function, without the adapter."""
        weight = torch.addmm(self.dequantized_residual().float(), self.A.float(), self.B.float(), alpha=self.scale)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.A.device, dtype=self.dtype
        )
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        residual = (
            f"nf4 (blocksize {self.blocksize}{', double quant' if self.double_quant else ''})"
            if self.quantize
            else "dense"
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"scale={self.scale:g}, init={self.init!r}, residual={residual}, bias={self.bias is not None}"
        )


def _check_parts(residual: Any, A: Any, B: Any, bias: Any) -> None:
    """A PiSSALinear's tensors must fit together: clear errors naming the argument, shape and dtype."""
    if isinstance(residual, NF4Weight):
        if len(residual.shape) != 2:
            raise ValueError(f"residual must be a 2-D [out, in] NF4 weight, got shape {tuple(residual.shape)}")
        device = residual.device
    elif isinstance(residual, torch.Tensor):
        if residual.dim() != 2 or residual.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"residual must be a float32/bfloat16/float16 [out, in] tensor or an NF4Weight, "
                f"got {describe(residual)}"
            )
        device = residual.device
    else:
        raise TypeError(f"residual must be a torch.Tensor or an NF4Weight, got {type(residual).__name__}")
    out_features, in_features = residual.shape
    for t, name in ((A, "A"), (B, "B"), (bias, "bias")):
        if name == "bias" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != residual.dtype or t.device != device:
            raise TypeError(
                f"{name} must have the residual's dtype {residual.dtype} and device {device}, got {describe(t)}"
            )
    if (
        A.dim() != 2
        or A.shape[0] != out_features
        or B.dim() != 2
        or B.shape[1] != in_features
        or A.shape[1] != B.shape[0]
        or A.shape[1] < 1
    ):
        raise ValueError(
            f"A must be [out, r] = [{out_features}, r] and B [r, in] = [r, {in_features}] with one r >= 1, "
            f"got A {describe(A)}, B {describe(B)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape [{out_features}], got {describe(bias)}")
