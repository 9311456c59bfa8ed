"""The Triton kernel tests (tests/triton) in a pytest process of their own under
TRITON_INTERPRET=1, on CPU tensors: plain `pytest`, `make test` and `pytest -m "not slow"` run
them whatever the environment of the calling process (conftest.py leaves the directory out of
this process's collection)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import TRITON_TESTS, triton_runs_in_this_process

#: The interpreted suite takes minutes on 2 cores; this bounds a hang.
TIMEOUT_S = 1800


@pytest.mark.triton
def test_triton_kernels_pass_under_the_interpreter(request, capsys):
    if triton_runs_in_this_process():
        pytest.skip("tests/triton is collected in this process (GPU or TRITON_INTERPRET=1)")
    command = [sys.executable, "-m", "pytest", str(TRITON_TESTS), "-q", "-p", "no:cacheprovider"]
    if request.config.option.markexpr:
        command += ["-m", request.config.option.markexpr]
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)"
    with capsys.disabled():
        print(f"\ntests/triton under TRITON_INTERPRET=1: {summary}")
    assert result.returncode == 0, f"tests/triton failed:\n{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
