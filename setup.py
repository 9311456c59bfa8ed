"""Build of the compiled core, lowrank_kernels._C.

The C++ CPU kernels are always built. The CUDA sources are added when torch is a CUDA build and
nvcc is found, controlled by LOWRANK_KERNELS_CUDA=auto|0|1 (1 makes a missing toolkit an error).
TORCH_CUDA_ARCH_LIST is honoured; the default covers sm_80 and sm_90.
"""
import os
import platform
import sys
from pathlib import Path

import shutil

from setuptools import setup


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME, else the toolkit whose headers sit beside `nvcc`.
    torch guesses the parent of the first `nvcc` on PATH, which is wrong when that is a wrapper
    script (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "include" / "cuda_runtime.h").is_file() and (root / "bin" / "nvcc").is_file():
            return str(root)
    return None


if find_cuda_home():
    os.environ["CUDA_HOME"] = find_cuda_home()

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension is imported)
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).parent.resolve()
CSRC = Path("csrc")  # setuptools wants source paths relative to the project root
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cuda_requested() -> bool:
    mode = os.environ.get("LOWRANK_KERNELS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"LOWRANK_KERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not available:
        sys.exit(
            "LOWRANK_KERNELS_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}"
        )
    return mode == "1" or (mode == "auto" and available)


def cpu_simd_flags() -> list[str]:
    """AVX2/FMA/F16C when the building CPU has them (this is a from-source build for this machine)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= set(flags):
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def pip_cuda_include_flags() -> list[str]:
    """cuBLAS/cuSPARSE headers that ATen's CUDA headers include ship in the pip CUDA packages;
    the system toolkit on some machines lacks them. Searched *after* the toolkit's own include
    dir (-idirafter): the pip copy of cuda_runtime.h is incomplete without it."""
    for site in sys.path:
        candidate = Path(site) / "nvidia" / "cu13" / "include"
        if candidate.is_dir():
            return ["-idirafter", str(candidate)]
    return []


def write_build_config(with_cuda: bool, archs: str) -> Path:
    """A generated header recording what this binary was compiled with (read by build_info())."""
    out_dir = ROOT / "build" / "generated"
    out_dir.mkdir(parents=True, exist_ok=True)
    header = out_dir / "lowrank_kernels_build_config.h"
    text = (
        "#pragma once\n"
        f"#define LOWRANK_KERNELS_CUDA_ARCHS \"{archs if with_cuda else ''}\"\n"
    )
    if not header.exists() or header.read_text() != text:
        header.write_text(text)
    return out_dir


def extension():
    with_cuda = cuda_requested()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    generated = write_build_config(with_cuda, archs)

    sources = [str(CSRC / "lowrank_kernels.cpp"), *map(str, sorted((CSRC / "cpu").glob("*.cpp")))]
    include_dirs = [str((ROOT / CSRC / "include")), str(generated)]
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", *cpu_simd_flags()]
    extra = dict(extra_link_args=["-fopenmp"])
    if not with_cuda:
        print("lowrank_kernels: building the C++ CPU kernels only (no CUDA)")
        return cpp_extension.CppExtension(
            "lowrank_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, **extra)

    print(f"lowrank_kernels: building CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}")
    sources += [str(p) for p in sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))]
    nvcc_flags = ["-O3", "--fmad=false", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "lowrank_kernels._C", sources,
        include_dirs=include_dirs,
        define_macros=[("LOWRANK_KERNELS_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags + pip_cuda_include_flags(), "nvcc": nvcc_flags}, **extra)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
