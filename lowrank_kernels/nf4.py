"""NF4 weight storage, bit-compatible with bitsandbytes 0.50.

`quantize_nf4(W)` turns a 1-D/2-D float tensor into an `NF4Weight`: packed 4-bit codes (two
per byte, first element in the high nibble), per-block fp32 absmax (or, with double quant,
8-bit absmax plus second-level statistics), and the original shape, dtype and blocksize.
`dequantize_nf4(q)` inverts it. Conversions to and from bitsandbytes' `QuantState` /
`Params4bit`, a tensor-only `state_dict()` and safetensors files round-trip bit-exactly.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from lowrank_kernels import ops
from lowrank_kernels._checks import FLOAT_DTYPES, describe, is_int
from lowrank_kernels.codebooks import DOUBLE_QUANT_BLOCKSIZE, dynamic_code, nf4_code

FORMAT_VERSION = 1
_DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_IDS_DTYPE = {v: k for k, v in _DTYPE_IDS.items()}


def check_blocksize(blocksize: Any) -> int:
    if not is_int(blocksize):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__} {blocksize!r}")
    if not 32 <= blocksize <= 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    return blocksize


def _check_weight(w: Any) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"W must be float32, float16 or bfloat16, got {describe(w)}")
    if w.dim() not in (1, 2):
        raise ValueError(f"W must be 1-D or 2-D, got {describe(w)}")
    return w


@dataclasses.dataclass(frozen=True, eq=False)
class NF4Weight:
    """An NF4-quantized weight (all tensors on one device).

    packed:   uint8 ``[ceil(numel / 2)]`` codes, first element in the high nibble.
    absmax:   fp32 ``[blocks]`` per-block absmax, or uint8 ``[blocks]`` with double quant.
    shape, dtype, blocksize: of the original tensor (dtype is what `dequantize` returns).
    offset:   double quant only: fp32 0-d mean subtracted from absmax before 8-bit coding.
    absmax2:  double quant only: fp32 ``[ceil(blocks / 256)]`` absmax of the 8-bit blocks.
    code2:    double quant only: fp32 ``[256]`` dynamic code book of the 8-bit absmax.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", torch.Size(self.shape))
        _validate(self)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def block_absmax(self) -> torch.Tensor:
        """fp32 ``[blocks]`` absmax, decoding the double-quant statistics if present."""
        if not self.double_quant:
            return self.absmax
        decoded = ops.op("dequantize_blockwise8")(self.absmax, self.absmax2, self.code2, DOUBLE_QUANT_BLOCKSIZE)
        return decoded + self.offset

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dequantized weight, ``dtype`` and ``shape`` of the original (into ``out`` if given)."""
        args = (self.packed, self.block_absmax(), self.blocksize, self.numel, self.dtype)
        if out is None:
            return ops.op("dequantize_nf4")(*args).view(self.shape)
        if out.shape != self.shape or out.dtype != self.dtype or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous {self.dtype} tensor of shape {tuple(self.shape)}, got {describe(out)}"
            )
        ops.op("dequantize_nf4").out(*args, out=out.view(-1))
        return out

    def to(self, device: torch.device | str) -> NF4Weight:
        return dataclasses.replace(
            self, **{f: getattr(self, f).to(device) for f in _TENSOR_FIELDS if getattr(self, f) is not None}
        )

    # ---- state dict / safetensors -------------------------------------------------------------

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-ready); the metadata is an int64 tensor ``nf4_meta``:
        [format version, blocksize, dtype id, ndim, *shape]."""
        meta = [FORMAT_VERSION, self.blocksize, _DTYPE_IDS[self.dtype], len(self.shape), *self.shape]
        sd = {prefix + "nf4_meta": torch.tensor(meta, dtype=torch.int64)}
        sd.update({prefix + f: getattr(self, f) for f in _TENSOR_FIELDS if getattr(self, f) is not None})
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "") -> NF4Weight:
        key = prefix + "nf4_meta"
        if key not in sd:
            raise KeyError(f"state dict has no {key!r}: not an NF4 weight (keys: {sorted(sd)[:8]})")
        meta = sd[key].tolist()
        if len(meta) < 4 or meta[0] != FORMAT_VERSION:
            raise ValueError(f"{key}: unsupported NF4 format {meta[:1]} (this library reads version {FORMAT_VERSION})")
        _, blocksize, dtype_id, ndim, *shape = meta
        if dtype_id not in _IDS_DTYPE or ndim != len(shape):
            raise ValueError(f"{key}: corrupted metadata {meta}")
        tensors = {f: sd.get(prefix + f) for f in _TENSOR_FIELDS}
        if tensors["packed"] is None or tensors["absmax"] is None:
            raise KeyError(f"state dict lacks {prefix}packed / {prefix}absmax")
        return cls(shape=torch.Size(shape), dtype=_IDS_DTYPE[dtype_id], blocksize=blocksize, **tensors)

    # ---- bitsandbytes interop ------------------------------------------------------------------

    def to_bnb(self) -> tuple[torch.Tensor, Any]:
        """(packed uint8 ``[ceil(n/2), 1]``, bitsandbytes.functional.QuantState)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(
                absmax=self.absmax2, code=self.code2, blocksize=DOUBLE_QUANT_BLOCKSIZE, dtype=torch.float32
            )
        state = QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=nf4_code(self.device),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )
        return self.packed.view(-1, 1), state

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state: Any) -> NF4Weight:
        """From bitsandbytes' packed data and QuantState (plain or double quant)."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"quant_state.quant_type must be 'nf4', got {quant_state.quant_type!r}")
        packed = packed.view(torch.uint8).reshape(-1)
        if quant_state.nested:
            s2 = quant_state.state2
            return cls(
                packed,
                quant_state.absmax.reshape(-1),
                quant_state.shape,
                quant_state.dtype,
                quant_state.blocksize,
                offset=quant_state.offset.float().reshape(()),
                absmax2=s2.absmax.reshape(-1),
                code2=s2.code,
            )
        return cls(packed, quant_state.absmax.reshape(-1), quant_state.shape, quant_state.dtype, quant_state.blocksize)

    def to_params4bit(self) -> Any:
        """A bitsandbytes.nn.Params4bit holding this weight (frozen)."""
        from bitsandbytes.nn import Params4bit

        packed, state = self.to_bnb()
        return Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type="nf4",
            bnb_quantized=True,
        )

    @classmethod
    def from_params4bit(cls, param: Any) -> NF4Weight:
        return cls.from_bnb(param.data, param.quant_state)


_TENSOR_FIELDS = ("packed", "absmax", "offset", "absmax2", "code2")


def _validate(q: NF4Weight) -> None:
    check_blocksize(q.blocksize)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"NF4Weight.dtype must be float32, float16 or bfloat16, got {q.dtype}")
    if len(q.shape) not in (1, 2) or any(d < 0 for d in q.shape):
        raise ValueError(f"NF4Weight.shape must be 1-D or 2-D, got {tuple(q.shape)}")
    n = q.shape.numel()
    blocks = -(-n // q.blocksize)
    _expect(q.packed, "packed", torch.uint8, (n + 1) // 2, q.device)
    dq = (q.offset, q.absmax2, q.code2)
    if all(t is None for t in dq):
        _expect(q.absmax, "absmax", torch.float32, blocks, q.device)
    elif any(t is None for t in dq):
        raise ValueError("double quant needs offset, absmax2 and code2 together")
    else:
        _expect(q.absmax, "absmax", torch.uint8, blocks, q.device)
        _expect(q.offset, "offset", torch.float32, 1, q.device)
        _expect(q.absmax2, "absmax2", torch.float32, -(-blocks // DOUBLE_QUANT_BLOCKSIZE), q.device)
        _expect(q.code2, "code2", torch.float32, 256, q.device)


def _expect(t: Any, name: str, dtype: torch.dtype, numel: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"NF4Weight.{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or t.numel() != numel or t.device != device:
        raise ValueError(f"NF4Weight.{name} must be {dtype} with {numel} elements on {device}, got {describe(t)}")


def quantize_nf4(W: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantizes a 1-D/2-D fp32/fp16/bf16 tensor to NF4.

    Bit-identical to ``bitsandbytes.functional.quantize_4bit(W, quant_type="nf4",
    blocksize=blocksize, compress_statistics=double_quant)``. NaN/Inf entries are rejected.
    """
    W = _check_weight(W)
    blocksize = check_blocksize(blocksize)
    packed, absmax = ops.op("quantize_nf4")(W, blocksize)
    bad = ~torch.isfinite(absmax)
    if bool(bad.any()):
        raise ValueError(
            f"W contains NaN or Inf ({int(bad.sum())} of {absmax.numel()} blocks of {blocksize} affected); {describe(W)}"
        )
    if not double_quant:
        return NF4Weight(packed, absmax, W.shape, W.dtype, blocksize)
    offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
    if not bool(torch.isfinite(offset)):
        raise ValueError(
            f"double quant overflows: the fp32 mean of the block absmax is {float(offset)} "
            f"(max |W| = {float(absmax.max()):.4g}); use double_quant=False for weights this large; {describe(W)}"
        )
    code2 = dynamic_code(W.device)
    qabsmax, absmax2 = ops.op("quantize_blockwise8")(absmax - offset, code2, DOUBLE_QUANT_BLOCKSIZE)
    return NF4Weight(packed, qabsmax, W.shape, W.dtype, blocksize, offset=offset, absmax2=absmax2, code2=code2)


def dequantize_nf4(q: NF4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor an `NF4Weight` encodes (its original shape and dtype); equals bitsandbytes'
    ``dequantize_4bit`` exactly."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q must be an NF4Weight, got {type(q).__name__}")
    return q.dequantize(out)


def save_nf4(path: str | os.PathLike, weights: dict[str, NF4Weight], metadata: dict[str, str] | None = None) -> None:
    """Saves named NF4 weights to one safetensors file (bit-exact round trip with `load_nf4`)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, q in weights.items():
        tensors.update(q.to("cpu").state_dict(prefix=f"{name}."))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.fspath(path),
        metadata={"format": "lowrank_kernels.nf4", "version": str(FORMAT_VERSION), **(metadata or {})},
    )


def load_nf4(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, NF4Weight]:
    """Loads what `save_nf4` wrote; corrupted or foreign files raise a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.fspath(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read NF4 checkpoint {os.fspath(path)!r}: {exc}") from exc
    names = sorted(k[: -len(".nf4_meta")] for k in tensors if k.endswith(".nf4_meta"))
    if not names:
        raise ValueError(f"{os.fspath(path)!r} holds no NF4 weights")
    return {name: NF4Weight.from_state_dict(tensors, prefix=f"{name}.") for name in names}
