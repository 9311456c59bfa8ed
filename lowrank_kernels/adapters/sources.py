"""Models to convert, read from files (the ``convert`` command; also usable from Python).

Two kinds of source:

* a Hugging Face model directory (``config.json`` + ``*.safetensors``), loaded offline as the
  class ``config.json`` names (``architectures[0]``; a causal LM keeps its ``lm_head`` and its
  module names), after checking that the weights cover the architecture;
* a bare safetensors file: every 2-D floating ``<name>.weight`` tensor (embedding tables aside)
  becomes an ``nn.Linear`` named ``<name>`` — with ``<name>.bias`` when the file has it — in a
  module tree without a model class, so `convert_model`, `save_converted` and `load_converted`
  work on it unchanged and a checkpoint's layer names are the file's tensor names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lowrank_kernels._checks import FLOAT_DTYPES


class SourceError(ValueError):
    """A path that is missing, of an unknown kind, or whose model cannot be read."""


def load_model(path: str | os.PathLike) -> nn.Module:
    """The model stored at ``path``, in memory: a Hugging Face model directory or a bare
    safetensors file (see the module docstring). Raises `SourceError` naming the path and the
    cause. (`open_source` reads the same sources lazily, for streaming conversion.)"""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SourceError(f"source {path!r} does not exist")
    if os.path.isdir(path):
        return _load_transformers(path)
    return linear_modules(_load_safetensors(path))


def _load_transformers(path: str) -> nn.Module:
    """The model of ``config.json``'s architecture (``architectures[0]``, else AutoModel) with
    its weights, after `open_source` checked that they cover it."""
    open_source(path)
    model_class = type(_skeleton(path))
    try:
        return model_class.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, SafetensorError, ...)
        raise SourceError(f"cannot load a transformers model from {path!r}: {type(exc).__name__}: {exc}") from exc


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SourceError(
            f"cannot read safetensors file {path!r} (corrupted, truncated or not safetensors?): {exc}"
        ) from exc


def linear_modules(tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A module tree holding one ``nn.Linear`` per 2-D fp32/bf16/fp16 ``<name>.weight [out, in]``
    of ``tensors`` (names containing "embed" are skipped: embedding tables are not linears), at
    the dotted path ``<name>``, with bias ``<name>.bias [out]`` when present. The linears use
    the tensors themselves (no copy), as frozen parameters."""
    root = nn.Module()
    for key, weight in tensors.items():
        name = key.removesuffix(".weight")
        if name == key or not name or weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES or "embed" in name.lower():
            continue
        bias = tensors.get(f"{name}.bias")
        bias = (
            bias
            if bias is not None and tuple(bias.shape) == (weight.shape[0],) and bias.dtype == weight.dtype
            else None
        )
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias, requires_grad=False)
        _put(root, name, linear)
    return root


def _put(root: nn.Module, name: str, module: nn.Module) -> None:
    """Adds ``module`` at the dotted ``name``, creating empty parent modules on the way."""
    *parents, leaf = name.split(".")
    if not all(name.split(".")):
        raise SourceError(f"tensor name {name + '.weight'!r} has an empty component")
    parent = root
    for part in parents:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        elif isinstance(child, nn.Linear):  # "a.weight" and "a.b.weight"
            raise SourceError(f"tensor names clash: {part!r} in {name!r} is both a layer and a parent of layers")
        parent = child
    if leaf in parent._modules:
        raise SourceError(f"tensor names clash: {name!r} is both a layer and a parent of layers")
    parent.add_module(leaf, module)


def default_target_modules(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` of ``model`` except its output embedding (``lm_head``, often
    tied to the input embedding), like PEFT's "all-linear"."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [name for name, m in model.named_modules() if name and isinstance(m, nn.Linear) and m is not output]
    if not names:
        raise SourceError("the model has no linear layers to convert")
    return names


# ---- lazy sources: tensors read from disk on demand (streaming conversion) ---------------------------

#: safetensors dtype names -> torch dtypes (those a model's tensors use).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_NAME = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor lives: its safetensors file, dtype and shape."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass
class LazySource:
    """A model on disk whose tensors are read only when asked for (`read`).

    tensors:   every source tensor, by key, in the order of the model (keys of a Hugging Face
               directory follow the architecture's parameter order, a bare file's its key order).
    linears:   module name -> ``[out, in]`` of every ``nn.Linear`` (weight key ``<name>.weight``,
               bias ``<name>.bias`` when ``has_bias``), in model order.
    config_dir: the Hugging Face directory (config and tokenizer files), None for a bare file.
    output_embedding: the module name of the output embedding (``lm_head``), if any.
    causal_lm: whether the architecture is a causal language model (PEFT's task type).
    """

    path: str
    tensors: dict[str, TensorInfo]
    linears: dict[str, tuple[int, int]]
    config_dir: str | None = None
    output_embedding: str | None = None
    causal_lm: bool = False

    def has_bias(self, name: str) -> bool:
        return f"{name}.bias" in self.tensors

    def files(self) -> list[str]:
        return sorted({info.file for info in self.tensors.values()})

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` in their stored dtype, each file opened (memory-mapped) only for
        the keys it holds and closed again, so that nothing but the returned tensors stays resident."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        out: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            try:
                with safe_open(file, framework="pt") as f:
                    out.update({key: f.get_tensor(key) for key in file_keys})
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise SourceError(
                    f"cannot read {file_keys[0]!r} from {file!r} (truncated or corrupted?): {exc}"
                ) from exc
        return {key: out[key] for key in keys}


def open_source(path: str | os.PathLike) -> LazySource:
    """The `LazySource` at ``path``: a Hugging Face model directory (config.json + safetensors
    shards, with ``model.safetensors.index.json`` when sharded) or a bare safetensors file. Only
    the headers are read. A directory's weights must cover its architecture exactly (every
    parameter present with its shape, no unknown key): otherwise `SourceError` names the keys."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SourceError(f"source {path!r} does not exist")
    if not os.path.isdir(path):
        tensors = _headers([path])
        linears = {
            key.removesuffix(".weight"): (info.shape[0], info.shape[1])
            for key, info in tensors.items()
            if _is_linear_weight(key, info.shape, info.dtype)
        }
        return LazySource(path, tensors, linears)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SourceError(
            f"source {path!r} is a directory without config.json: pass a Hugging Face model "
            f"directory or a .safetensors file"
        )
    tensors = _headers(_weight_files(path))
    skeleton = _skeleton(path)
    expected = _check_coverage(path, skeleton, tensors)
    order = {key: i for i, key in enumerate(expected)}
    tensors = dict(sorted(tensors.items(), key=lambda item: order.get(item[0], len(order))))
    output = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    linears, output_name = {}, None
    for name, module in skeleton.named_modules():
        if isinstance(module, nn.Linear) and name and f"{name}.weight" in tensors:
            linears[name] = (module.out_features, module.in_features)
            output_name = name if module is output else output_name
    causal = type(skeleton).__name__.endswith("ForCausalLM")
    return LazySource(path, tensors, linears, path, output_name, causal)


def _is_linear_weight(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    name = key.removesuffix(".weight")
    return name != key and bool(name) and len(shape) == 2 and dtype in FLOAT_DTYPES and "embed" not in name.lower()


def _weight_files(path: str) -> list[str]:
    """The safetensors files of a model directory: those of its index, else every *.safetensors."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"cannot read the shard index {index!r}: {type(exc).__name__}: {exc}") from exc
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".safetensors"))
    if not files:
        raise SourceError(
            f"source {path!r} has no *.safetensors weights (other formats, e.g. pytorch_model.bin, "
            f"are not read: convert them with save_pretrained(safe_serialization=True))"
        )
    return files


def _headers(files: Sequence[str]) -> dict[str, TensorInfo]:
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise SourceError(f"{file!r}: tensor {key!r} has dtype {piece.get_dtype()}, which is not read")
                    if key in tensors:
                        raise SourceError(f"tensor {key!r} is in both {tensors[key].file!r} and {file!r}")
                    tensors[key] = TensorInfo(file, dtype, tuple(piece.get_shape()))
        except (SafetensorError, OSError) as exc:
            raise SourceError(
                f"cannot read safetensors file {file!r} (corrupted, truncated or not safetensors?): {exc}"
            ) from exc
    return tensors


def _skeleton(path: str) -> nn.Module:
    """The architecture of ``config.json`` (its ``architectures[0]`` class, else AutoModel) on
    the meta device: names, shapes and tied weights, no memory."""
    try:
        import transformers
    except ImportError as exc:
        raise SourceError(
            f"reading the model directory {path!r} needs transformers (pip install transformers)"
        ) from exc
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        with torch.device("meta"):
            return cls._from_config(config) if cls else transformers.AutoModel.from_config(config)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError, ...)
        raise SourceError(
            f"cannot build the architecture of {path!r}/config.json: {type(exc).__name__}: {exc}"
        ) from exc


def _check_coverage(path: str, skeleton: nn.Module, tensors: Mapping[str, TensorInfo]) -> list[str]:
    """The architecture's parameter and buffer names in model order, after checking that the
    files hold every parameter (one name of a tied group suffices) with the architecture's shape
    and nothing the architecture does not know."""
    params = list(skeleton.named_parameters(remove_duplicate=False))
    buffers = dict(skeleton.named_buffers(remove_duplicate=False))
    known = {name: tuple(p.shape) for name, p in params} | {name: tuple(b.shape) for name, b in buffers.items()}
    groups: dict[int, list[str]] = {}
    for name, p in params:
        groups.setdefault(id(p), []).append(name)
    tied = (
        getattr(skeleton, "_tied_weights_keys", None)
        if getattr(skeleton.config, "tie_word_embeddings", False)
        else None
    )
    tied = tied if isinstance(tied, dict) else {}
    missing = [names[0] for names in groups.values() if not any(n in tensors or tied.get(n) in tensors for n in names)]
    unexpected = [key for key in tensors if key not in known]
    shapes = [
        f"{key} {list(tensors[key].shape)} (architecture {list(known[key])})"
        for key in tensors
        if key in known and tensors[key].shape != known[key]
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{label} {len(keys)}: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
            if keys
        ]
        raise SourceError(
            f"the weights of {path!r} do not fit its config.json ({type(skeleton).__name__}): " + "; ".join(parts)
        )
    return list(known)
