"""GPU-fit gate: do the Triton and CUDA C++ kernels fit sm_80 / sm_90, without a GPU?

``python -m lowrank_kernels.gpu_fit`` (``make gpu-fit``) compiles, ahead of time, every kernel
the way a GPU would run it, reads the resources ptxas assigns, writes a report and exits 1 when
a kernel does not fit:

* **Triton**: each launcher of :mod:`lowrank_kernels.triton` is called at LLM shapes (4096-wide
  layers, rank 16 and 128, 1 and 512 tokens) with its kernel swapped for a recorder, so the
  arguments are exactly those a launch passes. Triton's own binder then specialises them for the
  target (dtypes, ``== 1`` integers, 16-divisibility; pointers are taken as 16-byte aligned, as
  CUDA allocations are), and ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
  runs the pipeline to a cubin with the ptxas of the triton wheel, once per autotune config that
  the kernel's ``early_config_prune`` keeps for that target's shared memory.
* **CUDA C++**: each ``csrc/cuda/*.cu`` is compiled by nvcc with the extension's flags and
  ``-Xptxas -v`` for each target; every template instance is one row.

A row fails on a compile error, on any spill (tolerance 0 bytes: a spill is local-memory
traffic in the inner loop, and every kernel here can be tiled so that none is needed), on shared
memory (static + dynamic) over the target's opt-in per-block limit, or on registers x threads
over the 64K register file. Results are cached by a hash of everything that determines the
compile (kernel source and its callees, signature, constexprs, options, target, tool version)
under ``build/gpu_fit/``; compiles run in parallel (``--jobs``, default 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / "build" / "gpu_fit"
RESULTS_DIR = ROOT / "bench" / "results"

# Opt-in maximum of shared memory per block (CUDA C Programming Guide, compute capabilities
# table): 163 KB on sm_80 (A100), 227 KB on sm_90 (H100).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = tuple(SMEM_LIMIT)
REGISTER_FILE = 64 * 1024  # 32-bit registers per SM, and so per block, on sm_80 and sm_90
SPILL_TOLERANCE_BYTES = 0
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo"]  # as setup.py builds the extension
_ROW_FORMAT = 3  # part of every cache key: bump when the cached rows change meaning

# Shapes of one LLM layer (LLaMA-7B class): 4096 x 4096 weight, quantization blocks of 64.
HIDDEN = 4096
TOKENS = (1, 512)
RANKS = (16, 128)
HUBER_RANKS = RANKS + (256,)  # Robust PiSSA factorizes at large ranks too
NF4_BLOCKSIZE = 64


# ---------------------------------------------------------------------------------------------
# ptxas -v output


@dataclasses.dataclass
class Usage:
    """Resources ptxas reports for one entry function (bytes are per thread unless smem)."""

    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0
    static_smem: int = 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, Usage]:
    """``{entry function (mangled): Usage}`` from ``ptxas -v`` output (nvcc or Triton). Lines
    about non-entry device functions are ignored."""
    usages: dict[str, Usage] = {}
    entries: set[str] = set()
    current: str | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entries.add(m.group(1))
            current = m.group(1)
            usages.setdefault(current, Usage())
        elif m := _PROPERTIES.search(line):
            current = m.group(1) if m.group(1) in entries else None
        elif current is not None and (m := _FRAME.search(line)):
            u = usages[current]
            u.stack_frame, u.spill_stores, u.spill_loads = map(int, m.groups())
        elif current is not None and (m := _USED.search(line)):
            usages[current].registers = int(m.group(1))
            if s := _SMEM.search(line):
                usages[current].static_smem = int(s.group(1))
    return usages


@dataclasses.dataclass
class Row:
    """One compiled variant on one target, and why it fails (empty when it fits)."""

    kernel: str
    variant: str
    target: int
    threads: int
    registers: int = 0
    spill_bytes: int = 0
    local_bytes: int = 0
    static_smem: int = 0
    dynamic_smem: int = 0
    error: str = ""
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def smem(self) -> int:
        return self.static_smem + self.dynamic_smem


def check_row(row: Row) -> Row:
    """Fill ``row.failures`` from the limits of its target."""
    row.failures = []
    if row.error:
        row.failures.append(f"error: {row.error}")
        return row
    if row.spill_bytes > SPILL_TOLERANCE_BYTES:
        row.failures.append(f"spills {row.spill_bytes} B/thread")
    if row.smem > SMEM_LIMIT[row.target]:
        row.failures.append(f"smem {row.smem} B > {SMEM_LIMIT[row.target]} B")
    if row.registers * row.threads > REGISTER_FILE:
        row.failures.append(f"registers {row.registers} x {row.threads} threads > {REGISTER_FILE}")
    return row


def _row_from_usage(kernel: str, variant: str, target: int, threads: int, usage: Usage, dynamic_smem: int) -> Row:
    return Row(
        kernel,
        variant,
        target,
        threads,
        registers=usage.registers,
        spill_bytes=usage.spill_stores + usage.spill_loads,
        local_bytes=usage.stack_frame,
        static_smem=usage.static_smem,
        dynamic_smem=dynamic_smem,
    )


# ---------------------------------------------------------------------------------------------
# Triton: the launches the launchers make


@dataclasses.dataclass
class Launch:
    """One kernel launch as recorded from its launcher."""

    module: str  # module of the kernel, e.g. "lowrank_kernels.triton.fused_linear"
    name: str  # the kernel's attribute in it
    variant: str
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, module: str, name: str, variant: str, sink: list[Launch]):
        self.module, self.name, self.variant, self.sink = module, name, variant, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.module, self.name, self.variant, args, kwargs))

        return launch


@contextlib.contextmanager
def _recording(module, name: str, variant: str, sink: list[Launch]):
    """Swap ``module.name`` for a recorder, and accept CPU tensors (the launch never runs)."""
    kernel, check = getattr(module, name), module.check_device
    setattr(module, name, _Recorder(module.__name__, name, variant, sink))
    module.check_device = lambda t, n: None
    try:
        yield
    finally:
        setattr(module, name, kernel)
        module.check_device = check


def triton_launches() -> list[Launch]:
    """Every Triton kernel x each dtype its launcher accepts x the LLM shapes, as launched."""
    import torch

    from lowrank_kernels.triton import fused_linear, gram, huber, nf4, norms

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    n = k = HIDDEN
    numel = n * k
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-numel // NF4_BLOCKSIZE), dtype=torch.float32)
    launches: list[Launch] = []

    def record(module, name: str, variant: str, call: Callable[[], Any]) -> None:
        with _recording(module, name, variant, launches):
            call()

    for label, dtype in dtypes.items():
        e = lambda *shape: torch.empty(shape, dtype=dtype)  # noqa: E731
        for m in TOKENS:
            for r in RANKS:
                for bias in (False, True) if (m, r) == (TOKENS[-1], RANKS[0]) else (False,):
                    v = f"{label} M={m} r={r}" + (" bias" if bias else "")
                    record(
                        fused_linear,
                        "_nf4_lowrank_linear_kernel",
                        v,
                        lambda: fused_linear.nf4_lowrank_linear(
                            e(m, k), packed, absmax, NF4_BLOCKSIZE, n, e(m, r), e(n, r), 1.0, e(n) if bias else None
                        ),
                    )
                    if not bias:
                        record(
                            fused_linear,
                            "_nf4_lowrank_linear_grad_input_kernel",
                            v,
                            lambda: fused_linear.nf4_lowrank_linear_grad_input(
                                e(m, n), packed, absmax, NF4_BLOCKSIZE, k, e(m, r), e(r, k), 1.0
                            ),
                        )
        record(
            nf4,
            "_dequantize_nf4_kernel",
            label,
            lambda: nf4.dequantize_nf4(packed, absmax, NF4_BLOCKSIZE, numel, dtype),
        )
        record(nf4, "_quantize_nf4_kernel", label, lambda: nf4.quantize_nf4(e(n, k), NF4_BLOCKSIZE))
        record(norms, "_row_col_sq_norms_kernel", label, lambda: norms.row_col_sq_norms(e(n, k)))
        f32 = lambda *shape: torch.empty(shape, dtype=torch.float32)  # noqa: E731
        for r in HUBER_RANKS:
            record(
                huber,
                "_huber_weights_kernel",
                f"{label} r={r}",
                lambda: huber.huber_weights(e(n, k), f32(n, r), f32(r, k), f32(), f32()),
            )
        for r in RANKS:
            record(gram, "_gram_kernel", f"{label} k={r}", lambda: gram.gram(e(n, r)))
    return launches


@dataclasses.dataclass
class TritonTask:
    """One compile: picklable, so a worker process can run it."""

    module: str
    name: str
    variant: str
    target: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    key: str = ""


def _jit_function(module: str, name: str):
    import importlib

    kernel = getattr(importlib.import_module(module), name)
    return kernel.fn if hasattr(kernel, "configs") else kernel  # an Autotuner wraps the JITFunction


def _configs_for(kernel, launch: Launch, target: int) -> list:
    """The autotune configs the kernel may pick on ``target``: its early_config_prune, given the
    target's shared memory, applied to its configs (one empty config for a plain kernel)."""
    import triton

    if not hasattr(kernel, "configs"):
        return [triton.Config({})]
    if kernel.early_config_prune is None:
        return list(kernel.configs)
    named = dict(zip(kernel.arg_names, launch.args))
    return list(kernel.early_config_prune(kernel.configs, named, smem_limit=SMEM_LIMIT[target], **launch.kwargs))


def triton_tasks(launches: Iterable[Launch]) -> list[TritonTask]:
    """Specialise each launch x target x config with Triton's own binder."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    tasks: dict[str, TritonTask] = {}
    for launch in launches:
        kernel = getattr(sys.modules[launch.module], launch.name)
        fn = kernel.fn if hasattr(kernel, "configs") else kernel
        for target in TARGETS:
            backend = make_backend(GPUTarget("cuda", target, 32))
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            for config in _configs_for(kernel, launch, target):
                kwargs = launch.kwargs | config.all_kwargs()
                bound, specialization, options = binder(*launch.args, **kwargs)
                options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
                chosen = {f: getattr(options, f) for f in ("num_warps", "num_stages", "num_ctas", "maxnreg")}
                meta = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
                launch_options = f"w{chosen['num_warps']} s{chosen['num_stages']}"
                variant = f"{launch.variant} [{meta}{', ' if meta else ''}{launch_options}]"
                task = TritonTask(launch.module, launch.name, variant, target, signature, constexprs, attrs, chosen)
                task.key = _hash(
                    fn.cache_key,
                    sorted(signature.items()),
                    sorted(constexprs.items(), key=str),
                    sorted(attrs.items(), key=str),
                    sorted(chosen.items()),
                    target,
                    triton.__version__,
                    "triton",
                    _ROW_FORMAT,
                )
                tasks.setdefault(task.key, task)  # r=16 and r=17 etc. compile to the same kernel
    return list(tasks.values())


def _hash(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def compile_triton(task: TritonTask) -> dict:
    """Compile one task to a cubin (worker process) -> a Row as a dict."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    threads = task.options["num_warps"] * 32
    kernel = "triton:" + task.name.lstrip("_")
    try:
        fn = _jit_function(task.module, task.name)
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, task.signature, task.constexprs, task.attrs),
                target=GPUTarget("cuda", task.target, 32),
                options=task.options,
            )
        usages = parse_ptxas_log(log.getvalue())
        if not usages:  # Triton's cache had the cubin, so ptxas did not run: run it on the PTX
            usages = parse_ptxas_log(_ptxas_log(compiled.asm["ptx"], task.target))
        usage = next(iter(usages.values()))
        row = _row_from_usage(kernel, task.variant, task.target, threads, usage, compiled.metadata.shared)
    except Exception as exc:  # noqa: BLE001 - any failure to compile is a gate failure
        row = Row(kernel, task.variant, task.target, threads, error=f"{type(exc).__name__}: {exc}"[:400])
    return dataclasses.asdict(row)


def _ptxas_log(ptx: str, target: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    arch = "sm_90a" if target == 90 else f"sm_{target}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [
                get_ptxas(target).path,
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={arch}",
                str(src),
                "-o",
                str(src.with_suffix(".cubin")),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    return out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# CUDA C++


@dataclasses.dataclass
class CudaTask:
    source: str  # path relative to ROOT
    target: int
    key: str = ""


def cuda_tasks() -> list[CudaTask]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    headers = (
        sorted((ROOT / "csrc" / "include").rglob("*.h"))
        + sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))
        + sorted((ROOT / "csrc" / "cuda").glob("*.h"))
    )
    header_hash = _hash(*(p.read_bytes() for p in headers))
    tasks = []
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for target in TARGETS:
            task = CudaTask(str(source.relative_to(ROOT)), target)
            task.key = _hash(source.read_bytes(), header_hash, version, NVCC_FLAGS, target, "cuda", _ROW_FORMAT)
            tasks.append(task)
    return tasks


# Threads per block of the kernels of each csrc/cuda source (its kThreads), for the register-file
# check; a source missing here is checked at CUDA's maximum block, 1024 threads.
_CUDA_THREADS = {"nf4_cuda.cu": 256, "nf4_linear_cuda.cu": 128, "norms_cuda.cu": 256}


def compile_cuda(task: CudaTask) -> list[dict]:
    """nvcc -Xptxas -v one .cu for one target -> one Row (as a dict) per kernel instance."""
    source = ROOT / task.source
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "nvcc",
            "-c",
            *NVCC_FLAGS,
            f"-I{ROOT / 'csrc' / 'include'}",
            f"-I{ROOT / 'csrc' / 'cuda'}",
            f"-gencode=arch=compute_{task.target},code=sm_{task.target}",
            "-Xptxas",
            "-v",
            str(source),
            "-o",
            str(Path(tmp) / "k.o"),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return [
            dataclasses.asdict(
                Row(
                    f"cuda:{source.name}", "(translation unit)", task.target, 0, error=(out.stderr or out.stdout)[-400:]
                )
            )
        ]
    usages = parse_ptxas_log(out.stderr + out.stdout)
    names = _demangle(list(usages))
    rows = []
    for mangled, usage in usages.items():
        kernel, variant = _split_template(names[mangled])
        threads = _CUDA_THREADS.get(source.name, 1024)
        # Every launch passes 0 bytes of dynamic shared memory (<<<grid, block, 0, stream>>>).
        rows.append(dataclasses.asdict(_row_from_usage(f"cuda:{kernel}", variant, task.target, threads, usage, 0)))
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _split_template(signature: str) -> tuple[str, str]:
    """'void ns::(anonymous namespace)::k<float, 4, true>(args)' -> ('k', '<float, 4, true>')."""
    name = signature.replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(name):  # cut the argument list: the first '(' outside <...>
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            name = name[:i]
            break
    name = name.split(" ", 1)[1] if name.startswith("void ") else name
    lt = name.find("<")
    if lt < 0:
        return name.split("::")[-1], ""
    return name[:lt].split("::")[-1], name[lt:]


# ---------------------------------------------------------------------------------------------
# running, caching, reporting


def _load_cache() -> dict:
    path = CACHE_DIR / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(cache: dict) -> None:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CACHE_DIR / "results.json.tmp"
    tmp.write_text(json.dumps(cache))
    tmp.replace(CACHE_DIR / "results.json")


def _worker_init() -> None:
    os.environ.setdefault("TRITON_CACHE_DIR", str(CACHE_DIR / "triton"))


def run(jobs: int) -> tuple[list[Row], dict]:
    """Compile everything (cached) -> (rows, counts)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_fit compiles for GPUs: unset TRITON_INTERPRET")
    tasks: list[Any] = triton_tasks(triton_launches()) + cuda_tasks()
    cache = _load_cache()  # only results without errors are kept: a failed compile is retried
    todo = [t for t in tasks if t.key not in cache]
    fresh: dict[str, list[dict]] = {}
    with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init) as pool:
        # CUDA translation units first: each is long, the Triton compiles fill in around them.
        todo.sort(key=lambda t: not isinstance(t, CudaTask))
        futures = {t.key: pool.submit(compile_cuda if isinstance(t, CudaTask) else compile_triton, t) for t in todo}
        for key, future in futures.items():
            result = future.result()
            fresh[key] = result if isinstance(result, list) else [result]
            if not any(r["error"] for r in fresh[key]):
                cache[key] = fresh[key]
                _store_cache(cache)
    rows = [check_row(Row(**r)) for t in tasks for r in (cache.get(t.key) or fresh[t.key])]
    if not shutil.which("nvcc"):
        rows.append(check_row(Row("nvcc", "not found on PATH", TARGETS[0], 0, error="nvcc missing")))
    return rows, {"compiles": len(tasks), "compiled_now": len(todo), "cached": len(tasks) - len(todo)}


def summary_table(rows: list[Row]) -> str:
    """Per kernel and target: variants, worst registers, worst spill, worst local memory, worst
    shared memory (KB) against the limit, failures."""
    kernels = sorted({r.kernel for r in rows}, key=lambda k: [r.kernel for r in rows].index(k))
    head = (
        f"{'kernel':<44} {'target':<6} {'variants':>8} {'regs':>5} {'spill B':>8} {'local B':>8} "
        f"{'smem KB':>8} {'limit KB':>8}  failing"
    )
    lines = [head, "-" * len(head)]
    for kernel in kernels:
        for target in TARGETS:
            mine = [r for r in rows if r.kernel == kernel and r.target == target]
            if not mine:
                continue
            failing = sum(bool(r.failures) for r in mine)
            lines.append(
                f"{kernel:<44} sm_{target:<3} {len(mine):>8} {max(r.registers for r in mine):>5} "
                f"{max(r.spill_bytes for r in mine):>8} {max(r.local_bytes for r in mine):>8} "
                f"{max(r.smem for r in mine) / 1024:>8.1f} {SMEM_LIMIT[target] / 1024:>8.0f}  {failing or '-'}"
            )
    return "\n".join(lines)


def variant_table(rows: list[Row]) -> str:
    """Every compiled variant: registers, spills, local memory, static + dynamic shared memory."""
    head = (
        f"{'kernel':<44} {'target':<6} {'regs':>4} {'spill B':>7} {'local B':>7} {'static B':>8} "
        f"{'dynamic B':>9}  variant"
    )
    return "\n".join(
        [head, "-" * len(head)]
        + [
            f"{r.kernel:<44} sm_{r.target:<3} {r.registers:>4} {r.spill_bytes:>7} {r.local_bytes:>7} "
            f"{r.static_smem:>8} {r.dynamic_smem:>9}  {r.variant}{'  FAIL' if r.failures else ''}"
            for r in rows
        ]
    )


def failure_lines(rows: list[Row]) -> list[str]:
    return [f"FAIL {r.kernel} {r.variant} sm_{r.target}: {'; '.join(r.failures)}" for r in rows if r.failures]


def write_report(rows: list[Row], counts: dict, seconds: float, out_dir: Path) -> str:
    """JSON (every row) and text (summary, failures, every variant) under out_dir; returns the
    summary and failures (what main prints)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "\n".join(
        [
            f"GPU-fit gate: {counts['compiles']} compiles ({counts['compiled_now']} now, {counts['cached']} cached) "
            f"in {seconds:.0f} s; limits: smem/block {', '.join(f'sm_{t} {v // 1024} KB' for t, v in SMEM_LIMIT.items())}, "
            f"spill tolerance {SPILL_TOLERANCE_BYTES} B",
            summary_table(rows),
            *failure_lines(rows),
            f"{'FAILED' if any(r.failures for r in rows) else 'PASSED'}: "
            f"{sum(bool(r.failures) for r in rows)} of {len(rows)} kernel variants fail",
        ]
    )
    payload = {
        "seconds": seconds,
        **counts,
        "smem_limit": SMEM_LIMIT,
        "spill_tolerance": SPILL_TOLERANCE_BYTES,
        "rows": [dataclasses.asdict(r) | {"smem": r.smem} for r in rows],
    }
    full = f"{text}\n\n{variant_table(rows)}\n"
    for name, content in (("gpu_fit.json", json.dumps(payload, indent=1)), ("gpu_fit.txt", full)):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(content)
        tmp.replace(out_dir / name)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="parallel compiles (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="report directory (default bench/results)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows, counts = run(args.jobs)
    print(write_report(rows, counts, time.perf_counter() - start, args.out))
    return 1 if any(r.failures for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
