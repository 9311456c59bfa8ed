"""NF4 quantize / dequantize: lowrank_kernels vs bitsandbytes' CPU path, and vs copy bandwidth.

Usage: python bench/bench_nf4.py [--rows 4096 --cols 4096 --blocksize 64] [--plot PATH]
Prints the machine, a timing table, the targets of the foundation issue, and writes a PNG.
Allocating dequantize is timed in steady state, where our output comes from the CPU output cache
(lowrank_kernels.output_cache), and apart on fresh pages, where page faults dominate.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_description, print_table, time_call  # noqa: E402

import lowrank_kernels as lk  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--plot", default=str(Path(__file__).parent / "results" / "nf4.png"))
    args = parser.parse_args()

    import bitsandbytes.functional as bnb

    print(f"machine: {machine_description()}")
    print(lk.format_build_info(), end="\n\n")
    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols)
    n, bs = w.numel(), args.blocksize
    q = lk.quantize_nf4(w, bs)
    packed, state = bnb.quantize_4bit(w, quant_type="nf4", blocksize=bs)
    out = torch.empty_like(w)
    src, dst = torch.randn_like(w), torch.empty_like(w)

    t = {
        "copy (dst.copy_(src))": time_call(lambda: dst.copy_(src), repeat=20),
        "quantize: lowrank_kernels": time_call(lambda: lk.quantize_nf4(w, bs)),
        "quantize: bitsandbytes": time_call(lambda: bnb.quantize_4bit(w, quant_type="nf4", blocksize=bs), repeat=3, warmup=1),
        "dequantize: lowrank_kernels": time_call(lambda: lk.dequantize_nf4(q), repeat=20),
        "dequantize, fresh pages (output cache emptied): lowrank_kernels": time_call(
            lambda: (lk.empty_output_cache(), lk.dequantize_nf4(q)), repeat=20),
        "dequantize: bitsandbytes": time_call(lambda: bnb.dequantize_4bit(packed, state), repeat=10),
        "dequantize into out=: lowrank_kernels": time_call(lambda: q.dequantize(out=out), repeat=20),
    }
    copy_bytes = 2 * w.nbytes
    deq_bytes = q.packed.nbytes + q.absmax.nbytes + w.nbytes  # read codes + absmax, write fp32
    copy_bw = copy_bytes / t["copy (dst.copy_(src))"] / 1e9

    def bandwidth(name):
        if name.startswith("copy"):
            return f"{copy_bw:.1f}"
        if name.startswith("dequantize"):
            return f"{deq_bytes / t[name] / 1e9:.1f}"
        return "-"

    print(f"NF4 {args.rows}x{args.cols} fp32, blocksize {bs} (median wall time)")
    print_table(["operation", "time [ms]", "GB/s"], [[k, f"{v * 1e3:.2f}", bandwidth(k)] for k, v in t.items()])

    quant_speedup = t["quantize: bitsandbytes"] / t["quantize: lowrank_kernels"]
    deq_speedup = t["dequantize: bitsandbytes"] / t["dequantize: lowrank_kernels"]
    deq_fresh_speedup = t["dequantize: bitsandbytes"] / t["dequantize, fresh pages (output cache emptied): lowrank_kernels"]
    deq_out_speedup = t["dequantize: bitsandbytes"] / t["dequantize into out=: lowrank_kernels"]
    deq_fraction = deq_bytes / t["dequantize into out=: lowrank_kernels"] / 1e9 / copy_bw
    print()
    print_table(["target", "measured", "required", "met"], [
        ["quantize speed-up vs bitsandbytes", f"{quant_speedup:.1f}x", ">= 20x", quant_speedup >= 20],
        ["dequantize speed-up vs bitsandbytes (allocating; ours steady state, output cache)", f"{deq_speedup:.1f}x", ">= 5x", deq_speedup >= 5],
        ["dequantize speed-up vs bitsandbytes (allocating; ours on fresh pages every call)", f"{deq_fresh_speedup:.1f}x", "(info)", "-"],
        ["dequantize speed-up vs bitsandbytes (ours into out=; bnb has no CPU out=)", f"{deq_out_speedup:.1f}x", ">= 5x", deq_out_speedup >= 5],
        ["dequantize bandwidth / copy bandwidth (into out=)", f"{deq_fraction:.0%}", ">= 50%", deq_fraction >= 0.5],
    ])
    write_plot(args.plot, t)
    return 0


def write_plot(path: str, times: dict[str, float]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    names = [k for k in times if not k.startswith("copy")]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names, [times[k] * 1e3 for k in names], color=["C0" if "lowrank" in k else "C1" for k in names])
    ax.set_xscale("log")
    ax.set_xlabel("time [ms] (log scale, lower is better)")
    ax.set_title("NF4 on this CPU: lowrank_kernels (blue) vs bitsandbytes (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
