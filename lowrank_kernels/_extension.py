"""Loading of the compiled core, ``lowrank_kernels._C``, which registers torch.ops.lowrank_kernels.

Importing the package never fails because the extension is missing; calling an op does, with
a message naming the build command (never a silent slow path). The CPU kernels' instruction set
is chosen when _C loads (csrc/cpu/isa_dispatch.cpp): the best this CPU runs, or the one
LOWRANK_KERNELS_ISA=scalar|avx2|avx512 forces; forcing one the CPU lacks makes the load fail
with UnsupportedIsaError.
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


class UnsupportedIsaError(RuntimeError):
    """LOWRANK_KERNELS_ISA names CPU kernels this CPU cannot run (or no ISA at all)."""


@cache
def _load_failure() -> ImportError | RuntimeError | None:
    try:
        importlib.import_module("lowrank_kernels._C")
    except ImportError as exc:
        return exc
    except RuntimeError as exc:  # raised by PyInit__C for a LOWRANK_KERNELS_ISA this CPU lacks
        return UnsupportedIsaError(str(exc))
    return None


def load_error() -> str | None:
    """None when the extension is loaded, else why it could not be."""
    failure = _load_failure()
    return None if failure is None else str(failure)


def require() -> None:
    """Raises ExtensionNotBuiltError unless the compiled ops are available, UnsupportedIsaError
    when LOWRANK_KERNELS_ISA forces kernels this CPU cannot run."""
    failure = _load_failure()
    if isinstance(failure, UnsupportedIsaError):
        raise UnsupportedIsaError(f"lowrank_kernels' CPU kernels were not loaded: {failure}")
    if failure is not None:
        raise ExtensionNotBuiltError(
            f"lowrank_kernels' compiled extension (lowrank_kernels._C) is not available: {failure}; {BUILD_HINT}"
        )


@cache
def compiled_config() -> dict:
    """What the binary was compiled with (C++ build_info op), {} if it is not loaded."""
    if load_error() is not None:
        return {}
    import torch

    return json.loads(torch.ops.lowrank_kernels.build_info())
