"""Converting models larger than RAM: wall time and peak RSS of `lowrank-kernels convert` against
the layer count of a synthetic Llama-2-7B-shaped model (hidden 4096, intermediate 11008, 32
heads, vocab 32000, bf16 on disk in 2 GB shards, written by transformers' save_pretrained), the
per-layer slopes extrapolated to Llama-2-7B (32 layers) and to a 70B shape (80 layers, hidden
8192, intermediate 28672, 8 KV heads); beside it, on the same model in the same run, PEFT's own
``get_peft_model(..., LoraConfig(r=16, init_lora_weights="pissa_niter_4"))`` on all 7 linears of
the loaded model. Every row is one process under ``/usr/bin/time -v`` (peak RSS = its maximum
resident set size). Generated models and outputs are deleted as the run goes.

Usage: python -m lowrank_kernels.bench.convert [--layers 2 4 8] [--quick] [--dir DIR] [--out DIR]
(writes convert.json)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lowrank_kernels.bench._harness import Run, Target, bench_parser

#: the directory holding the lowrank_kernels package (checkout or site-packages): the PYTHONPATH
#: of the measured processes, so that they run this lowrank_kernels.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
SHAPE_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
)
SHAPE_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)
RSS_TARGET_GB, SLOPE_TARGET_GB = 3.0, 0.3


def layer_elements(
    hidden_size: int, intermediate_size: int, num_attention_heads: int, num_key_value_heads: int, **_
) -> tuple[int, int]:
    """(weight elements of one decoder layer's 7 linears, elements of its largest linear)."""
    kv = hidden_size // num_attention_heads * num_key_value_heads
    shapes = [(hidden_size, hidden_size)] * 2 + [(kv, hidden_size)] * 2 + [(intermediate_size, hidden_size)] * 3
    return sum(m * n for m, n in shapes), max(m * n for m, n in shapes)


def generate(path: Path, layers: int) -> None:
    """A random bf16 7B-shaped Llama with ``layers`` decoder layers, saved by transformers."""
    code = f"""
import torch, transformers
config = transformers.LlamaConfig(num_hidden_layers={layers}, tie_word_embeddings=False, **{SHAPE_7B!r})
torch.set_default_dtype(torch.bfloat16)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
model = model.to_empty(device="cpu")
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_(torch.ones_like(p) if p.dim() == 1 else torch.randn(p.shape, generator=g) * 0.02)
model.save_pretrained({str(path)!r}, max_shard_size="2GB")
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def measured(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, stdout) of ``command`` under /usr/bin/time -v; for
    torchrun the largest worker's RSS is what time -v reports (it reports the largest child)."""
    result = subprocess.run(
        ["/usr/bin/time", "-v", *command],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_PARENT), **(env or {})},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(wall.split(":"))))
    return seconds, rss_kb * 1024 / 1e9, result.stdout


PEFT_PEER = """
import sys, time, torch, transformers, peft
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
config = peft.LoraConfig(r=16, lora_alpha=16, init_lora_weights="pissa_niter_4",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
t0 = time.perf_counter()
peft.get_peft_model(model, config)
print(f"get_peft_model {time.perf_counter() - t0:.1f} s")
"""


def convert_command(source: Path, output: Path, fmt: str, quantize: str, torchrun: bool = False) -> list[str]:
    prefix = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        if torchrun
        else [sys.executable]
    )
    return [
        *prefix,
        "-m",
        "lowrank_kernels",
        "convert",
        str(source),
        "-o",
        str(output),
        "--format",
        fmt,
        "--rank",
        "16",
        "--init",
        "rsvd",
        "--quantize",
        quantize,
    ]


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__, quick="layer counts 1 and 2, no torchrun / peft rows")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dir", default=None, help="where to generate models (default: the system's temp dir)")
    args = parser.parse_args(argv)
    layer_counts = [1, 2] if args.quick else sorted(args.layers)
    run = Run("convert", args, argv)
    base_seconds, base_rss, _ = measured(
        [sys.executable, "-c", "import lowrank_kernels.adapters.streaming, transformers"]
    )
    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.dir))
    rows, points = [], {}
    try:
        for layers in layer_counts:
            source = work / f"llama7b-{layers}"
            generate(source, layers)
            size = sum(f.stat().st_size for f in source.glob("*.safetensors")) / 1e9
            runs = [("lowrank", "nf4", False), ("peft", "none", False)]
            if not args.quick and layers == max(layer_counts):
                runs += [("lowrank", "nf4", True)]
            for fmt, quantize, torchrun in runs:
                output = work / "out"
                seconds, rss, _ = measured(convert_command(source, output, fmt, quantize, torchrun))
                shutil.rmtree(output)
                label = f"convert --format {fmt} --quantize {quantize}" + (" (torchrun x2)" if torchrun else "")
                rows.append([label, layers, f"{size:.2f}", f"{seconds:.1f}", f"{rss:.2f}"])
                if not torchrun:
                    points.setdefault((fmt, quantize), []).append((layers, seconds, rss))
            if not args.quick and layers == max(layer_counts):
                seconds, rss, out = measured([sys.executable, "-c", PEFT_PEER, str(source)])
                rows.append(
                    [f"PEFT pissa_niter_4 ({out.strip()})", layers, f"{size:.2f}", f"{seconds:.1f}", f"{rss:.2f}"]
                )
            shutil.rmtree(source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run.table(
        "model: synthetic Llama, hidden 4096, intermediate 11008, 32 heads, vocab 32000, bf16, 2 GB shards; "
        "convert --rank 16 --init rsvd (default threads)",
        ["run", "layers", "model GB", "wall s", "peak RSS GB"],
        rows,
    )
    run.note(f"(python + torch + transformers import alone: {base_seconds:.1f} s, peak RSS {base_rss:.2f} GB)")

    per_layer_7b, largest_7b = layer_elements(**SHAPE_7B)
    per_layer_70b, largest_70b = layer_elements(**SHAPE_70B)
    extrapolated, targets = [], []
    for (fmt, quantize), samples in points.items():
        xs = [float(layers) for layers, _, _ in samples]
        t0, t_slope = fit(xs, [s for _, s, _ in samples])
        r0, r_slope = fit(xs, [r for _, _, r in samples])
        # 70B: time per layer scales with the layer's weight elements; the resident working set with the
        # largest batch (one layer of 28672 x 8192, above the batch budget, against 2^26 elements at 7B).
        batch_7b = max(largest_7b, 1 << 26)
        per_element = (r0 - base_rss) / batch_7b
        rss_70b = base_rss + per_element * largest_70b + r_slope * 80
        targets += [
            Target(
                f"{fmt} / {quantize}: extrapolated 7B peak RSS [GB]", r0 + 32 * r_slope, "<=", RSS_TARGET_GB, "{:.2f}"
            ),
            Target(
                f"{fmt} / {quantize}: RSS growth over 6 layers (fitted slope x 6) [GB]",
                r_slope * 6,
                "<=",
                SLOPE_TARGET_GB,
                "{:.2f}",
            ),
        ]
        extrapolated.append(
            [
                f"{fmt} / {quantize}",
                f"{t_slope:.1f} s + {r_slope * 1e3:.0f} MB",
                f"{t0 + 32 * t_slope:.0f} s, {r0 + 32 * r_slope:.2f} GB",
                f"{t0 + 80 * t_slope * per_layer_70b / per_layer_7b:.0f} s, {rss_70b:.2f} GB",
                "yes" if r0 + 32 * r_slope <= RSS_TARGET_GB and (r_slope * 6 <= SLOPE_TARGET_GB) else "no",
            ]
        )
    run.table(
        "per-layer slopes, extrapolated",
        [
            "format / quantize",
            "per layer",
            "7B (32 layers)",
            "70B (80 layers)",
            f"7B RSS <= {RSS_TARGET_GB} GB, 6-layer growth <= {SLOPE_TARGET_GB} GB",
        ],
        extrapolated,
    )
    run.targets("targets (least-squares slopes over the layer counts)", targets)
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
