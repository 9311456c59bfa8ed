"""NF4 quantize / dequantize: lowrank_kernels vs bitsandbytes' CPU path, and vs copy bandwidth.

Usage: python -m lowrank_kernels.bench.nf4 [--quick] [--rows 4096 --cols 4096 --blocksize 64] [--out DIR]
Prints the machine, a timing table, the targets of the foundation issue; writes nf4.json / nf4.png.
All operations are timed round-robin (median of the rounds). Allocating dequantize is timed in
steady state, where our output comes from the CPU output cache (lowrank_kernels.output_cache),
and apart on fresh pages, where page faults dominate.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

import lowrank_kernels as lk
from lowrank_kernels.bench._harness import Run, Target, bench_parser, round_robin

COPY = "copy (dst.copy_(src))"
QUANTIZE_OURS, QUANTIZE_BNB = "quantize: lowrank_kernels", "quantize: bitsandbytes"
DEQUANTIZE_OURS = "dequantize: lowrank_kernels"
DEQUANTIZE_FRESH = "dequantize, fresh pages (output cache emptied): lowrank_kernels"
DEQUANTIZE_BNB = "dequantize: bitsandbytes"
DEQUANTIZE_OUT = "dequantize into out=: lowrank_kernels"


def main(argv: Sequence[str] | None = None) -> int:
    # --quick keeps the size the targets are set at: a 1024x1024 matrix sits in cache, where
    # bitsandbytes' dequantize is 4x faster per element than at 4096x4096 (2-core AMD EPYC, AVX2:
    # 0.75 ms vs 49 ms), out of a model's reach.
    parser = bench_parser(__doc__, quick="5 rounds (default 15), at the same 4096x4096")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--blocksize", type=int, default=64)
    args = parser.parse_args(argv)
    rows, cols = args.rows, args.cols

    import bitsandbytes.functional as bnb

    run = Run("nf4", args, argv)
    torch.manual_seed(0)
    w = torch.randn(rows, cols)
    bs = args.blocksize
    q = lk.quantize_nf4(w, bs)
    packed, state = bnb.quantize_4bit(w, quant_type="nf4", blocksize=bs)
    out = torch.empty_like(w)
    src, dst = torch.randn_like(w), torch.empty_like(w)
    t = round_robin(
        {
            COPY: lambda: dst.copy_(src),
            QUANTIZE_OURS: lambda: lk.quantize_nf4(w, bs),
            QUANTIZE_BNB: lambda: bnb.quantize_4bit(w, quant_type="nf4", blocksize=bs),
            DEQUANTIZE_OURS: lambda: lk.dequantize_nf4(q),
            DEQUANTIZE_FRESH: lambda: (lk.empty_output_cache(), lk.dequantize_nf4(q)),
            DEQUANTIZE_BNB: lambda: bnb.dequantize_4bit(packed, state),
            DEQUANTIZE_OUT: lambda: q.dequantize(out=out),
        },
        rounds=5 if args.quick else 15,
        warmup=1,
    )

    copy_bw = 2 * w.nbytes / t[COPY] / 1e9
    deq_bytes = q.packed.nbytes + q.absmax.nbytes + w.nbytes  # read codes + absmax, write fp32

    def bandwidth(name):
        if name == COPY:
            return f"{copy_bw:.1f}"
        return f"{deq_bytes / t[name] / 1e9:.1f}" if name.startswith("dequantize") else "-"

    run.table(
        f"NF4 {rows}x{cols} fp32, blocksize {bs} (median of round-robin wall times)",
        ["operation", "time [ms]", "GB/s"],
        [[k, f"{v * 1e3:.2f}", bandwidth(k)] for k, v in t.items()],
    )
    run.targets(
        "targets",
        [
            Target("quantize speed-up vs bitsandbytes", t[QUANTIZE_BNB] / t[QUANTIZE_OURS], ">=", 20, "{:.1f}x"),
            Target(
                "dequantize speed-up vs bitsandbytes (allocating; ours steady state, output cache)",
                t[DEQUANTIZE_BNB] / t[DEQUANTIZE_OURS],
                ">=",
                5,
                "{:.1f}x",
            ),
            Target(
                "dequantize speed-up vs bitsandbytes (allocating; ours on fresh pages every call)",
                t[DEQUANTIZE_BNB] / t[DEQUANTIZE_FRESH],
                None,
                fmt="{:.1f}x",
            ),
            Target(
                "dequantize speed-up vs bitsandbytes (ours into out=; bnb has no CPU out=)",
                t[DEQUANTIZE_BNB] / t[DEQUANTIZE_OUT],
                ">=",
                5,
                "{:.1f}x",
            ),
            Target(
                "dequantize bandwidth / copy bandwidth (into out=)",
                deq_bytes / t[DEQUANTIZE_OUT] / 1e9 / copy_bw,
                ">=",
                0.5,
                "{:.0%}",
            ),
        ],
    )
    return run.finish(lambda plt: plot(plt, t))


def plot(plt, times: dict[str, float]):
    names = [k for k in times if k != COPY]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names, [times[k] * 1e3 for k in names], color=["C0" if "lowrank" in k else "C1" for k in names])
    ax.set_xscale("log")
    ax.set_xlabel("time [ms] (log scale, lower is better)")
    ax.set_title("NF4 on this CPU: lowrank_kernels (blue) vs bitsandbytes (orange)")
    return fig


if __name__ == "__main__":
    sys.exit(main())
