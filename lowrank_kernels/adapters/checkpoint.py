"""Checkpoints of converted models: every `PiSSALinear`'s tensors (dense or NF4 residual, A, B,
bias) in one safetensors file, with each layer's config, a format version and a SHA-256 of the
configs and tensor bytes in the metadata.

Loading checks the format and version, the checksum (so flipped or truncated data bytes are
caught, not only broken headers), the key set and every shape and dtype against the config, and
the config against the model, all before the model is touched; the round trip is bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import torch
from torch import nn

from lowrank_kernels._checks import is_int
from lowrank_kernels.adapters.convert import freeze_all_but_adapters, replace_module
from lowrank_kernels.adapters.pissa_linear import AdapterOptions, PiSSALinear
from lowrank_kernels.nf4 import NF4Weight

FORMAT = "lowrank_kernels.adapters"
FORMAT_VERSION = 1
#: The index of a sharded checkpoint directory.
INDEX_NAME = "adapters.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NF4_KEYS = ("residual_packed", "residual_absmax")
_DOUBLE_QUANT_KEYS = ("residual_offset", "residual_absmax2", "residual_code2")
_CONFIG_KEYS = {
    "in_features",
    "out_features",
    "rank",
    "scale",
    "init",
    "quantize",
    "blocksize",
    "double_quant",
    "dtype",
    "bias",
}


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, corrupted, of another format or version, or that does not
    fit the model it is loaded into."""


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


# ---- save ---------------------------------------------------------------------------------------------


def save_converted(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes every `PiSSALinear` of ``model`` (tensors as in its ``state_dict``, moved to CPU)
    with its config to one safetensors file."""
    from safetensors.torch import save_file

    layers = {name: m for name, m in model.named_modules() if isinstance(m, PiSSALinear)}
    if not layers:
        raise ValueError("model has no PiSSALinear layers: convert it first (convert_model)")
    tensors = {
        _prefix(name) + key: t.detach().to("cpu").contiguous()
        for name, m in layers.items()
        for key, t in m.state_dict().items()
    }
    configs = json.dumps({name: _layer_config(m) for name, m in layers.items()}, sort_keys=True)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layers": configs,
        "sha256": _digest(tensors, configs),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)
    _sort_metadata(os.fspath(path))


def _sort_metadata(path: str) -> None:
    """Rewrites the safetensors header with the metadata keys sorted. safetensors writes its
    metadata map in a random order per process (a Rust HashMap), so the same checkpoint would
    differ byte-wise between runs (and between a single- and a multi-process conversion); after
    this the bytes are a function of the content. Tensor entries and data are left as written
    (data offsets are relative to the end of the header)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header to a multiple of 8 bytes
        if len(text) == size:  # the usual case: same JSON, other key order
            f.seek(8)
            f.write(text)
            return
        with open(f"{path}.tmp", "wb") as out:  # another escaping changed the length: copy the data
            out.write(len(text).to_bytes(8, "little") + text)
            shutil.copyfileobj(f, out)
    os.replace(f"{path}.tmp", path)


def _layer_config(m: PiSSALinear) -> dict[str, Any]:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "rank": m.rank,
        "scale": m.scale,
        "init": m.init,
        "quantize": m.quantize,
        "blocksize": m.blocksize,
        "double_quant": m.double_quant,
        "dtype": str(m.dtype).removeprefix("torch."),
        "bias": m.bias is not None,
    }


def _digest(tensors: dict[str, torch.Tensor], configs: str) -> str:
    """SHA-256 over the layer configs (JSON) and the keys, dtypes, shapes and bytes of all tensors
    in key order: a changed scale is as wrong as a changed code."""
    h = hashlib.sha256(configs.encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ---- load ---------------------------------------------------------------------------------------------


def read_converted(path: str | os.PathLike) -> dict[str, PiSSALinear]:
    """The checked `PiSSALinear` layers of a checkpoint, by module name (on CPU): one file, or a
    directory of shards with ``adapters.safetensors.index.json`` (`streaming.convert_files`),
    each shard checked on its own and the index checked against the shards' tensors."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_sharded(path)
    tensors, metadata = _read(path)
    configs = _configs(metadata)
    if metadata.get("sha256") != _digest(tensors, metadata["layers"]):
        raise CheckpointError(f"{os.fspath(path)!r}: checksum mismatch, the tensor data or layer configs are corrupted")
    _check_keys(tensors, configs)
    return {name: _build_layer(name, config, tensors) for name, config in configs.items()}


def _read_sharded(path: str) -> dict[str, PiSSALinear]:
    from safetensors import safe_open

    index_path = os.path.join(path, INDEX_NAME)
    try:
        with open(index_path) as f:
            index = json.load(f)
        weight_map, metadata = index["weight_map"], index["metadata"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path!r}: cannot read the checkpoint index {INDEX_NAME} ({type(exc).__name__}: {exc})"
        ) from exc
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{index_path!r} is not a lowrank_kernels adapter index of version {FORMAT_VERSION}")
    layers: dict[str, PiSSALinear] = {}
    keys: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard:
            raise CheckpointError(f"{index_path!r}: shard name {shard!r} is not a file name in the directory")
        shard_layers = read_converted(os.path.join(path, shard))
        with safe_open(os.path.join(path, shard), framework="pt") as f:
            keys.update({key: shard for key in f.keys()})
        layers.update(shard_layers)
    if keys != weight_map:
        raise CheckpointError(f"{index_path!r}: the index does not list exactly the shards' tensors")
    return layers


def load_converted(model: nn.Module, path: str | os.PathLike, *, freeze_base: bool = True) -> nn.Module:
    """Loads a `save_converted` checkpoint into ``model``, in place, and returns it.

    Each checkpoint layer's module in ``model`` may be the original ``nn.Linear`` (replaced by the
    checkpoint's `PiSSALinear`: no decomposition needed) or a `PiSSALinear` of the same config
    (its tensors are overwritten in place, so optimizers holding its A and B stay valid).
    freeze_base: as in `convert_model`. Everything is checked before the model is modified.
    """
    layers = read_converted(path)
    targets = {name: _check_target(model, name, layer) for name, layer in layers.items()}
    for name, layer in layers.items():
        target = targets[name]
        if isinstance(target, PiSSALinear):
            target.load_state_dict(layer.state_dict())  # copies into the existing tensors
            target.init = layer.init
        else:
            replace_module(model, name, layer.to(target.weight.device))
    if freeze_base:
        freeze_all_but_adapters(model)
    return model


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read adapter checkpoint {path!r} (truncated or corrupted?): {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path!r} is not a lowrank_kernels adapter checkpoint (format {metadata.get('format')!r})"
        )
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path!r} has adapter checkpoint format version {metadata.get('format_version')!r}; "
            f"this library reads version {FORMAT_VERSION}"
        )
    return tensors, metadata


def _configs(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    try:
        configs = json.loads(metadata.get("layers", ""))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupted layer configs in the checkpoint metadata: {exc}") from exc
    if not isinstance(configs, dict) or not configs:
        raise CheckpointError(f"the checkpoint metadata lists no layers: {configs!r}")
    for name, config in configs.items():
        try:
            _check_config(config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"layer {name!r}: invalid config {config!r} ({exc})") from exc
    return configs


def _check_config(config: Any) -> None:
    if not isinstance(config, dict) or set(config) != _CONFIG_KEYS:
        raise ValueError(f"a layer config has exactly the keys {sorted(_CONFIG_KEYS)}")
    _options(config)  # rank, init, scale, quantize, blocksize, double_quant
    if (
        config["dtype"] not in _DTYPES
        or not isinstance(config["bias"], bool)
        or not all(is_int(config[k]) and config[k] >= 1 for k in ("in_features", "out_features"))
    ):
        raise ValueError("dtype must be one of float32, bfloat16, float16; bias a bool; features ints >= 1")
    if config["quantize"] is None and config["blocksize"] is not None:
        raise ValueError("a dense layer has blocksize None")


def _options(config: dict[str, Any]) -> AdapterOptions:
    blocksize = config["blocksize"] if config["quantize"] else 64  # a dense layer has none (None)
    return AdapterOptions(
        config["rank"], config["init"], config["scale"], config["quantize"], 1, blocksize, config["double_quant"]
    )


def _expected_keys(config: dict[str, Any]) -> list[str]:
    keys = ["A", "B"] + (["bias"] if config["bias"] else [])
    if config["quantize"] is None:
        return keys + ["residual"]
    return keys + list(_NF4_KEYS) + (list(_DOUBLE_QUANT_KEYS) if config["double_quant"] else [])


def _check_keys(tensors: dict[str, torch.Tensor], configs: dict[str, dict[str, Any]]) -> None:
    expected = {_prefix(name) + key for name, config in configs.items() for key in _expected_keys(config)}
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint tensors do not match its layer configs: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


def _build_layer(name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PiSSALinear:
    """The layer from its tensors, each checked against the config (shape and dtype); the NF4
    tensors are checked by `NF4Weight` itself."""
    get = lambda key: tensors[_prefix(name) + key]  # noqa: E731
    dtype, out_f, in_f, rank = _DTYPES[config["dtype"]], config["out_features"], config["in_features"], config["rank"]
    shapes = {"A": (out_f, rank), "B": (rank, in_f), "bias": (out_f,), "residual": (out_f, in_f)}
    for key in _expected_keys(config):
        t = get(key)
        if key in shapes and (tuple(t.shape) != shapes[key] or t.dtype != dtype):
            raise CheckpointError(
                f"layer {name!r}: tensor {key} has shape {tuple(t.shape)} and dtype {t.dtype}, "
                f"its config {config} needs {shapes[key]} {dtype}"
            )
    try:
        if config["quantize"] is None:
            residual = get("residual")
        else:
            fields = {
                key.removeprefix("residual_"): get(key)
                for key in _NF4_KEYS + (_DOUBLE_QUANT_KEYS if config["double_quant"] else ())
            }
            residual = NF4Weight(shape=torch.Size((out_f, in_f)), dtype=dtype, blocksize=config["blocksize"], **fields)
        return PiSSALinear(
            residual,
            get("A"),
            get("B"),
            get("bias") if config["bias"] else None,
            scale=config["scale"],
            init=config["init"],
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"layer {name!r}: {exc}") from exc


def _check_target(model: nn.Module, name: str, layer: PiSSALinear) -> nn.Module:
    """The module ``layer`` goes to: an ``nn.Linear`` of its shape, dtype and bias, or a
    `PiSSALinear` of the same config (the init label aside)."""
    try:
        target = model.get_submodule(name)
    except AttributeError as exc:
        raise CheckpointError(f"the model has no module {name!r} for checkpoint layer {name!r}") from exc
    want = _layer_config(layer)
    if isinstance(target, PiSSALinear):
        have = _layer_config(target)
        differ = {k: (have[k], want[k]) for k in want if k != "init" and have[k] != want[k]}
        if differ:
            raise CheckpointError(
                f"layer {name!r}: the model's PiSSALinear differs from the checkpoint's in "
                + ", ".join(f"{k} (model {a!r}, checkpoint {b!r})" for k, (a, b) in differ.items())
            )
        return target
    if isinstance(target, nn.Linear):
        have = {
            "in_features": target.in_features,
            "out_features": target.out_features,
            "dtype": str(target.weight.dtype).removeprefix("torch."),
            "bias": target.bias is not None,
        }
        differ = {k: (v, want[k]) for k, v in have.items() if v != want[k]}
        if differ:
            raise CheckpointError(
                f"layer {name!r}: the model's nn.Linear does not fit the checkpoint: "
                + ", ".join(f"{k} (model {a!r}, checkpoint {b!r})" for k, (a, b) in differ.items())
            )
        return target
    raise CheckpointError(
        f"layer {name!r}: the model's module is a {type(target).__name__}, not an nn.Linear or PiSSALinear"
    )
