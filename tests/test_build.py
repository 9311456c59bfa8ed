"""The build: what was compiled, the op registry, and the error when the extension is missing."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels import _registry, ops


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
    # Every op with a kernel in csrc/cuda (the registry's cuda_cpp) is served by it.
    for entry in _registry.OPS_TABLE:
        if entry.cuda_cpp is not None:
            source = kernel_sources(entry.name).get("CUDA", "none")
            assert "/csrc/cuda/" in source, f"{entry.name}: CUDA kernel registered at {source}"


def kernel_sources(op: str) -> dict[str, str]:
    """Dispatch key -> the file its kernel was registered from, for ``lowrank_kernels::<op>``, as
    the dispatcher records it (``CPU: registered at /path/csrc/cpu/gram_cpu.cpp:270 :: ...``;
    Python registrations show torch/library.py)."""
    sources = {}
    for line in torch._C._dispatch_dump(f"lowrank_kernels::{op}").splitlines():
        key, sep, rest = line.partition(": registered at ")
        if sep:
            sources[key] = rest.split(" :: ")[0].rsplit(":", 1)[0]
    return sources


def registered_ops() -> set[str]:
    return {
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("lowrank_kernels::")
    }


def test_backends_are_the_registered_cpu_kernels():
    """build_info()'s cpu column against the dispatcher: an op reported as C++ has its CPU kernel
    registered from csrc/cpu, any other (a composition) from Python; and the ops with a CPU
    kernel are exactly the rows of the table."""
    backends = lk.build_info()["backends"]
    assert set(backends) == set(ops.OPS)
    with_cpu_kernel = {op for op in registered_ops() if "CPU" in kernel_sources(op)}
    assert with_cpu_kernel == set(backends)
    for op, per_device in backends.items():
        source = kernel_sources(op)["CPU"]
        if per_device["cpu"].startswith("C++"):
            assert "/csrc/cpu/" in source, f"{op}: reported as {per_device['cpu']!r}, registered at {source}"
        else:
            assert source.endswith("torch/library.py"), (
                f"{op}: reported as {per_device['cpu']!r}, registered at {source}"
            )


@pytest.mark.skipif(not torch.version.cuda, reason="CPU-only torch: every cuda backend is reported unavailable")
def test_backends_are_the_registered_cuda_kernels():
    """build_info()'s cuda column against the dispatcher: "unused" / "unavailable" exactly where no
    CUDA kernel is registered; a CUDA C++ kernel alone exactly where the kernel comes from
    csrc/cuda; anything else (Triton, a composition, a split by token count) a Python kernel."""
    backends = lk.build_info()["backends"]
    with_cuda_kernel = {op for op in registered_ops() if "CUDA" in kernel_sources(op)}
    assert with_cuda_kernel == {op for op, d in backends.items() if not d["cuda"].startswith(("unused", "unavailable"))}
    for op in with_cuda_kernel:
        claim, source = backends[op]["cuda"], kernel_sources(op)["CUDA"]
        if claim in ("CUDA C++", "CUDA C++ GEMV"):
            assert "/csrc/cuda/" in source, f"{op}: reported as {claim!r}, registered at {source}"
        else:
            assert source.endswith("torch/library.py"), f"{op}: reported as {claim!r}, registered at {source}"
        if "CUDA C++ GEMV" in claim and claim != "CUDA C++ GEMV":  # dispatches to the GEMV op by token count
            assert "/csrc/cuda/" in kernel_sources("nf4_lowrank_gemv")["CUDA"]


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
    result = subprocess.run(
        [sys.executable, "-m", "lowrank_kernels", "info"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "quantize_nf4" in result.stdout and "nf4_lowrank_linear" in result.stdout


# --- Run-time ISA choice of the CPU kernels (csrc/cpu/isa_dispatch.cpp) ---------------------

# What each ISA of the kernels needs, as Linux's /proc/cpuinfo names the CPU flags.
ISA_CPU_FLAGS = {
    "avx2": {"avx2", "fma", "f16c", "bmi2"},
    "avx512": {"avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
}


def cpuinfo_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def expected_isas() -> list[str]:
    """The ISAs this CPU can run by /proc/cpuinfo (an oracle independent of the C++ cpuid probe)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["scalar"]
    flags = cpuinfo_flags()
    return ["scalar"] + [isa for isa, needs in ISA_CPU_FLAGS.items() if needs <= flags]


def run_with_isa(isa: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOWRANK_KERNELS_ISA": isa}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs Linux's /proc/cpuinfo as the oracle")
def test_default_isa_is_the_best_this_cpu_runs():
    if os.environ.get("LOWRANK_KERNELS_ISA"):
        pytest.skip("LOWRANK_KERNELS_ISA forces an ISA in this process")
    info = lk.build_info()
    assert info["cpu_isas_supported"] == expected_isas()
    assert info["cpu_simd"] == expected_isas()[-1]


FORCED_ISA_CHECK = (
    "import torch, lowrank_kernels as lk\n"
    "from lowrank_kernels.reference.nf4 import dequantize_nf4_ref, quantize_nf4_ref\n"
    "info = lk.build_info()\n"
    "print(info['cpu_simd'], info['backends']['quantize_nf4']['cpu'])\n"
    "w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))\n"
    "packed, absmax = torch.ops.lowrank_kernels.quantize_nf4(w, 64)\n"
    "ref_packed, ref_absmax = quantize_nf4_ref(w, 64)\n"
    "assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax), 'quantize differs from the reference'\n"
    "out = torch.ops.lowrank_kernels.dequantize_nf4(packed, absmax, 64, w.numel(), torch.float32)\n"
    "assert torch.equal(out, dequantize_nf4_ref(packed, absmax, 64, w.numel(), torch.float32)), 'dequantize differs'\n"
)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_forced_isa_is_the_one_that_runs(isa):
    """LOWRANK_KERNELS_ISA=<isa> loads that ISA's kernels (reported by build_info and the backend
    table) and they compute the reference's values; an ISA this CPU lacks is refused."""
    result = run_with_isa(isa, FORCED_ISA_CHECK)
    if isa not in expected_isas():
        assert result.returncode != 0
        assert "UnsupportedIsaError" in result.stderr and f"LOWRANK_KERNELS_ISA={isa}" in result.stderr
        assert "cannot run" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    reported, backend = result.stdout.split()[0], result.stdout.split(None, 1)[1]
    assert reported == isa
    assert (isa.upper() if isa != "scalar" else "scalar") in backend


def test_unknown_isa_gives_clear_error():
    result = run_with_isa("avx1024", "import torch, lowrank_kernels as lk\nlk.quantize_nf4(torch.randn(4, 64))\n")
    assert result.returncode != 0
    assert "UnsupportedIsaError" in result.stderr
    assert "LOWRANK_KERNELS_ISA must be scalar, avx2 or avx512" in result.stderr and "'avx1024'" in result.stderr
