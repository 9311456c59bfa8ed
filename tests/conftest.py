"""Shared fixtures: devices (cpu and cuda) and float dtypes.

`device` is every device a capability test runs on. Its cuda parameter is always collected and
skipped, with the reason, on a machine without a GPU, so a test that silently never runs on
CUDA shows in every report. Tolerances that differ on a GPU (TF32 dots, FMA contraction,
approximate division in Triton kernels) live beside the test that uses them, via `on_gpu`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("lowrank", deadline=None, max_examples=60, derandomize=True)
# make gpu-check: the CUDA parametrisations within its time budget (every kernel launch of a new
# shape may compile and autotune a Triton kernel).
settings.register_profile("gpu-check", deadline=None, max_examples=15, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lowrank"))

NO_GPU = "no CUDA GPU on this machine"
TRITON_TESTS = Path(__file__).parent / "triton"


def triton_runs_in_this_process() -> bool:
    """tests/triton runs on a GPU, or on CPU tensors under TRITON_INTERPRET=1, which Triton reads
    when a kernel is decorated: it must be set before this process imported Triton."""
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    """Elsewhere tests/test_triton_interpreted.py runs tests/triton in a process of its own, so
    that plain `pytest` runs every test."""
    if collection_path == TRITON_TESTS and not triton_runs_in_this_process():
        return True
    return None


#: The fast tier's marker expression (`make test-fast`).
FAST_TIER = "not slow"
_slow_deselected = pytest.StashKey[list]()


def pytest_configure(config) -> None:
    config.stash[_slow_deselected] = []


def pytest_deselected(items) -> None:
    if items:
        config = items[0].config
        config.stash[_slow_deselected] += [item for item in items if item.get_closest_marker("slow")]


def pytest_collection_finish(session) -> None:
    """Under `-m "not slow"` every test module with a slow test keeps at least one selected test:
    a module whose tests are all slow is a module the fast tier does not cover."""
    if " ".join(session.config.option.markexpr.split()) != FAST_TIER:
        return
    selected = {item.path for item in session.items}
    uncovered = sorted({item.path for item in session.config.stash[_slow_deselected]} - selected)
    if uncovered:
        names = ", ".join(str(path.relative_to(session.config.rootpath)) for path in uncovered)
        raise pytest.UsageError(
            f"the fast tier (-m {FAST_TIER!r}) runs no test of {names}: give each module a fast test covering its code"
        )


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU))]
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=DEVICES, scope="session")
def device(request) -> str:
    """Session-scoped so that Hypothesis tests may use it."""
    return request.param


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request) -> torch.dtype:
    return request.param


def on_gpu(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"
