"""`make gpu-check`: on a CUDA machine, the whole suite on the GPU and the GPU benchmarks, in one
report (<out>/gpu_check.md, default bench/results/gpu_check.md).

Steps (each with its own time limit, so that the whole check stays within 10 minutes on one
H100; a step over its limit is reported as such, not waited for):
  1. the test suite's CUDA parametrisations (`pytest tests -k cuda`) and tests/triton on the GPU;
  2. the fused linear (NF4 residual + LoRA, bf16) against cuBLAS (dense F.linear + LoRA) and
     bitsandbytes CUDA (matmul_4bit + LoRA): times and the fused op's ratio to each; at one token,
     the fused GEMV's share of the GPU's peak HBM bandwidth;
  3. NF4 dequantize against bitsandbytes' dequantize_4bit;
  4. batched versus one-call-per-matrix rsvd and huber_factorize on small matrices (the batching
     that a CPU cannot show).
Without a GPU it says so in one line and exits 0.

Usage: python -m lowrank_kernels.bench.gpu_check [--out DIR] [--skip-tests]  (the tests need the checkout)
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import torch

import lowrank_kernels as lk
from lowrank_kernels.bench._harness import (
    bench_parser,
    default_results_dir,
    machine_description,
    markdown_table,
    project_root,
    round_robin,
    write_atomic,
)
from lowrank_kernels.bench.fused_linear import Layer, measure

REPORT_NAME = "gpu_check.md"
#: (OUTxIN, rank, token counts) of the fused-linear comparison: a 4096-wide layer, decode and prefill.
FUSED_CONFIGS = (((4096, 4096), 16, (1, 16, 512)), ((4096, 4096), 64, (1, 512)), ((11008, 4096), 16, (1, 512)))
#: (batch, m, n, rank) of the batching comparison: many small matrices (per-head / LoRA-sized).
BATCH_CONFIGS = ((64, 128, 128, 8), (16, 512, 512, 16))
SUITE_TIMEOUT_S = 330  # pytest -k cuda and tests/triton together
NO_GPU = "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to check"


@dataclasses.dataclass
class SuiteRun:
    name: str
    command: str
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    timed_out: bool = False


@dataclasses.dataclass
class FusedRow:
    shape: tuple[int, int]
    rank: int
    tokens: int
    seconds: dict[str, float]  # method of bench_fused_linear.METHODS -> seconds per forward
    hbm_share: float | None  # decode: minimum bytes / time / peak bandwidth


@dataclasses.dataclass
class PairRow:
    """One comparison of ours against a baseline."""

    what: str
    ours_s: float
    baseline: str
    baseline_s: float


@dataclasses.dataclass
class Report:
    device: str
    device_name: str
    peak_bandwidth: float | None  # bytes/s, from the memory clock and bus width
    machine: str
    suites: list[SuiteRun]
    fused: list[FusedRow]
    dequantize: list[PairRow]
    batching: list[PairRow]
    seconds: float = 0.0


# ---- the GPU ---------------------------------------------------------------------------------------


def peak_bandwidth(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth in bytes/s: 2 transfers per memory clock × bus width (the figure
    vendors quote: 3.35 TB/s on an H100 SXM); None on a CPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no GPU)"


# ---- step 1: the suite on CUDA ---------------------------------------------------------------------


def run_suite(name: str, args: list[str], env: dict[str, str], timeout: float) -> SuiteRun:
    """pytest ``args`` in a subprocess with environment ``env``; counts from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        run = SuiteRun(name, " ".join(["pytest", *args]))
        start = time.perf_counter()
        try:
            subprocess.run(command, cwd=project_root(), env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            run.timed_out = True
        run.seconds = time.perf_counter() - start
        if xml.exists():
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            for field in ("tests", "failures", "errors", "skipped"):
                setattr(run, field, int(suite.get(field, 0)))
        else:
            run.errors += 1  # no result at all: collection crashed or the run timed out
        return run


def run_suites(timeout: float = SUITE_TIMEOUT_S) -> list[SuiteRun]:
    """Every CUDA parametrisation of tests/, then tests/triton compiled for the GPU (no interpreter)."""
    # Triton compiles for the GPU: no interpreter (TRITON_INTERPRET is read at kernel decoration).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"HYPOTHESIS_PROFILE": "gpu-check"}
    start = time.perf_counter()
    cuda = run_suite("tests (CUDA parametrisations)", ["tests", "--ignore=tests/triton", "-k", "cuda"], env, timeout)
    left = max(30.0, timeout - (time.perf_counter() - start))
    return [cuda, run_suite("tests/triton on the GPU", ["tests/triton"], env, left)]


# ---- steps 2-4: benchmarks -------------------------------------------------------------------------


def decode_bytes(layer: Layer, tokens: int) -> int:
    """Minimum bytes one fused forward must move: the NF4 residual and its absmax, x, y, the adapter."""
    out_features, in_features = layer.dense.shape
    element = layer.dense.element_size()
    adapter = (layer.A.numel() + layer.B.numel()) * element
    return (
        layer.dense.numel() // 2
        + layer.q.block_absmax().nbytes
        + tokens * (in_features + out_features) * element
        + adapter
    )


def bench_fused(
    device: torch.device,
    configs=FUSED_CONFIGS,
    dtype=torch.bfloat16,
    seconds: float = 1.0,
    bandwidth: float | None = None,
) -> list[FusedRow]:
    rows = []
    for shape, rank, token_counts in configs:
        layer = Layer(*shape, rank, dtype, device)
        for tokens in token_counts:
            times = measure(layer, tokens, backward=False, seconds=seconds)
            share = decode_bytes(layer, tokens) / times["fused"] / bandwidth if bandwidth and tokens == 1 else None
            rows.append(FusedRow(shape, rank, tokens, times, share))
        del layer
    return rows


def bench_dequantize(device: torch.device, shapes=((4096, 4096), (11008, 4096)), rounds: int = 21) -> list[PairRow]:
    import bitsandbytes.functional as bnb

    rows = []
    for shape in shapes:
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
        q = lk.quantize_nf4(w)
        packed, state = bnb.quantize_4bit(w, quant_type="nf4", blocksize=q.blocksize)
        t = round_robin({"ours": q.dequantize, "bnb": lambda: bnb.dequantize_4bit(packed, state)}, rounds)
        rows.append(
            PairRow(
                f"dequantize NF4 {shape[0]}x{shape[1]} -> bf16", t["ours"], "bitsandbytes dequantize_4bit", t["bnb"]
            )
        )
    return rows


def bench_batching(device: torch.device, configs=BATCH_CONFIGS, rounds: int = 5) -> list[PairRow]:
    """One batched call over ``[batch, m, n]`` against one call per matrix, for rsvd and huber_factorize."""
    rows = []
    for batch, m, n, rank in configs:
        W = torch.randn(batch, m, n, generator=torch.Generator().manual_seed(0)).to(device)
        calls = {
            "rsvd": lambda W: lk.rsvd(W, rank),
            "huber_factorize": lambda W: lk.huber_factorize(W, rank, n_iter=10),
        }
        for name, call in calls.items():
            t = round_robin({"batched": lambda: call(W), "loop": lambda: [call(w) for w in W]}, rounds)
            rows.append(PairRow(f"{name} {batch}x[{m}x{n}] r={rank}", t["batched"], "loop over matrices", t["loop"]))
    return rows


# ---- the report ------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def format_report(report: Report) -> str:
    """The report as Markdown."""
    bandwidth = f"{report.peak_bandwidth / 1e12:.2f} TB/s" if report.peak_bandwidth else "n/a"
    lines = [
        f"# gpu-check on {report.device_name}",
        "",
        f"- device: {report.device} ({report.device_name}), peak DRAM bandwidth {bandwidth}",
        f"- machine: {report.machine}",
        f"- total time: {report.seconds:.0f} s",
        "",
        "## Test suite on the GPU",
        "",
    ]
    lines += markdown_table(
        ["suite", "tests", "failures", "errors", "skipped", "seconds", "status"],
        [
            [
                s.name,
                str(s.tests),
                str(s.failures),
                str(s.errors),
                str(s.skipped),
                f"{s.seconds:.0f}",
                "TIMED OUT" if s.timed_out else ("ok" if s.failures + s.errors == 0 else "FAILED"),
            ]
            for s in report.suites
        ],
    )
    lines += [
        "",
        "## Fused NF4 + LoRA forward vs cuBLAS and bitsandbytes (bf16)",
        "",
        "ratio = fused time / baseline time (< 1: fused is faster); HBM share at one token = "
        "minimum bytes (NF4 weight + absmax + x + y + adapter) / time / peak bandwidth.",
        "",
    ]
    lines += markdown_table(
        [
            "OUTxIN",
            "r",
            "tokens",
            "fused ms",
            "cuBLAS dense+LoRA ms",
            "bnb matmul_4bit+LoRA ms",
            "fused / cuBLAS",
            "fused / bnb",
            "HBM share",
        ],
        [
            [
                f"{r.shape[0]}x{r.shape[1]}",
                str(r.rank),
                str(r.tokens),
                _ms(r.seconds["fused"]),
                _ms(r.seconds["dense+LoRA"]),
                _ms(r.seconds["bnb+LoRA"]),
                f"{r.seconds['fused'] / r.seconds['dense+LoRA']:.2f}",
                f"{r.seconds['fused'] / r.seconds['bnb+LoRA']:.2f}",
                f"{r.hbm_share:.0%}" if r.hbm_share is not None else "-",
            ]
            for r in report.fused
        ],
    )
    for title, rows in (
        ("NF4 dequantize vs bitsandbytes", report.dequantize),
        ("Batched vs one call per matrix", report.batching),
    ):
        lines += ["", f"## {title}", ""]
        lines += markdown_table(
            ["what", "ours ms", "baseline", "baseline ms", "speed-up"],
            [[r.what, _ms(r.ours_s), r.baseline, _ms(r.baseline_s), f"{r.baseline_s / r.ours_s:.2f}x"] for r in rows],
        )
    return "\n".join(lines) + "\n"


def write_report(report: Report, path: Path) -> None:
    """Writes the report atomically (a temporary file renamed into place)."""
    text = format_report(report)
    write_atomic(path, lambda f: f.write(text.encode()))


def collect(device: torch.device, run_tests: bool = True) -> Report:
    start = time.perf_counter()
    bandwidth = peak_bandwidth(device)
    report = Report(
        device.type,
        device_name(device),
        bandwidth,
        machine_description(),
        run_suites() if run_tests else [],
        bench_fused(device, bandwidth=bandwidth),
        bench_dequantize(device),
        bench_batching(device),
    )
    report.seconds = time.perf_counter() - start
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__, quick=None)
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    report = collect(torch.device("cuda"), run_tests=not args.skip_tests)
    path = (args.out or default_results_dir()) / REPORT_NAME
    write_report(report, path)
    print(format_report(report))
    print(f"report: {path}")
    return 0 if all(s.failures + s.errors == 0 and not s.timed_out for s in report.suites) else 1


if __name__ == "__main__":
    sys.exit(main())
