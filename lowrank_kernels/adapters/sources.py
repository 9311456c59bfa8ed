"""Models to convert, read from files (the ``convert`` command; also usable from Python).

Two kinds of source:

* a Hugging Face model directory (``config.json`` + ``*.safetensors``), loaded offline by
  transformers' ``AutoModel``;
* a bare safetensors file: every 2-D floating ``<name>.weight`` tensor (embedding tables aside)
  becomes an ``nn.Linear`` named ``<name>`` — with ``<name>.bias`` when the file has it — in a
  module tree without a model class, so `convert_model`, `save_converted` and `load_converted`
  work on it unchanged and a checkpoint's layer names are the file's tensor names.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SourceError(ValueError):
    """A path that is missing, of an unknown kind, or whose model cannot be read."""


def load_model(path: str | os.PathLike) -> nn.Module:
    """The model stored at ``path``: a Hugging Face model directory or a bare safetensors file
    (see the module docstring). Raises `SourceError` naming the path and the cause."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SourceError(f"source {path!r} does not exist")
    if os.path.isdir(path):
        return _load_transformers(path)
    return linear_modules(_load_safetensors(path))


def _load_transformers(path: str) -> nn.Module:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SourceError(f"source {path!r} is a directory without config.json: pass a Hugging Face model "
                          f"directory or a .safetensors file")
    try:
        import transformers
    except ImportError as exc:
        raise SourceError(f"loading the model directory {path!r} needs transformers (pip install transformers)") from exc
    try:
        return transformers.AutoModel.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, SafetensorError, ...)
        raise SourceError(f"cannot load a transformers model from {path!r}: {type(exc).__name__}: {exc}") from exc


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SourceError(f"cannot read safetensors file {path!r} (corrupted, truncated or not safetensors?): "
                          f"{exc}") from exc


def linear_modules(tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A module tree holding one ``nn.Linear`` per 2-D fp32/bf16/fp16 ``<name>.weight [out, in]``
    of ``tensors`` (names containing "embed" are skipped: embedding tables are not linears), at
    the dotted path ``<name>``, with bias ``<name>.bias [out]`` when present. The linears use
    the tensors themselves (no copy), as frozen parameters."""
    root = nn.Module()
    for key, weight in tensors.items():
        name = key.removesuffix(".weight")
        if name == key or not name or weight.dim() != 2 or weight.dtype not in _FLOAT_DTYPES or "embed" in name.lower():
            continue
        bias = tensors.get(f"{name}.bias")
        bias = bias if bias is not None and tuple(bias.shape) == (weight.shape[0],) and bias.dtype == weight.dtype else None
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
