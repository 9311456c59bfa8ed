"""What every benchmark shares: the command line (--quick, --out), the machine line, round-robin
timing, the printed and Markdown tables, the targets table, and the results of a run written as
<out>/<name>.json + <out>/<name>.png (atomically: a killed run leaves the previous files whole).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import operator
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import torch

#: the "schema" field of a results file (bench/readme.py reads only files that carry it).
SCHEMA = "lowrank_kernels.bench/1"
_COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


# ---- where results go ---------------------------------------------------------------------------


def project_root() -> Path:
    """The source checkout holding this package (it has bench/ and pyproject.toml beside
    lowrank_kernels/), else the working directory (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "bench").is_dir() and (root / "pyproject.toml").is_file() else Path.cwd()


def default_results_dir() -> Path:
    return project_root() / "bench" / "results"


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Calls ``write(f)`` on a temporary file in ``path``'s directory and renames it to ``path``
    (os.replace): readers see the old file or the whole new one, and a failed or killed write
    leaves no partial file (the temporary is removed on error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make results unreadable to others
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- command line and machine line ----------------------------------------------------------------


def bench_parser(doc: str | None, quick: str | None) -> argparse.ArgumentParser:
    """An argument parser with the module's docstring as help, ``--out`` (results directory,
    default bench/results of the checkout) and, when ``quick`` (its help text) is given, ``--quick``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument(
        "--out", type=Path, default=None, help="directory for <benchmark>.json and .png (default: bench/results)"
    )
    return parser


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def lowrank_kernels_isa() -> str:
    """The instruction set of the lowrank_kernels CPU kernels that run in this process, and whether
    the fused linear multiplies bf16 activations in bf16 (e.g. "avx512, bf16 GEMM in bf16")."""
    from lowrank_kernels import build_info

    info = build_info()
    if not info["extension_loaded"]:
        return f"none ({info['load_error']})"
    return f"{info['cpu_simd']}, bf16 GEMM in {'bf16' if info['cpu_bf16_gemm'] else 'fp32'}"


def machine_description() -> str:
    """CPU model, cores, torch threads, the ISAs that run (ATen's and ours), GPU, torch version:
    every table of a benchmark is read against this line."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"lowrank_kernels CPU ISA {lowrank_kernels_isa()}, GPU {gpu}; torch {torch.__version__}"
    )


# ---- timing -------------------------------------------------------------------------------------


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], repeat: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds (synchronising CUDA when present)."""
    for _ in range(warmup):
        fn()
    _synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 0) -> dict[str, float]:
    """Median seconds per call of every function, timed round-robin (one call of each per round,
    after ``warmup`` untimed rounds) so that drifts of this shared machine (clock, neighbours) hit
    all of them alike and their ratios compare calls of the same moments."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_call(fn, repeat=1, warmup=0))
    return {name: statistics.median(v) for name, v in samples.items()}


# ---- tables -------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned, a dashed rule."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(format_table(headers, rows))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a GitHub Markdown table ("|" in a cell is escaped)."""

    def line(row):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    return [line(headers), "|" + "---|" * len(headers), *map(line, rows)]


TARGET_HEADERS = ("target", "measured", "required", "met")


@dataclasses.dataclass(frozen=True)
class Target:
    """One acceptance target: ``measured op required`` (op one of >=, <=, >, <), or
    informational (op None: printed, never met or missed). ``fmt`` formats both numbers."""

    name: str
    measured: float
    op: str | None
    required: float | None = None
    fmt: str = "{:.2f}x"

    def __post_init__(self):
        if (self.op is None) != (self.required is None) or (self.op is not None and self.op not in _COMPARISONS):
            raise ValueError(
                f"target {self.name!r}: op must be one of {list(_COMPARISONS)} with a required value, "
                f"or None without one; got {self.op!r}, {self.required!r}"
            )

    @property
    def met(self) -> bool | None:
        return None if self.op is None else bool(_COMPARISONS[self.op](self.measured, self.required))

    def cells(self) -> list[str]:
        """[target, measured, required, met] as printed: met is "yes", "NO" or "-" (informational)."""
        required = "(info)" if self.op is None else f"{self.op} {self.fmt.format(self.required)}"
        met = {True: "yes", False: "NO", None: "-"}[self.met]
        return [self.name, self.fmt.format(self.measured), required, met]


# ---- a run --------------------------------------------------------------------------------------


class Run:
    """The printed output and the results file of one benchmark run.

    ``Run(name, args, argv)`` prints the machine line and the build; ``table`` / ``note`` /
    ``targets`` print and record; ``finish(draw)`` writes <out>/<name>.json and, when ``draw``
    is given and matplotlib is installed, <out>/<name>.png."""

    def __init__(self, name: str, args: argparse.Namespace, argv: Sequence[str] | None):
        import lowrank_kernels as lk

        self.name = name
        self.out = Path(args.out) if args.out is not None else default_results_dir()
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.machine = machine_description()
        self.results: dict = {
            "schema": SCHEMA,
            "benchmark": name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": _without_out(self.argv),
            "quick": bool(getattr(args, "quick", False)),
            "machine": self.machine,
            "tables": [],
            "notes": [],
            "targets": None,
        }
        print(f"machine: {self.machine}")
        print(lk.format_build_info(), end="\n\n")

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        rows = [[str(c) for c in row] for row in rows]
        print(f"{title}\n{format_table(headers, rows)}\n")
        self.results["tables"].append({"title": title, "headers": list(headers), "rows": rows})

    def note(self, text: str) -> None:
        print(f"{text}\n")
        self.results["notes"].append(text)

    def targets(self, title: str, targets: Sequence[Target]) -> None:
        """The run's targets table (one per run: it is what the README shows)."""
        if self.results["targets"] is not None:
            raise RuntimeError(f"{self.name}: targets were already recorded")
        print(f"{title}\n{format_table(TARGET_HEADERS, [t.cells() for t in targets])}\n")
        self.results["targets"] = {
            "title": title,
            "rows": [
                dict(zip(TARGET_HEADERS, t.cells()), met=t.met, value=t.measured, op=t.op, bound=t.required)
                for t in targets
            ],
        }

    def finish(self, draw: Callable | None = None) -> int:
        """Writes the results (and the plot: ``draw(pyplot) -> Figure``); returns exit status 0."""
        path = self.out / f"{self.name}.json"
        text = json.dumps(self.results, indent=1, ensure_ascii=False) + "\n"
        write_atomic(path, lambda f: f.write(text.encode()))
        print(f"results: {path}")
        if draw is not None:
            save_plot(draw, self.out / f"{self.name}.png")
        return 0


def _without_out(argv: list[str]) -> list[str]:
    """The options of a run without --out (where it wrote is not part of what it measured)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return kept


# ---- plots --------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless), or None when
    matplotlib is not installed (it is optional: `pip install lowrank_kernels[bench]`)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(draw: Callable, path: str | Path, dpi: int = 100) -> None:
    """``draw(pyplot)`` returns a figure, written atomically to ``path`` as PNG; without
    matplotlib a note says that no plot was written."""
    plt = pyplot()
    if plt is None:
        print(f"(matplotlib not installed: no plot {path})")
        return
    fig = draw(plt)
    try:
        fig.tight_layout()
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    print(f"plot: {path}")
