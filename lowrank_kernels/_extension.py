"""Loading of the compiled core, ``lowrank_kernels._C``, which registers torch.ops.lowrank_kernels.

Importing the package never fails because the extension is missing; calling an op does, with
a message naming the build command (never a silent slow path).
"""
from __future__ import annotations

import importlib
import json
from functools import cache

BUILD_HINT = (
    "build it from the repository root with `make test` (or `make demo`), or by hand with "
    "`pip install --no-build-isolation -e .`"
)


class ExtensionNotBuiltError(RuntimeError):
    """The compiled extension lowrank_kernels._C is missing or failed to load."""


@cache
def load_error() -> str | None:
    """None when the extension is loaded, else why it could not be."""
    try:
        importlib.import_module("lowrank_kernels._C")
    except ImportError as exc:
        return str(exc)
    return None


def require() -> None:
    """Raises ExtensionNotBuiltError unless the compiled ops are available."""
    error = load_error()
    if error is not None:
        raise ExtensionNotBuiltError(
            f"lowrank_kernels' compiled extension (lowrank_kernels._C) is not available: {error}; {BUILD_HINT}"
        )


@cache
def compiled_config() -> dict:
    """What the binary was compiled with (C++ build_info op), {} if it is not loaded."""
    if load_error() is not None:
        return {}
    import torch

    return json.loads(torch.ops.lowrank_kernels.build_info())
