"""Streaming conversion of a model on disk into adapter files: `convert_files`.

The source is read lazily (`sources.open_source`: safetensors headers only), and its layers are
planned into output shards of at most ``max_shard_size`` bytes, in model order. Each shard is
converted batch by batch — same-shape layers of the shard, at most ``batch_elements`` weight
elements per batch (at least one layer) — and its tensors stream to disk as they are made
(`shards.ShardWriter`), so resident memory is one batch plus the interpreter, whatever the
model's size. A layer's result depends only on its weight, the options and (seed, name)
(`convert.layer_generator`), not on its batch, so the plan's batch sizes change speed, never
bits.

Output formats (``fmt``):

* ``"lowrank"``: this library's checked checkpoint (`checkpoint.save_converted`'s format), one
  file when ``output`` ends in ``.safetensors``, else a directory of shards
  ``adapters-0000i-of-0000N.safetensors`` with ``adapters.safetensors.index.json``.
* ``"peft"``: ``output/residual/``, a transformers model directory (config.json, every source
  tensor with each target's weight replaced by its residual W_res in the source dtype — or, with
  ``quantize="nf4"``, by its bitsandbytes 4-bit state and a ``quantization_config`` in
  config.json, so transformers + bitsandbytes load it as a 4-bit model — sharded with
  ``model.safetensors.index.json``), and ``output/adapter/``, a PEFT LoRA adapter
  (``lora_A`` = our B, ``lora_B`` = our A, ``lora_alpha = scale · r`` so PEFT's scaling
  ``lora_alpha / r`` is our scale).

Resumable: each finished shard is recorded (SHA-256 of its files and a fingerprint of source,
options and plan) in ``output/.resume/``; ``resume=True`` keeps the shards whose files still
have their digests and converts the rest, giving the bytes of an uninterrupted run. Under
``torch.distributed`` each rank converts and writes its own shards (balanced by cost) and rank 0
writes the index and configs once all are done: no tensor is sent between ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from lowrank_kernels._checks import is_int
from lowrank_kernels.adapters import checkpoint
from lowrank_kernels.adapters.convert import (
    ConversionReport,
    LayerReport,
    _layer,
    _metrics,
    layer_generator,
    select_targets,
)
from lowrank_kernels.adapters.pissa_linear import AdapterOptions, adapter_split
from lowrank_kernels.adapters.shards import ShardWriter, file_sha256, write_json
from lowrank_kernels.adapters.sources import (
    INDEX_NAME,
    LazySource,
    SourceError,
    open_source,
)

FORMATS = ("lowrank", "peft")
LOWRANK_INDEX = checkpoint.INDEX_NAME
RESUME_DIR = ".resume"
#: Weight elements converted at once (a batch of same-shape layers; one layer if larger): about
#: 17 bytes per element are alive during a QPiSSA batch, so ~1.1 GB.
BATCH_ELEMENTS = 1 << 26
#: Bytes of output per shard before a new one starts.
MAX_SHARD_SIZE = 2 << 30


class OutputError(ValueError):
    """An output path that cannot be written as asked (exists, inside the source, unwritable, full)."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """One output shard of the plan: ``layers`` (target module names) and ``copies`` (source
    keys written through, PEFT format), both in model order; ``cost``: target weight elements."""

    number: int
    count: int
    layers: tuple[str, ...]
    copies: tuple[str, ...]
    cost: int

    def files(self, fmt: str, single: str | None) -> dict[str, str]:
        """role -> path relative to the output (``single``: the one-file lowrank output's name)."""
        tag = f"{self.number:05d}-of-{self.count:05d}"
        if fmt == "lowrank":
            return {"lowrank": single or f"adapters-{tag}.safetensors"}
        return {"residual": f"residual/model-{tag}.safetensors", "adapter": f"{RESUME_DIR}/adapter-{tag}.safetensors"}


# ---- planning -------------------------------------------------------------------------------------------


def _layer_nbytes(shape: tuple[int, int], dtype: torch.dtype, options: AdapterOptions, bias: bool) -> int:
    """Output bytes of one converted layer (residual, A, B, bias)."""
    m, n = shape
    if options.quantize is None:
        residual = m * n * dtype.itemsize
    else:
        blocks = -(-m * n // options.blocksize)
        residual = (
            -(-m * n // 2)
            + blocks * (1 if options.double_quant else 4)
            + (4 + 4 * -(-blocks // 256) + 4 * 256 if options.double_quant else 0)
        )
    return residual + options.rank * (m + n) * dtype.itemsize + (m * dtype.itemsize if bias else 0)


def plan_shards(
    source: LazySource, targets: Sequence[str], options: AdapterOptions, fmt: str, max_shard_size: int
) -> list[Shard]:
    """The output shards: model order, a new shard when the next item would take the current one
    past ``max_shard_size`` bytes of output or of source tensors read (an NF4 shard is ~4x
    smaller than its source: so it still splits a model into parts torchrun ranks can share).
    The lowrank format holds the target layers only; the PEFT residual every source tensor
    (targets' biases travel with their layer)."""
    target_set = set(targets)
    items: list[tuple[str, str, int, int]] = []  # kind, name, bytes, cost
    for key, info in source.tensors.items():
        name = key.removesuffix(".weight")
        if name in target_set and key.endswith(".weight"):
            shape = source.linears[name]
            read = info.nbytes + (source.tensors[f"{name}.bias"].nbytes if source.has_bias(name) else 0)
            items.append(
                (
                    "layer",
                    name,
                    max(read, _layer_nbytes(shape, info.dtype, options, source.has_bias(name))),
                    shape[0] * shape[1],
                )
            )
        elif fmt == "peft" and not (key.endswith(".bias") and key.removesuffix(".bias") in target_set):
            items.append(("copy", key, info.nbytes, 0))
    groups: list[list[tuple[str, str, int, int]]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item[2] > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item[2]
    return [
        Shard(
            i + 1,
            len(groups),
            tuple(n for k, n, _, _ in group if k == "layer"),
            tuple(n for k, n, _, _ in group if k == "copy"),
            sum(c for *_, c in group),
        )
        for i, group in enumerate(groups)
    ]


def batches(source: LazySource, layers: Sequence[str], batch_elements: int) -> list[list[str]]:
    """``layers`` in batches of one shape and dtype (groups in order of first appearance), each
    of at most ``batch_elements`` weight elements, or one layer."""
    groups: dict[tuple, list[str]] = {}
    for name in layers:
        groups.setdefault((source.linears[name], source.tensors[f"{name}.weight"].dtype), []).append(name)
    out: list[list[str]] = []
    for (shape, _), names in groups.items():
        per_batch = max(1, batch_elements // (shape[0] * shape[1]))
        out += [names[i : i + per_batch] for i in range(0, len(names), per_batch)]
    return out


# ---- conversion ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    source: LazySource
    output: str
    fmt: str
    single: str | None  # one-file lowrank output: its file name
    options: AdapterOptions
    seed: int
    metrics: bool
    batch_elements: int
    fingerprint: str
    targets: tuple[str, ...]


def convert_files(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    rank: int,
    fmt: str = "lowrank",
    target_modules: str | Sequence[str] | None = None,
    init: str = "rsvd",
    scale: float = 1.0,
    quantize: str | None = None,
    quant_iters: int = 1,
    blocksize: int = 64,
    double_quant: bool = False,
    seed: int = 0,
    metrics: bool = False,
    max_shard_size: int = MAX_SHARD_SIZE,
    batch_elements: int = BATCH_ELEMENTS,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    group=None,
    **init_options,
) -> ConversionReport | None:
    """Converts the model at ``source`` (Hugging Face directory or bare safetensors file) into
    ``output`` in format ``fmt`` (see the module docstring), streaming; returns the
    `ConversionReport` (on rank 0 under torch.distributed, None on the other ranks).

    target_modules: as in `convert_model`; default every linear but the output embedding.
    metrics:        per-layer reconstruction error and (NF4) error reduction (costs about as much
                    as the conversion itself with NF4).
    resume / overwrite: continue an interrupted run in ``output`` / replace an existing output;
                    without either an existing output is refused.
    Everything checkable (options, targets, ranks, the source's coverage of its architecture, the
    output path, its writability and free space) is checked before any layer is converted.
    """
    import torch.distributed as dist

    start = time.perf_counter()
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    options = AdapterOptions(rank, init, scale, quantize, quant_iters, blocksize, double_quant)
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")
    for name, value in (("max_shard_size", max_shard_size), ("batch_elements", batch_elements)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    lazy = open_source(source)
    if fmt == "peft" and lazy.config_dir is None:
        raise ValueError(
            "format 'peft' needs a Hugging Face model directory as the source (config.json), "
            f"{os.fspath(source)!r} is a bare safetensors file"
        )
    targets = _targets(lazy, target_modules, options)
    output = os.path.abspath(os.fspath(output))
    single = os.path.basename(output) if fmt == "lowrank" and output.endswith(".safetensors") else None
    if single and resume:
        raise ValueError(
            "resume works on a sharded output directory; a one-file output (.safetensors) is written in one step"
        )
    plan = plan_shards(lazy, targets, options, fmt, math.inf if single else max_shard_size)
    job = _Job(
        lazy,
        os.path.dirname(output) if single else output,
        fmt,
        single,
        options,
        seed,
        metrics,
        batch_elements,
        _fingerprint(lazy, targets, options, fmt, seed, plan, init_options),
        tuple(targets),
    )
    distributed = dist.is_available() and dist.is_initialized()
    rank_id, world = (dist.get_rank(group), dist.get_world_size(group)) if distributed else (0, 1)
    estimate = sum(
        _layer_nbytes(lazy.linears[n], lazy.tensors[f"{n}.weight"].dtype, options, lazy.has_bias(n)) for n in targets
    ) + (sum(lazy.tensors[k].nbytes for s in plan for k in s.copies))
    outcome = None
    try:
        if rank_id == 0:
            _prepare_output(job, resume, overwrite, estimate)
    except Exception as exc:  # every rank raises, not only the one that checked
        outcome = exc
    if distributed:
        _all_succeed(outcome, rank_id, world, group)
    elif outcome is not None:
        raise outcome
    mine = _assign(plan, world)[rank_id]
    reports: list[LayerReport] = []
    metric_seconds = 0.0
    outcome = None
    try:
        desc = "PiSSA conversion" + (f" (rank 0's {len(mine)} of {len(plan)} shards)" if world > 1 else "")
        with tqdm(
            total=sum(len(s.layers) for s in mine),
            disable=not progress or rank_id != 0,
            desc=desc,
            unit="layer",
            dynamic_ncols=True,
        ) as bar:  # layers, time left; peak RSS in the postfix
            for shard in mine:
                if resume and _finished(job, shard):
                    bar.update(len(shard.layers))
                    continue
                shard_reports, seconds = _convert_shard(job, shard, bar, init_options)
                reports += shard_reports
                metric_seconds += seconds
    except Exception as exc:
        outcome = exc
    if distributed:
        _all_succeed(outcome, rank_id, world, group)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, reports, group=group)  # the reports only: names and numbers
        reports = [layer for part in gathered for layer in part]
    elif outcome is not None:
        raise outcome
    if rank_id != 0:
        return None
    _finish(job, plan)
    by_name = {layer.name: layer for layer in reports}
    return ConversionReport(
        [by_name[name] for name in targets if name in by_name], options, time.perf_counter() - start, metric_seconds
    )


def _targets(source: LazySource, target_modules, options: AdapterOptions) -> list[str]:
    names = list(source.linears)
    if target_modules is None:
        names = [n for n in names if n != source.output_embedding]
        if not names:
            raise SourceError(f"{source.path!r} has no linear layers to convert")
        target_modules = names
    targets = select_targets(list(source.linears), target_modules)
    for name in targets:
        info = source.tensors[f"{name}.weight"]
        options.check_weight(torch.empty(info.shape, dtype=info.dtype, device="meta"), name)
    return targets


def _fingerprint(source: LazySource, targets, options, fmt, seed, plan, init_options) -> str:
    """What a finished shard must have been made from for `resume` to keep it."""
    content = {
        "tensors": {k: [os.path.basename(v.file), str(v.dtype), list(v.shape)] for k, v in source.tensors.items()},
        "sizes": {os.path.basename(f): os.path.getsize(f) for f in source.files()},
        "targets": list(targets),
        "options": dataclasses.asdict(options),
        "format": fmt,
        "seed": seed,
        "init_options": repr(sorted(init_options.items())),
        "plan": [[s.layers, s.copies] for s in plan],
        "version": checkpoint.FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _assign(plan: Sequence[Shard], world: int) -> list[list[Shard]]:
    from lowrank_kernels.adapters.distributed import balance

    owners = balance([max(shard.cost, 1) for shard in plan], world)
    return [[shard for shard, owner in zip(plan, owners) if owner == r] for r in range(world)]


def _all_succeed(outcome: BaseException | None, rank: int, world: int, group) -> None:
    from lowrank_kernels.adapters.distributed import _raise_if_any_failed

    _raise_if_any_failed(outcome, rank, world, group)


def _convert_shard(job: _Job, shard: Shard, bar, init_options) -> tuple[list[LayerReport], float]:
    """Converts and writes one shard; records it for `resume`. Returns its layer reports and
    the seconds spent on metrics."""
    files = shard.files(job.fmt, job.single)
    for rel in files.values():
        os.makedirs(os.path.dirname(os.path.join(job.output, rel)), exist_ok=True)
    writers = {role: ShardWriter(os.path.join(job.output, rel)) for role, rel in files.items()}
    reports: list[LayerReport] = []
    configs: dict[str, dict] = {}
    metric_seconds = 0.0
    try:
        _copy_through(job.source, shard.copies, writers.get("residual"), job.batch_elements)
        for batch in batches(job.source, shard.layers, job.batch_elements):
            bar.set_postfix_str(
                f"{len(batch)} x {list(job.source.linears[batch[0]])}, peak RSS {_peak_rss_gib():.2f} GiB"
            )
            t0 = time.perf_counter()
            weights, biases = _read_batch(job.source, batch)
            split = adapter_split(weights, job.options, [layer_generator(job.seed, n) for n in batch], **init_options)
            t1 = time.perf_counter()
            errors = _metrics(weights, split, job.options) if job.metrics else [(None, None)] * len(batch)
            t2 = time.perf_counter() if job.metrics else t1
            for i, name in enumerate(batch):
                _emit(job, writers, configs, name, _layer(split, i, biases[i], job.options))
            seconds = (time.perf_counter() - t2 + t1 - t0) / len(batch)
            metric_seconds += t2 - t1
            o = job.options
            reports += [
                LayerReport(name, job.source.linears[name], o.rank, o.init, o.quantize, seconds, *error)
                for name, error in zip(batch, errors)
            ]
            del weights, split
            bar.update(len(batch))
        digests = {}
        for role, writer in writers.items():
            metadata = _lowrank_metadata(configs) if role == "lowrank" else {"format": "pt"}
            digests[files[role]] = writer.commit(metadata)
    finally:
        for writer in writers.values():
            writer.close()
    if not job.single:
        os.makedirs(os.path.join(job.output, RESUME_DIR), exist_ok=True)
        write_json(_record_path(job, shard), {"fingerprint": job.fingerprint, "files": digests})
    return reports, metric_seconds


def _read_batch(source: LazySource, batch: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The batch's weights stacked ``[len(batch), out, in]`` (their dtype) and biases; checks finiteness."""
    keys = [f"{n}.weight" for n in batch] + [f"{n}.bias" for n in batch if source.has_bias(n)]
    tensors = source.read(keys)
    weights = torch.stack([tensors.pop(f"{n}.weight") for n in batch])
    for name, w in zip(batch, weights):
        if not torch.isfinite(w).all():
            raise ValueError(f"{name}: weight contains NaN or Inf")
    return weights, [tensors.get(f"{n}.bias") for n in batch]


def _copy_through(source: LazySource, keys: Sequence[str], writer: ShardWriter | None, batch_elements: int) -> None:
    """Source tensors written unchanged (their dtype), read a few at a time."""
    pending: list[str] = []
    budget = 4 * batch_elements  # bytes
    for i, key in enumerate(keys):
        pending.append(key)
        if i + 1 == len(keys) or sum(source.tensors[k].nbytes for k in pending) >= budget:
            for k, tensor in source.read(pending).items():
                writer.add(k, tensor)
            pending = []


def _emit(job: _Job, writers: dict[str, ShardWriter], configs: dict, name: str, layer) -> None:
    """Writes one converted layer (a `PiSSALinear`) in the job's format."""
    if job.fmt == "lowrank":
        for key, tensor in layer.state_dict().items():
            writers["lowrank"].add(f"{name}.{key}", tensor)
        configs[name] = checkpoint._layer_config(layer)
        return
    if layer.quantize:
        for key, tensor in bnb_4bit_state(layer.residual_weight()).items():
            writers["residual"].add(f"{name}.{key}", tensor)
    else:
        writers["residual"].add(f"{name}.weight", layer.residual)
    if layer.bias is not None:
        writers["residual"].add(f"{name}.bias", layer.bias)
    writers["adapter"].add(f"base_model.model.{name}.lora_A.weight", layer.B.detach())
    writers["adapter"].add(f"base_model.model.{name}.lora_B.weight", layer.A.detach())


def bnb_4bit_state(q) -> dict[str, torch.Tensor]:
    """An `NF4Weight` as the tensors of a bitsandbytes ``Linear4bit`` state dict (``weight``: the
    packed codes ``[numel / 2, 1]`` uint8, then ``weight.absmax``, ``weight.quant_map``, the nested
    statistics with double quant and the packed ``weight.quant_state.bitsandbytes__nf4``), which
    transformers loads as a pre-quantized 4-bit model. Our NF4 is bitsandbytes' bit for bit."""
    from bitsandbytes.functional import QuantState, get_4bit_type

    nested = QuantState(absmax=q.absmax2, code=q.code2, blocksize=256, dtype=torch.float32) if q.double_quant else None
    state = QuantState(
        absmax=q.absmax,
        shape=q.shape,
        code=get_4bit_type("nf4", device="cpu"),
        blocksize=q.blocksize,
        quant_type="nf4",
        dtype=q.dtype,
        offset=q.offset,
        state2=nested,
    )
    return {
        "weight": q.packed.reshape(-1, 1),
        **{f"weight.{key}": tensor for key, tensor in state.as_dict(packed=True).items()},
    }


def _lowrank_metadata(configs: dict[str, dict]):
    layers = json.dumps(configs, sort_keys=True)
    return lambda writer: {
        "format": checkpoint.FORMAT,
        "format_version": str(checkpoint.FORMAT_VERSION),
        "layers": layers,
        "sha256": writer.digest(layers.encode()),
    }


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- output: checks, resume records, index and configs ----------------------------------------------


def _record_path(job: _Job, shard: Shard) -> str:
    return os.path.join(job.output, RESUME_DIR, f"shard-{shard.number:05d}-of-{shard.count:05d}.json")


def _finished(job: _Job, shard: Shard) -> bool:
    """Whether ``shard`` was written by a run with the same fingerprint and its files still have
    their recorded digests."""
    try:
        with open(_record_path(job, shard)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    files = shard.files(job.fmt, job.single).values()
    return (
        record.get("fingerprint") == job.fingerprint
        and set(record.get("files", {})) == set(files)
        and all(
            os.path.isfile(os.path.join(job.output, rel)) and file_sha256(os.path.join(job.output, rel)) == digest
            for rel, digest in record["files"].items()
        )
    )


def _ours(name: str) -> bool:
    """Whether a directory entry is one this conversion writes (what --overwrite may remove)."""
    return (
        name in (LOWRANK_INDEX, RESUME_DIR, "residual", "adapter")
        or re.fullmatch(r"adapters-\d{5}-of-\d{5}\.safetensors", name) is not None
    )


def _prepare_output(job: _Job, resume: bool, overwrite: bool, estimate: int) -> None:
    """Refuses an output that is or lies inside the source (or holds it), an existing output
    without ``resume`` / ``overwrite``, an unwritable directory, too little free space or a file
    size limit below the largest file; then removes an output being overwritten."""
    if resume and overwrite:
        raise OutputError(
            "--resume and --overwrite exclude each other: resume keeps finished shards, overwrite discards them"
        )
    target = os.path.realpath(os.path.join(job.output, job.single) if job.single else job.output)
    source = os.path.realpath(job.source.path)
    inside = lambda a, b: a == b or a.startswith(b.rstrip(os.sep) + os.sep)  # noqa: E731
    if inside(target, source) or inside(source, target):
        raise OutputError(
            f"output {target!r} is, lies inside or contains the source {source!r}: "
            f"choose another path (the source must not be overwritten)"
        )
    if job.single:
        if not os.path.isdir(job.output):
            raise OutputError(f"output {target!r}: directory {job.output!r} does not exist")
        if os.path.exists(target) and not overwrite:
            raise OutputError(f"output {target!r} exists; pass --overwrite to replace it")
        if os.path.isdir(target):
            raise OutputError(f"output {target!r} is a directory")
    elif os.path.exists(job.output):
        if not os.path.isdir(job.output):
            raise OutputError(
                f"output {job.output!r} exists and is not a directory; pass --overwrite to replace it"
                if not overwrite
                else f"output {job.output!r} is a file, not an output directory"
            )
        entries = os.listdir(job.output)
        if entries and not (resume or overwrite):
            raise OutputError(
                f"output directory {job.output!r} is not empty; pass --resume to continue an "
                f"interrupted conversion or --overwrite to replace it"
            )
        foreign = [e for e in entries if not _ours(e)]
        if foreign and (resume or overwrite):
            raise OutputError(
                f"output directory {job.output!r} holds files this conversion does not write "
                f"({', '.join(sorted(foreign)[:4])}); refusing to {'resume in' if resume else 'replace'} it"
            )
    else:
        parent = os.path.dirname(job.output)
        if not os.path.isdir(parent):
            raise OutputError(f"output {job.output!r}: directory {parent!r} does not exist")
    _check_writable(job.output if os.path.isdir(job.output) else os.path.dirname(job.output), estimate)
    if overwrite and not job.single and os.path.isdir(job.output):
        for entry in os.listdir(job.output):
            path = os.path.join(job.output, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    os.makedirs(job.output, exist_ok=True)


def _check_writable(directory: str, estimate: int) -> None:
    from lowrank_kernels.adapters.shards import _tmpfile

    try:
        fd, temp = _tmpfile(directory, "write-test")
        os.close(fd)
        if temp:
            os.unlink(temp)
    except OSError as exc:
        raise OutputError(f"cannot write to the output directory {directory!r}: {exc.strerror or exc}") from exc
    free = shutil.disk_usage(directory).free
    if free < estimate:
        raise OutputError(
            f"the output needs about {estimate / 1e9:.2f} GB and {directory!r} has {free / 1e9:.2f} GB free"
        )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < min(estimate, MAX_SHARD_SIZE):
        raise OutputError(
            f"the file size limit (ulimit -f) is {limit} bytes, below the output's files "
            f"(up to {min(estimate, MAX_SHARD_SIZE)} bytes)"
        )


def _finish(job: _Job, plan: Sequence[Shard]) -> None:
    """Rank 0, once every shard is on disk: the index and configs, then the resume records go."""
    if job.single:
        return
    files = [shard.files(job.fmt, job.single) for shard in plan]
    if job.fmt == "lowrank":
        write_json(
            os.path.join(job.output, LOWRANK_INDEX),
            {
                "metadata": {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION},
                "weight_map": _weight_map(job.output, [f["lowrank"] for f in files]),
            },
        )
    else:
        _finish_peft(job, [f["residual"] for f in files], [f["adapter"] for f in files])
    shutil.rmtree(os.path.join(job.output, RESUME_DIR), ignore_errors=True)


def _bnb_config(job: _Job, path: str) -> dict:
    """The source's config.json with the bitsandbytes 4-bit quantization_config of the residual
    (the linears that are not targets stay unquantized)."""
    with open(path) as f:
        config = json.load(f)
    dtype = {
        info.dtype for key, info in job.source.tensors.items() if key.removesuffix(".weight") in job.source.linears
    }
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": job.options.double_quant,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_compute_dtype": str(dtype.pop() if len(dtype) == 1 else torch.float32).removeprefix("torch."),
        "llm_int8_skip_modules": sorted(set(job.source.linears) - set(job.targets)),
    }
    return config


def _weight_map(root: str, rels: Sequence[str]) -> dict[str, str]:
    from safetensors import safe_open

    weight_map = {}
    for rel in rels:
        with safe_open(os.path.join(root, rel), framework="pt") as f:
            weight_map.update({key: os.path.basename(rel) for key in f.keys()})
    return dict(sorted(weight_map.items()))


def _finish_peft(job: _Job, residuals: Sequence[str], adapters: Sequence[str]) -> None:
    from safetensors import safe_open

    residual_dir, adapter_dir = os.path.join(job.output, "residual"), os.path.join(job.output, "adapter")
    total = sum(job.source.tensors[k].nbytes for k in job.source.tensors)
    write_json(
        os.path.join(residual_dir, INDEX_NAME),
        {"metadata": {"total_size": total}, "weight_map": _weight_map(job.output, residuals)},
    )
    for entry in sorted(os.listdir(job.source.config_dir)):  # config, generation config, tokenizer
        path = os.path.join(job.source.config_dir, entry)
        if entry == "config.json" and job.options.quantize:
            write_json(os.path.join(residual_dir, entry), _bnb_config(job, path))
        elif (
            os.path.isfile(path) and not entry.endswith((".safetensors", ".bin", ".pt", ".pth")) and entry != INDEX_NAME
        ):
            shutil.copyfile(path, os.path.join(residual_dir, f".{entry}.tmp-{os.getpid()}"))
            os.replace(os.path.join(residual_dir, f".{entry}.tmp-{os.getpid()}"), os.path.join(residual_dir, entry))
    os.makedirs(adapter_dir, exist_ok=True)
    with ShardWriter(os.path.join(adapter_dir, "adapter_model.safetensors")) as writer:
        for rel in adapters:
            with safe_open(os.path.join(job.output, rel), framework="pt") as f:
                for key in f.keys():
                    writer.add(key, f.get_tensor(key))
        names = sorted(
            key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            for key in writer.keys()
            if key.endswith(".lora_A.weight")
        )
        writer.commit({"format": "pt"})
    o = job.options
    alpha = o.scale * o.rank
    write_json(
        os.path.join(adapter_dir, "adapter_config.json"),
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM" if job.source.causal_lm else None,
            "base_model_name_or_path": os.path.abspath(job.source.path),
            "r": o.rank,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": 0.0,
            "target_modules": names,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
        },
    )
