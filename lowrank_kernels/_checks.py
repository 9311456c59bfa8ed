"""Argument checks shared by the Python APIs: each error names the argument, its shape and dtype."""

from __future__ import annotations

from typing import Any

import torch

#: The dtypes the kernels take for weights and activations.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe(t: torch.Tensor) -> str:
    """``shape (...), dtype ..., device ...`` of a tensor, for error messages."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, float) or is_int(value)


def check_matrix(W: Any, finite: bool = True) -> torch.Tensor:
    """W as a float matrix or batch; ``finite=False`` leaves the NaN/Inf scan to the caller (rsvd
    does it on its first sketch instead of a separate pass over W)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in FLOAT_DTYPES:
        raise TypeError(f"W must be float32, float16 or bfloat16, got {describe(W)}")
    if W.dim() < 2:
        raise ValueError(f"W must be a matrix [m, n] or a batch [..., m, n], got {describe(W)}")
    if W.shape[-1] == 0 or W.shape[-2] == 0:
        raise ValueError(f"W must have m, n >= 1, got {describe(W)}")
    if W.numel() == 0:
        raise ValueError(f"W's batch holds no matrices, got {describe(W)}")
    # One cheap reduction: a NaN or Inf element makes the sum non-finite (so does an overflowing
    # sum of huge finite values, which the exact elementwise check then clears).
    if finite and not torch.isfinite(W.sum(dtype=torch.float32)):
        check_finite(W)
    return W


def check_finite(W: torch.Tensor) -> None:
    """The exact elementwise scan, after a cheap reduction came out non-finite (a huge but finite
    W can overflow a sum, and passes)."""
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"W contains NaN or Inf ({describe(W)})")


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_rank(W: torch.Tensor, rank: Any) -> int:
    return check_int(rank, "rank", 1, min(W.shape[-2:]))


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
