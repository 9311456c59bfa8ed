"""Model conversion: all 36 encoder linears of a real all-MiniLM-L6-v2 BertModel converted by
convert_model (default: QPiSSA, rsvd, NF4, 5 rounds, rank 16), timed with and without the
metrics; then QPiSSA vs LoftQ quantization error reduction (1 and 5 rounds) on the same weights.

Usage: python -m lowrank_kernels.bench.adapters [--quick] [--init rsvd] [--rank 16] [--iters 5] [--dense]
       [--report] [--out DIR]   (writes adapters.json)
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from lowrank_kernels.adapters import convert_model, loftq_factors, qpissa_factors, quantization_error_reduction
from lowrank_kernels.bench._harness import Run, Target, bench_parser
from lowrank_kernels.bench._minilm import minilm_linear_weights, minilm_model_dir

TARGET_SECONDS = 5.0


def minilm_model() -> torch.nn.Module:
    import transformers

    return transformers.BertModel.from_pretrained(str(minilm_model_dir()))


def conversion_times(run: Run, args) -> float:
    """Prints the conversion table; returns the seconds of the conversion without metrics."""
    base = minilm_model()
    rows, seconds_of = [], {}
    for metrics in (False,) if args.quick else (False, True):
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = convert_model(
            model,
            target_modules=r"encoder\..*",
            rank=args.rank,
            init=args.init,
            quantize=None if args.dense else "nf4",
            quant_iters=args.iters,
            metrics=metrics,
            progress=False,
        )
        seconds_of[metrics] = time.perf_counter() - t0
        rows.append(
            [
                f"metrics={metrics}",
                len(report),
                f"{seconds_of[metrics]:.2f}",
                f"{report.metric_seconds:.2f}",
                "yes" if seconds_of[metrics] <= TARGET_SECONDS else "NO",
            ]
        )
        if metrics and args.report:
            print(report, "\n")
    run.table(
        f"conversion of the MiniLM encoder, init {args.init}, rank {args.rank}, "
        f"{'dense' if args.dense else f'NF4, {args.iters} rounds'}",
        ["conversion", "layers", "seconds", "of which metrics", f"<= {TARGET_SECONDS:g} s"],
        rows,
    )
    return seconds_of[False]


def qpissa_vs_loftq(run: Run, args) -> None:
    weights = minilm_linear_weights()
    if args.quick:
        weights = {k: w for k, w in weights.items() if k.startswith("encoder.layer.0.")}
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for _, w in sorted(weights.items()):
        groups.setdefault(tuple(w.shape), []).append(w)
    rows = []
    for label, factors, iters in [
        ("QPiSSA", qpissa_factors, 1),
        ("QPiSSA", qpissa_factors, 5),
        ("LoftQ", loftq_factors, 1),
        ("LoftQ", loftq_factors, 5),
    ]:
        values = []
        for ws in groups.values():
            W = torch.stack(ws)
            A, B, residual = factors(
                W, args.rank, iters=iters, generator=[torch.Generator().manual_seed(i) for i in range(len(ws))]
            )
            values += quantization_error_reduction(W, residual, A, B).tolist()
        rows.append([label, iters, f"{statistics.mean(values):.1%}", f"{min(values):.1%}", f"{max(values):.1%}"])
    run.table(
        f"quantization error reduction, {len(weights)} MiniLM linears, rank {args.rank}, rsvd refits, NF4 blocksize 64",
        ["method", "rounds", "mean", "min", "max"],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(
        __doc__, quick="conversion without metrics only; error reduction on encoder layer 0's six linears"
    )
    parser.add_argument("--init", default="rsvd")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5, help="QPiSSA rounds (quant_iters)")
    parser.add_argument("--dense", action="store_true", help="dense residual instead of NF4")
    parser.add_argument("--report", action="store_true", help="print the per-layer conversion report")
    args = parser.parse_args(argv)
    run = Run("adapters", args, argv)
    seconds = conversion_times(run, args)
    qpissa_vs_loftq(run, args)
    run.targets(
        "targets",
        [Target("36 MiniLM linears converted (no metrics) in seconds", seconds, "<=", TARGET_SECONDS, "{:.2f}")],
    )
    return run.finish()


if __name__ == "__main__":
    sys.exit(main())
