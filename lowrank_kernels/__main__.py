"""Command line of lowrank_kernels (`python -m lowrank_kernels` or `lowrank-kernels`):

  info      what the compiled core contains and which backend serves each op
  demo      the adapters' main job on all-MiniLM-L6-v2: error-reduction table, init times,
            fused-op timings, plot (`make demo`)
  convert   a Hugging Face model directory or a safetensors file -> PiSSA / QPiSSA adapter
            checkpoint; under `torchrun --nproc_per_node=N` the layers are sharded across ranks
  bench     the benchmarks (lowrank_kernels.bench), each in its own process; --quick and --out
            pass through

Bad input (missing path, unknown init, rank too large, targets matching nothing, corrupted
file) prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from lowrank_kernels.adapters.inits import INITS
from lowrank_kernels.bench import BENCHMARKS

#: errors of bad input: reported as one line, no traceback.
INPUT_ERRORS = (ValueError, TypeError, OSError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowrank-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what the compiled core contains and which backend serves each op")

    demo = sub.add_parser("demo", help="error-reduction table, init times and fused-op timings on all-MiniLM-L6-v2")
    demo.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="only encoder layer 0's six linears, shorter timings")
    demo.add_argument(
        "--plot",
        default=None,
        help="PNG path (default bench/results/demo.png of the checkout, else of the working directory)",
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (default 1: on a shared machine, more threads wait for each other in "
        "LAPACK's many small parallel regions and the demo can take 10x longer)",
    )

    convert = sub.add_parser(
        "convert",
        help="model directory or safetensors file -> adapter checkpoint",
        description="Converts the linear layers of a Hugging Face model directory (config.json "
        "+ safetensors shards) or of a bare safetensors file (every 2-D <name>.weight but "
        "embeddings) into PiSSA-family adapters, streaming: one batch of layers is in memory "
        "at a time and each output shard is written as soon as it is done. --format lowrank "
        "writes this library's checked checkpoint (one file if OUTPUT ends in .safetensors, "
        "else a directory of shards; load it with lowrank_kernels.adapters.load_converted); "
        "--format peft writes OUTPUT/residual (a transformers model directory holding W_res) "
        "and OUTPUT/adapter (a PEFT LoRA adapter), loaded with PeftModel.from_pretrained. "
        "Under torchrun --nproc_per_node=N each process converts and writes its own shards.",
    )
    convert.add_argument("source", help="Hugging Face model directory or .safetensors file")
    convert.add_argument(
        "--output",
        "-o",
        required=True,
        help="output: a .safetensors file or a directory (--format lowrank), a directory (peft)",
    )
    convert.add_argument(
        "--format",
        default="lowrank",
        choices=["lowrank", "peft"],
        help="lowrank: checked adapter checkpoint (default); peft: transformers residual model + PEFT adapter",
    )
    convert.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    convert.add_argument("--init", default="rsvd", choices=list(INITS), help="PiSSA split (default rsvd)")
    convert.add_argument(
        "--quantize",
        default="none",
        choices=["nf4", "none"],
        help="residual storage: nf4 (QPiSSA) or none (dense PiSSA; default)",
    )
    convert.add_argument(
        "--quant-iters", type=int, default=None, help="QPiSSA rounds, with --quantize nf4 only (default 1)"
    )
    targets = convert.add_mutually_exclusive_group()
    targets.add_argument(
        "--target-modules",
        nargs="+",
        metavar="NAME",
        help="module names or name suffixes (e.g. query key value); default: every linear but the output embedding",
    )
    targets.add_argument("--target-regex", metavar="REGEX", help="regex that must match whole module names")
    convert.add_argument("--seed", type=int, default=0, help="layer NAME draws from a generator seeded by (seed, NAME)")
    convert.add_argument(
        "--metrics",
        action="store_true",
        help="report each layer's reconstruction error and (nf4) quantization error reduction "
        "(full nuclear norms: about as long as the conversion itself with nf4)",
    )
    convert.add_argument(
        "--max-shard-size",
        default="2GB",
        metavar="SIZE",
        help="directory outputs: a shard holds at most SIZE of output, made from at most SIZE of "
        "source tensors, e.g. 500MB, 2GB (default 2GB); torchrun ranks share out whole shards",
    )
    convert.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted conversion into OUTPUT: finished shards whose digests check are kept",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    convert.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads per process (default: the available cores divided by the processes of this node)",
    )

    bench = sub.add_parser("bench", help="run the benchmarks (lowrank_kernels.bench)")
    bench.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}"
    )
    bench.add_argument("--quick", action="store_true", help="each benchmark's short variant")
    bench.add_argument("--out", default=None, help="results directory (default bench/results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        resume = " (finished shards are kept: rerun with --resume)" if args.command == "convert" else ""
        print(f"lowrank-kernels {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
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
    demo.run(rank=args.rank, seed=args.seed, quick=args.quick, plot=args.plot)
    return 0


def _convert(args: argparse.Namespace) -> int:
    """Single process, or one rank of a torchrun job (WORLD_SIZE > 1): every rank converts and
    writes its own shards, rank 0 reports."""
    import torch
    import torch.distributed as dist

    from lowrank_kernels.adapters import distributed as ddist
    from lowrank_kernels.adapters.streaming import convert_files

    if args.quant_iters is not None and args.quantize == "none":
        raise ValueError("--quant-iters has no effect with --quantize none (it counts QPiSSA rounds)")
    single = args.format == "lowrank" and args.output.endswith(".safetensors")
    if single and args.max_shard_size != "2GB":
        raise ValueError("--max-shard-size has no effect on a one-file output (.safetensors); give a directory")
    torch.set_num_threads(_threads(args.threads))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        _init_process_group(ddist.default_backend())
    try:
        report = convert_files(
            args.source,
            args.output,
            fmt=args.format,
            rank=args.rank,
            init=args.init,
            target_modules=args.target_regex or args.target_modules,
            quantize=None if args.quantize == "none" else args.quantize,
            quant_iters=1 if args.quant_iters is None else args.quant_iters,
            seed=args.seed,
            metrics=args.metrics,
            max_shard_size=_size(args.max_shard_size),
            resume=args.resume,
            overwrite=args.overwrite,
            progress=sys.stderr.isatty(),
        )
        if report is not None:  # rank 0 (or the only process)
            print(report)
            print(f"wrote {args.output} ({_disk_size(args.output) / 2**20:.1f} MiB)")
        return 0
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _threads(requested: int | None) -> int:
    """``requested`` (checked), else the cores this process may use divided by the processes
    torchrun started on this node, so that ranks × threads does not oversubscribe the cores."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def _size(text: str) -> int:
    """Bytes of a size like "500MB", "2GB", "1GiB" or "123456"."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) * _UNITS[match.group(2)] < 1:
        raise ValueError(f"--max-shard-size must be a size like 500MB or 2GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _disk_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _init_process_group(backend: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=24))  # ranks wait for the slowest shard


def _bench(args: argparse.Namespace) -> int:
    """Runs each benchmark module in its own process (a benchmark's threads, caches and allocator
    state do not leak into the next) with this interpreter and this lowrank_kernels on
    PYTHONPATH; returns 1 if any failed."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    failed = []
    for name in args.names or BENCHMARKS:
        command = [
            sys.executable,
            "-m",
            f"lowrank_kernels.bench.{name}",
            *(["--quick"] if args.quick else []),
            *(["--out", args.out] if args.out else []),
        ]
        print(f"== {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, env=env).returncode != 0:
            failed.append(name)
    if failed:
        print(f"lowrank-kernels bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


COMMANDS = {"info": _info, "demo": _demo, "convert": _convert, "bench": _bench}

if __name__ == "__main__":
    sys.exit(main())
