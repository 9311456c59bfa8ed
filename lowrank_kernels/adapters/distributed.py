"""Multi-process conversion of a model in memory (the `convert` command streams from disk instead,
`streaming.convert_files`, where each rank writes its own shards): the target layers of one
model are sharded across the ranks of a ``torch.distributed`` process group (gloo on CPU, nccl on GPU), each rank decomposes its share
with `convert_model` (same-shape layers of a shard as one batch), and rank 0 gathers the
converted layers into its model.

Every layer draws from its own generator seeded by (seed, layer name) (`layer_generator`), and a
layer's result does not depend on which layers share its batch, so rank 0's model — and a
`save_converted` checkpoint of it — is bit-identical to a single-process `convert_model` run
with the same intra-op thread count. (The exact-SVD based inits, "svd" and "random", round
differently with another number of LAPACK threads; torchrun starts its workers with
``OMP_NUM_THREADS=1``.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from lowrank_kernels._checks import is_int
from lowrank_kernels.adapters.convert import (
    ConversionReport,
    convert_model,
    find_targets,
    freeze_all_but_adapters,
    replace_module,
)


def shard_layers(layers: Sequence[tuple[str, tuple[int, int]]], world_size: int) -> list[list[str]]:
    """Layer names per rank, ``world_size`` lists, each in the order of ``layers`` ((name,
    [out, in] shape) pairs in model order). Greedy longest-first by ``out · in`` (what the
    passes over W cost) to the least loaded rank, ties to the lower rank: same-shape layers are
    dealt round-robin, so every rank gets a same-shape batch of each shape."""
    owner = balance([out_features * in_features for _, (out_features, in_features) in layers], world_size)
    return [[name for (name, _), o in zip(layers, owner) if o == rank] for rank in range(world_size)]


def balance(costs: Sequence[int], world_size: int) -> list[int]:
    """The rank of each item of ``costs``: greedy, most costly first, to the least loaded rank,
    ties to the lower rank (and, between equal costs, the earlier item first)."""
    if not is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    load = [0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = min(range(world_size), key=lambda r: load[r])
        owner[i] = rank
        load[rank] += costs[i]
    return owner


def convert_model_distributed(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str],
    group=None,
    progress: bool = True,
    freeze_base: bool = True,
    **convert_options,
) -> ConversionReport | None:
    """`convert_model` across the ranks of ``group`` (default: the world). Call it on every rank
    with the same model and arguments (``convert_options``: `convert_model`'s rank, init, scale,
    quantize, quant_iters, blocksize, double_quant, seed, metrics and init options) after
    ``torch.distributed.init_process_group``.

    Each rank converts its `shard_layers` share in place; rank 0 then receives the other ranks'
    layers (on CPU, moved to the device of the layer they replace) and returns the
    `ConversionReport` of all layers (model order; ``seconds`` = rank 0's wall time,
    ``metric_seconds`` = the largest rank's). Other ranks return None and keep a model in which
    only their own shard is converted. Target selection is checked on every rank before any
    communication; if any rank fails, every rank raises (the failing rank its own exception, the
    others a RuntimeError naming it), and rank 0's own shard may be left converted.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "convert_model_distributed needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    start = time.perf_counter()
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    targets = find_targets(model, target_modules)
    shard = shard_layers([(name, tuple(linear.weight.shape)) for name, linear in targets], world_size)[rank]
    devices = {name: linear.weight.device for name, linear in targets}
    try:
        report = None
        if shard:  # exact names: a full-match regex, so no other module can match by suffix
            report = convert_model(
                model,
                target_modules="|".join(map(re.escape, shard)),
                freeze_base=False,
                progress=progress and rank == 0,
                **convert_options,
            )
        outcome: BaseException | None = None
    except Exception as exc:  # reported to every rank below, so that none waits for a gather forever
        outcome = exc
    _raise_if_any_failed(outcome, rank, world_size, group)
    layers = {name: model.get_submodule(name).to("cpu") for name in shard}
    gathered: list | None = [None] * world_size if rank == 0 else None
    dist.gather_object((layers, report), gathered, group=group, group_dst=0)
    if rank != 0:
        return None
    reports = {}
    metric_seconds, options = 0.0, None
    for layers_k, report_k in gathered:
        for name, layer in layers_k.items():
            replace_module(model, name, layer.to(devices[name]))
        if report_k is not None:
            reports.update({layer.name: layer for layer in report_k})
            metric_seconds = max(metric_seconds, report_k.metric_seconds)
            options = report_k.options
    if freeze_base:
        freeze_all_but_adapters(model)
    return ConversionReport(
        [reports[name] for name, _ in targets], options, time.perf_counter() - start, metric_seconds
    )


def _raise_if_any_failed(outcome: BaseException | None, rank: int, world_size: int, group) -> None:
    """Exchanges every rank's failure (type and message, always picklable) and raises on all
    ranks if there was one."""
    status = None if outcome is None else f"{type(outcome).__name__}: {outcome}"
    statuses: list[str | None] = [None] * world_size
    dist.all_gather_object(statuses, status, group=group)
    if outcome is not None:
        raise outcome
    failed = [(k, s) for k, s in enumerate(statuses) if s is not None]
    if failed:
        raise RuntimeError(f"conversion failed on rank {failed[0][0]}: {failed[0][1]}")


def default_backend() -> str:
    """nccl when CUDA is available, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"
