"""convert_model: replace a model's ``nn.Linear`` layers by `PiSSALinear` in place.

Same-shape layers are decomposed as one batch (stacked weights, one batched init / QPiSSA),
each with its own generator seeded from (seed, layer name): a layer's adapter does not depend on
which other layers are converted with it, or in which process. Everything that can be checked
is checked before the model is modified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from lowrank_kernels._checks import is_int
from lowrank_kernels.adapters.pissa_linear import (
    AdapterOptions,
    AdapterSplit,
    PiSSALinear,
    adapter_split,
)
from lowrank_kernels.adapters.qpissa import error_metrics


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One converted layer. ``seconds``: its share of its batch's decomposition time (layers of
    one shape are decomposed together). ``recon_error``: ‖W − (W_res + s A B)‖_F / ‖W‖_F (rounding
    only when dense). ``error_reduction``: the PiSSA paper's quantization error reduction
    (nuclear norm; NF4 only). Metrics are None when not computed (``metrics=False``)."""

    name: str
    shape: tuple[int, int]
    rank: int
    init: str
    quantize: str | None
    seconds: float
    recon_error: float | None = None
    error_reduction: float | None = None


@dataclasses.dataclass
class ConversionReport:
    """What `convert_model` did: one `LayerReport` per converted layer (model order), the
    options, and wall times (decomposition + module building, metrics, total)."""

    layers: list[LayerReport]
    options: AdapterOptions
    seconds: float
    metric_seconds: float

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def __str__(self) -> str:
        headers = ["layer", "shape", "rank", "init", "residual", "recon err", "err reduction", "seconds"]
        rows = [
            [
                layer.name,
                "x".join(map(str, layer.shape)),
                str(layer.rank),
                layer.init,
                layer.quantize or "dense",
                _fmt(layer.recon_error, "{:.2e}"),
                _fmt(layer.error_reduction, "{:.1%}"),
                f"{layer.seconds:.3f}",
            ]
            for layer in self.layers
        ]
        widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [headers, ["-" * w for w in widths], *rows]
        ]
        reductions = [layer.error_reduction for layer in self.layers if layer.error_reduction is not None]
        summary = f"{len(self.layers)} layers converted in {self.seconds:.2f} s (metrics {self.metric_seconds:.2f} s)"
        if reductions:
            summary += f"; mean quantization error reduction {sum(reductions) / len(reductions):.1%}"
        return "\n".join([*lines, summary])


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


# ---- target selection ------------------------------------------------------------------------------


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` submodules to convert, in model order (see `select_targets`)."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name}
    return [(name, linears[name]) for name in select_targets(list(linears), target_modules)]


def select_targets(linears: Sequence[str], target_modules: str | Sequence[str]) -> list[str]:
    """The names of ``linears`` (module names of linear layers, model order) to convert. Like
    PEFT: a string is a regex that must match the whole module name; a list holds names or name
    suffixes ("query" matches "encoder.layer.0.attention.self.query")."""
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {exc}") from exc
        matches = lambda name: pattern.fullmatch(name) is not None  # noqa: E731
    elif isinstance(target_modules, Sequence) and target_modules and all(isinstance(t, str) for t in target_modules):
        suffixes = tuple(target_modules)
        matches = lambda name: any(name == s or name.endswith("." + s) for s in suffixes)  # noqa: E731
    else:
        raise TypeError(
            f"target_modules must be a regex string or a non-empty list of module names / suffixes, "
            f"got {target_modules!r}"
        )
    targets = [name for name in linears if matches(name)]
    if not targets:
        sample = ", ".join(linears[:6]) or "none"
        raise ValueError(
            f"target_modules {target_modules!r} matches no nn.Linear of the model "
            f"({len(linears)} linear layers, e.g. {sample})"
        )
    return targets


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, layer name) by SHA-256: stable across runs, processes
    and Python versions (unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ---- conversion ----------------------------------------------------------------------------------------


def convert_model(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str],
    rank: int,
    init: str = "rsvd",
    scale: float = 1.0,
    quantize: str | None = None,
    quant_iters: int = 1,
    blocksize: int = 64,
    double_quant: bool = False,
    seed: int = 0,
    progress: bool = True,
    metrics: bool = True,
    freeze_base: bool = True,
    **init_options,
) -> ConversionReport:
    """Replaces every ``nn.Linear`` of ``model`` matched by ``target_modules`` with a
    `PiSSALinear` of the given rank, init, scale and residual storage (see
    `PiSSALinear.from_linear`; ``init_options`` go to the init), in place.

    seed:        layer ``name`` gets the generator `layer_generator(seed, name)`.
    progress:    tqdm progress bar over the layers.
    metrics:     compute each layer's reconstruction error and (NF4) quantization error
                 reduction; the nuclear norms of the latter cost about as much as QPiSSA itself.
    freeze_base: set ``requires_grad=False`` on every parameter but the adapters' A and B.

    Options, target names, ranks, dtypes and finiteness of the weights are checked before
    anything is modified (init options by the first batch, before its layers are swapped), so
    bad arguments leave the model untouched. Batches are swapped in as they finish, so that only
    one batch of new tensors is alive next to the old weights; an error inside a later batch's
    decomposition therefore leaves the earlier batches converted. Returns a `ConversionReport`.
    """
    start = time.perf_counter()
    options = AdapterOptions(rank, init, scale, quantize, quant_iters, blocksize, double_quant)
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")
    targets = find_targets(model, target_modules)
    for name, linear in targets:
        options.check_weight(linear.weight, name)
        if not torch.isfinite(linear.weight).all():
            raise ValueError(f"{name}: weight contains NaN or Inf")
    reports: dict[str, LayerReport] = {}
    metric_seconds = 0.0
    with tqdm(total=len(targets), disable=not progress, desc="PiSSA conversion", unit="layer") as bar:
        for group in _same_shape_groups(targets):
            bar.set_postfix_str(f"{len(group)} x {list(group[0][1].weight.shape)}")
            t0 = time.perf_counter()
            weights = torch.stack([linear.weight.detach() for _, linear in group])
            split = adapter_split(weights, options, [layer_generator(seed, name) for name, _ in group], **init_options)
            t1 = time.perf_counter()
            errors = _metrics(weights, split, options) if metrics else [(None, None)] * len(group)
            t2 = time.perf_counter() if metrics else t1
            for i, (name, linear) in enumerate(group):
                replace_module(model, name, _layer(split, i, linear.bias, options))
            seconds = (time.perf_counter() - t2 + t1 - t0) / len(group)
            metric_seconds += t2 - t1
            for (name, linear), (recon, reduction) in zip(group, errors):
                reports[name] = LayerReport(
                    name, tuple(linear.weight.shape), rank, init, quantize, seconds, recon, reduction
                )
            bar.update(len(group))
    if freeze_base:
        freeze_all_but_adapters(model)
    layers = [reports[name] for name, _ in targets]
    return ConversionReport(layers, options, time.perf_counter() - start, metric_seconds)


def _same_shape_groups(targets: list[tuple[str, nn.Linear]]) -> list[list[tuple[str, nn.Linear]]]:
    """Targets grouped by (shape, dtype, device), groups in order of first appearance."""
    groups: dict[tuple, list[tuple[str, nn.Linear]]] = {}
    for name, linear in targets:
        w = linear.weight
        groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append((name, linear))
    return list(groups.values())


def _layer(split: AdapterSplit, i: int, bias: torch.Tensor | None, options: AdapterOptions) -> PiSSALinear:
    """Layer ``i`` of a batched split, with (a copy of) ``bias``. Dense slices are cloned so each
    layer owns its storage (the batch is freed, and safetensors refuses tensors that share memory)."""
    residual = split.residual[i] if isinstance(split.residual, list) else split.residual[i].clone()
    bias = None if bias is None else bias.detach().clone()
    return PiSSALinear(residual, split.A[i].clone(), split.B[i].clone(), bias, scale=options.scale, init=options.init)


def _metrics(weights: torch.Tensor, split: AdapterSplit, options: AdapterOptions) -> list[tuple[float, float | None]]:
    """(reconstruction error, quantization error reduction or None) per layer of a batch."""
    recon, reduction = error_metrics(weights, split.residual, split.A, split.B, options.scale)
    return list(zip(recon.tolist(), [None] * len(recon) if reduction is None else reduction.tolist()))


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts ``module`` at the dotted ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def freeze_all_but_adapters(model: nn.Module) -> None:
    """``requires_grad=False`` on every parameter of ``model`` but the PiSSALinear adapters' A and B."""
    adapters = {id(p) for m in model.modules() if isinstance(m, PiSSALinear) for p in (m.A, m.B)}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)


def merge_model(model: nn.Module) -> nn.Module:
    """Replaces every `PiSSALinear` of ``model`` by its `PiSSALinear.merge` (an ``nn.Linear``), in
    place; returns the model."""
    for name, module in [(n, m) for n, m in model.named_modules() if n and isinstance(m, PiSSALinear)]:
        replace_module(model, name, module.merge())
    return model
