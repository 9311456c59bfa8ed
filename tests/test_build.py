"""The build: what was compiled, the op registry, and the error when the extension is missing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch

import lowrank_kernels as lk
from lowrank_kernels import ops


def cuda_build_expected() -> bool:
    """setup.py builds the CUDA sources when torch is a CUDA build and nvcc is found, unless
    LOWRANK_KERNELS_CUDA=0."""
    toolkit = shutil.which("nvcc") or os.environ.get("CUDA_HOME")
    return bool(torch.version.cuda and toolkit) and os.environ.get("LOWRANK_KERNELS_CUDA", "auto") != "0"


def test_cpu_kernels_compiled():
    info = lk.build_info()
    assert info["extension_loaded"] and info["load_error"] is None
    assert info["cpu_kernels"] is True


def test_cuda_sources_compiled_when_expected():
    info = lk.build_info()
    if not cuda_build_expected():
        assert info["cuda_kernels"] is False
        return
    assert info["cuda_kernels"], "CUDA sources were expected to compile (CUDA torch + nvcc) but the build has none"
    expected = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(",", ";").split(";")
    assert info["cuda_archs"] == [a for a in expected if a]
    backends = info["backends"]
    assert all(backends[op]["cuda"] == "CUDA C++" for op in ops.NF4_OPS)
    assert backends["nf4_lowrank_gemv"]["cuda"] == "CUDA C++ GEMV"
    assert backends["nf4_lowrank_linear"]["cuda"].startswith(f"CUDA C++ GEMV (M<={ops.cuda_gemv_max_tokens()})")


def test_every_op_has_a_cpu_and_cuda_backend():
    backends = lk.build_info()["backends"]
    assert set(backends) == set(ops.OPS)
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("lowrank_kernels::")}
    assert set(ops.OPS) <= registered
    for op, per_device in backends.items():
        assert per_device["cpu"].startswith("C++") or op == "fused_pissa_linear_nf4"


def test_build_info_reports_token_dispatch():
    """Which kernel serves which token count is part of the compiled configuration."""
    backends = lk.build_info()["backends"]
    decode_max = ops.cpu_decode_max_tokens()
    assert decode_max >= 1 and ops.cuda_gemv_max_tokens() >= 1
    assert f"decode (M<={decode_max}), panel GEMM (M>{decode_max})" in backends["nf4_lowrank_linear"]["cpu"]


def test_format_build_info_lists_every_op():
    text = lk.format_build_info()
    for op in ops.OPS:
        assert op in text


def test_missing_extension_gives_clear_error():
    code = (
        "import sys; sys.modules['lowrank_kernels._C'] = None\n"
        "import torch, lowrank_kernels as lk\n"
        "assert lk.build_info()['extension_loaded'] is False\n"
        "try:\n"
        "    lk.quantize_nf4(torch.randn(4, 64))\n"
        "except lk.ExtensionNotBuiltError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "lowrank_kernels._C" in result.stdout
    assert "pip install --no-build-isolation -e ." in result.stdout


def test_cli_info_runs():
    result = subprocess.run([sys.executable, "-m", "lowrank_kernels", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "quantize_nf4" in result.stdout and "nf4_lowrank_linear" in result.stdout
