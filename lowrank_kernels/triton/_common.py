"""Launch helpers every Triton module uses: the torch -> Triton dtype map, the interpreter switch,
the device check of the launchers, and the fp32 -> output dtype rounding of the kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: The activation / weight dtypes the kernels take, as Triton types.
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (numpy, CPU tensors) instead of compiling."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(t: torch.Tensor, name: str) -> None:
    """A launcher's tensor argument ``name`` must be on a GPU (or a CPU tensor under the interpreter)."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreted():
        return
    raise ValueError(f"{name} must be a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1), got {t.device}")


@triton.jit
def round_to(v, OUT_TY: tl.constexpr):
    """fp32 -> OUT_TY rounding to nearest even. bf16 is rounded on the bit pattern (as GPUs do):
    the interpreter's own cast truncates, and results must match the C++/CUDA kernels. A NaN
    keeps its sign and top payload bits and gets the quiet bit: rounding its pattern would carry
    into the sign (0x7FFFFFFF, the NaN of GPU arithmetic, would become 0x8000 = -0.0)."""
    if OUT_TY == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return tl.where(is_nan, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(OUT_TY)
