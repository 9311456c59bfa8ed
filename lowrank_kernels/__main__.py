"""Command line of lowrank_kernels (`python -m lowrank_kernels` or `lowrank-kernels`):

  info      what the compiled core contains and which backend serves each op
  demo      the adapters' main job on all-MiniLM-L6-v2: error-reduction table, init times,
            fused-op timings, plot (`make demo`)
  convert   a Hugging Face model directory or a safetensors file -> PiSSA / QPiSSA adapter
            checkpoint; under `torchrun --nproc_per_node=N` the layers are sharded across ranks
  bench     the benchmark scripts of bench/ (--quick passes through)

Bad input (missing path, unknown init, rank too large, targets matching nothing, corrupted
file) prints one error line and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from lowrank_kernels.adapters.inits import INITS

#: bench script -> whether it takes --quick (the others are quick already).
BENCHMARKS = {"nf4": ("bench_nf4.py", False), "fused_linear": ("bench_fused_linear.py", True),
              "decompose": ("bench_decompose.py", True), "robust": ("bench_robust.py", True),
              "adapters": ("bench_adapters.py", False)}
#: errors of bad input: reported as one line, no traceback.
INPUT_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what the compiled core contains and which backend serves each op")

    demo = sub.add_parser("demo", help="error-reduction table, init times and fused-op timings on all-MiniLM-L6-v2")
    demo.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="only encoder layer 0's six linears, shorter timings")
    demo.add_argument("--plot", default=None, help="PNG path (default bench/results/demo.png)")
    demo.add_argument("--threads", type=int, default=1,
                      help="intra-op threads (default 1: on a shared machine, more threads wait for each other in "
                           "LAPACK's many small parallel regions and the demo can take 10x longer)")

    convert = sub.add_parser("convert", help="model directory or safetensors file -> adapter checkpoint",
                             description="Converts the linear layers of a Hugging Face model directory (config.json "
                             "+ *.safetensors, loaded offline with AutoModel) or of a bare safetensors file (every "
                             "2-D <name>.weight but embeddings) into PiSSA-family adapters and writes one "
                             "checkpoint (lowrank_kernels.adapters.save_converted; load it with load_converted "
                             "into the same model / lowrank_kernels.adapters.sources.load_model(source)). "
                             "Under torchrun --nproc_per_node=N the layers are sharded across the N processes "
                             "and rank 0 writes the checkpoint.")
    convert.add_argument("source", help="Hugging Face model directory or .safetensors file")
    convert.add_argument("--output", "-o", required=True, help="checkpoint path to write (.safetensors)")
    convert.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    convert.add_argument("--init", default="rsvd", choices=list(INITS), help="PiSSA split (default rsvd)")
    convert.add_argument("--quantize", default="none", choices=["nf4", "none"],
                         help="residual storage: nf4 (QPiSSA) or none (dense PiSSA; default)")
    convert.add_argument("--quant-iters", type=int, default=1, help="QPiSSA rounds with --quantize nf4 (default 1)")
    targets = convert.add_mutually_exclusive_group()
    targets.add_argument("--target-modules", nargs="+", metavar="NAME",
                         help="module names or name suffixes (e.g. query key value); default: every linear but "
                              "the output embedding")
    targets.add_argument("--target-regex", metavar="REGEX", help="regex that must match whole module names")
    convert.add_argument("--seed", type=int, default=0, help="layer NAME draws from a generator seeded by (seed, NAME)")
    convert.add_argument("--no-metrics", action="store_true",
                         help="skip the reconstruction / error-reduction metrics (about half the time with nf4)")

    bench = sub.add_parser("bench", help="run the benchmark scripts of bench/")
    bench.add_argument("names", nargs="*", metavar="NAME",
                       help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    bench.add_argument("--quick", action="store_true", help="passed to the scripts that take it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except INPUT_ERRORS as exc:
        where = f" [rank {os.environ['RANK']}]" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""
        print(f"lowrank-kernels {args.command}{where}: error: {exc}", file=sys.stderr)
        return 2


def _info(args: argparse.Namespace) -> int:
    from lowrank_kernels import format_build_info

    print(format_build_info())
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    from lowrank_kernels import demo

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    demo.run(rank=args.rank, seed=args.seed, quick=args.quick, plot=args.plot or demo.DEFAULT_PLOT)
    return 0


def _convert(args: argparse.Namespace) -> int:
    """Single process, or one rank of a torchrun job (WORLD_SIZE > 1): load, convert, rank 0 saves."""
    import torch.distributed as dist

    from lowrank_kernels.adapters import convert_model, save_converted
    from lowrank_kernels.adapters import distributed as ddist
    from lowrank_kernels.adapters.sources import default_target_modules, load_model

    output = Path(args.output)
    if not output.parent.is_dir():  # before the (long) conversion
        raise ValueError(f"--output {args.output!r}: directory {str(output.parent)!r} does not exist")
    if output.is_dir():
        raise ValueError(f"--output {args.output!r} is a directory; give a file path")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        _init_process_group(ddist.default_backend())
    try:
        model = load_model(args.source)
        options = dict(target_modules=args.target_regex or args.target_modules or default_target_modules(model),
                       rank=args.rank, init=args.init, quantize=None if args.quantize == "none" else args.quantize,
                       quant_iters=args.quant_iters, seed=args.seed, metrics=not args.no_metrics,
                       progress=sys.stderr.isatty())
        if distributed:
            model.to(_device())
            report = ddist.convert_model_distributed(model, **options)
        else:
            report = convert_model(model, **options)
        if report is not None:  # rank 0 (or the only process)
            save_converted(model, output)
            print(report)
            print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
        return 0
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _init_process_group(backend: str) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def _device() -> str:
    import torch

    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def _bench(args: argparse.Namespace) -> int:
    """Runs each script in its own process (as `make bench` does) with this interpreter and
    this lowrank_kernels on PYTHONPATH; returns 1 if any failed."""
    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    if not bench_dir.is_dir():
        raise RuntimeError(f"bench needs the source checkout's bench/ directory ({bench_dir} does not exist)")
    root = str(bench_dir.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    failed = []
    for name in args.names or BENCHMARKS:
        script, takes_quick = BENCHMARKS[name]
        command = [sys.executable, str(bench_dir / script)] + (["--quick"] if args.quick and takes_quick else [])
        print(f"== {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, env=env).returncode != 0:
            failed.append(name)
    if failed:
        print(f"lowrank-kernels bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


COMMANDS = {"info": _info, "demo": _demo, "convert": _convert, "bench": _bench}

if __name__ == "__main__":
    sys.exit(main())
