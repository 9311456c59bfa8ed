"""`make gpu-check` as far as a CPU allows: the one-line exit without a GPU, the suite runner's
counts, the peak-bandwidth formula, and the report writer fed results measured on the CPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lowrank_kernels.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
NO_GPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_without_a_gpu_the_script_says_so_in_one_line_and_exits_0(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=NO_GPU_ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == gpu_check.NO_GPU + "\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the real check")
def test_make_gpu_check_without_a_gpu_is_one_line_and_exit_0():
    result = subprocess.run(
        ["make", "--no-print-directory", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 and "no CUDA GPU" in result.stdout


def test_suite_runner_counts_from_junit(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): pass\n"
        "def test_c(): assert False\n"
        "@pytest.mark.skip(reason='x')\n"
        "def test_d(): pass\n"
    )
    run = gpu_check.run_suite("sample", [str(tests)], dict(os.environ), timeout=120)
    assert (run.tests, run.failures, run.errors, run.skipped, run.timed_out) == (4, 1, 0, 1, False)


def test_peak_bandwidth_is_the_vendor_figure(monkeypatch):
    """An H100 SXM reports a 2619 MHz memory clock and a 5120-bit bus: 3.35 TB/s as NVIDIA quotes."""
    props = types.SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)  # kHz, bits
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert gpu_check.peak_bandwidth(torch.device("cuda")) == pytest.approx(3.35e12, rel=1e-3)
    assert gpu_check.peak_bandwidth(torch.device("cpu")) is None


def _cells(report: str, first_cell: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {first_cell} "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_writer_on_cpu_results(tmp_path):
    """Every measurement of the check, run on the CPU at toy sizes, through the report writer."""
    cpu = torch.device("cpu")
    fused = gpu_check.bench_fused(cpu, configs=(((32, 128), 4, (1, 9)),), seconds=0.05, bandwidth=100e9)
    report = gpu_check.Report(
        device="cpu",
        device_name=gpu_check.device_name(cpu),
        peak_bandwidth=None,
        machine="test machine",
        suites=[gpu_check.SuiteRun("tests (CUDA parametrisations)", "pytest tests -k cuda", tests=5, failures=1)],
        fused=fused,
        dequantize=gpu_check.bench_dequantize(cpu, shapes=((32, 128),), rounds=3),
        batching=gpu_check.bench_batching(cpu, configs=((3, 24, 20, 2),), rounds=1),
        seconds=1.0,
    )
    path = tmp_path / "results" / "gpu_check.md"
    gpu_check.write_report(report, path)
    assert os.listdir(path.parent) == ["gpu_check.md"]  # no temporary file left behind
    text = path.read_text()
    assert text.startswith("# gpu-check on CPU (no GPU)\n")
    assert "peak DRAM bandwidth n/a" in text
    assert _cells(text, "tests (CUDA parametrisations)")[-1] == "FAILED"

    rows = [line for line in text.splitlines() if line.startswith("| 32x128 ")]
    assert len(rows) == 2
    for row, measured in zip(rows, fused):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[6] == f"{measured.seconds['fused'] / measured.seconds['dense+LoRA']:.2f}"
        assert cells[7] == f"{measured.seconds['fused'] / measured.seconds['bnb+LoRA']:.2f}"
    # HBM share only at one token: minimum bytes over time over the bandwidth given.
    share = (
        gpu_check.decode_bytes(gpu_check.Layer(32, 128, 4, torch.bfloat16, cpu), 1) / fused[0].seconds["fused"] / 100e9
    )
    assert fused[0].hbm_share == pytest.approx(share) and fused[1].hbm_share is None
    assert re.fullmatch(r"\d+%", _cells(text, "32x128")[8])

    for what in ("dequantize NF4 32x128 -> bf16", "rsvd 3x[24x20] r=2", "huber_factorize 3x[24x20] r=2"):
        cells = _cells(text, what)
        row = next(r for r in report.dequantize + report.batching if r.what == what)
        assert cells[-1] == f"{row.baseline_s / row.ours_s:.2f}x"
