"""Triton kernel tests: on a machine without a GPU they run on CPU tensors under
TRITON_INTERPRET=1, which Triton reads when a kernel is decorated, so this directory runs in
its own pytest process (`make test` does that)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))  # nf4_cases

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    raise pytest.UsageError("tests/triton needs a GPU or TRITON_INTERPRET=1 (run `make test`)")

TRITON_DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture
def triton_device() -> str:
    return TRITON_DEVICE


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    """Every test under tests/triton carries the `triton` marker."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.triton)
