"""save_converted / load_converted: bit-exact round trips into original and converted models,
and refusal (with the model untouched) of truncated, corrupted, foreign, other-version and
mismatched files."""

from __future__ import annotations

import json
import re

import pytest
import torch
from adapter_models import LINEARS, Toy, snapshot, unchanged
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_kernels import quantize_nf4, save_nf4
from lowrank_kernels.adapters import (
    CheckpointError,
    PiSSALinear,
    convert_model,
    load_converted,
    read_converted,
    save_converted,
)
from lowrank_kernels.adapters.checkpoint import _digest

TARGETS = ["up", "down", "head"]
OPTIONS = {"dense": {}, "nf4": dict(quantize="nf4", quant_iters=2), "nf4-dq": dict(quantize="nf4", double_quant=True)}


def converted(seed=0, rank=4, **options) -> Toy:
    model = Toy(seed)
    convert_model(
        model, target_modules=TARGETS, rank=rank, scale=0.5, init="rsvd", seed=seed, progress=False, **options
    )
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{residual kind: (converted model, checkpoint path)}."""
    out = {}
    for kind, options in OPTIONS.items():
        path = tmp_path_factory.mktemp(kind) / "adapters.safetensors"
        model = converted(**options)
        save_converted(model, path)
        out[kind] = (model, path)
    return out


def assert_layers_bit_identical(model: nn.Module, reference: nn.Module) -> None:
    for name in LINEARS:
        got, want = model.get_submodule(name), reference.get_submodule(name)
        assert isinstance(got, PiSSALinear)
        assert (got.rank, got.scale, got.init, got.quantize, got.blocksize, got.double_quant) == (
            want.rank,
            want.scale,
            want.init,
            want.quantize,
            want.blocksize,
            want.double_quant,
        )
        got_state, want_state = got.state_dict(), want.state_dict()
        assert got_state.keys() == want_state.keys()
        for key, tensor in want_state.items():
            assert torch.equal(got_state[key], tensor) and got_state[key].dtype == tensor.dtype, (name, key)


# ---- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(OPTIONS))
def test_round_trip_into_the_original_model_is_bit_exact(kind, saved):
    model, path = saved[kind]
    fresh = Toy(seed=9)  # unconverted, other weights: the checkpoint supplies every converted tensor
    assert load_converted(fresh, path) is fresh
    assert_layers_bit_identical(fresh, model)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    for name in LINEARS:
        h = torch.randn(3, fresh.get_submodule(name).in_features, generator=torch.Generator().manual_seed(1))
        assert torch.equal(fresh.get_submodule(name)(h), model.get_submodule(name)(h))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {f"{n}.{p}" for n in LINEARS for p in "AB"}
    assert fresh(x).shape == (3, 10)


@pytest.mark.parametrize("kind", sorted(OPTIONS))
def test_loading_into_a_converted_model_overwrites_in_place(kind, saved):
    model, path = saved[kind]
    target = converted(seed=5, **OPTIONS[kind])
    A_before = target.blocks[1].up.A
    load_converted(target, path)
    assert target.blocks[1].up.A is A_before  # an optimizer holding it stays valid
    assert_layers_bit_identical(target, model)


def test_checkpoint_holds_the_tensors_config_and_version(saved):
    model, path = saved["nf4-dq"]
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "lowrank_kernels.adapters" and metadata["format_version"] == "1"
    config = json.loads(metadata["layers"])["blocks.0.up"]
    assert config == {
        "in_features": 32,
        "out_features": 48,
        "rank": 4,
        "scale": 0.5,
        "init": "rsvd",
        "quantize": "nf4",
        "blocksize": 64,
        "double_quant": True,
        "dtype": "float32",
        "bias": True,
    }
    tensors = load_file(str(path))
    assert tensors["blocks.0.up.residual_packed"].dtype == torch.uint8 and "blocks.0.down.bias" not in tensors
    assert set(read_converted(path)) == set(LINEARS)


def test_a_model_without_adapters_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="no PiSSALinear layers"):
        save_converted(Toy(), tmp_path / "x.safetensors")


# ---- refusal --------------------------------------------------------------------------------------------


def refuses(path, message, target=None) -> None:
    """load_converted raises CheckpointError matching ``message`` and leaves ``target`` untouched."""
    target = Toy(seed=3) if target is None else target
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=message):
        load_converted(target, path)
    assert unchanged(target, before)


def header_length(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("keep", [0, 7, 100, "header", "half", -1])
def test_truncated_files_are_refused(keep, saved, tmp_path):
    data = saved["nf4"][1].read_bytes()
    size = {"header": header_length(data), "half": len(data) // 2, -1: len(data) - 1}.get(keep, keep)
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[:size])
    refuses(path, "cannot read adapter checkpoint")


# Every header byte is the slow tier; the fast tier flips every 13th (13 is prime to the lengths
# of the header's JSON fields, so the sample lands on every part of it) and the last.
@pytest.mark.parametrize("stride", [13, pytest.param(1, marks=pytest.mark.slow)], ids=["every-13th", "every"])
def test_every_flipped_header_byte_is_refused(saved, tmp_path, stride):
    data = saved["nf4"][1].read_bytes()
    path = tmp_path / "flipped.safetensors"
    target = Toy(seed=3)
    before = snapshot(target)
    length = header_length(data)
    for offset in sorted({*range(0, length, stride), length - 1}):
        flipped = bytearray(data)
        flipped[offset] ^= 0x04
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError):  # unreadable, foreign, bad config, checksum or keys
            load_converted(target, path)
    assert unchanged(target, before)


@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_a_flipped_data_byte_fails_the_checksum(where, saved, tmp_path):
    data = saved["dense"][1].read_bytes()
    start = header_length(data)
    flipped = bytearray(data)
    flipped[start + int(where * (len(data) - start - 1))] ^= 0x01
    path = tmp_path / "flipped.safetensors"
    path.write_bytes(bytes(flipped))
    refuses(path, "checksum mismatch, the tensor data or layer configs are corrupted")


def rewrite(source, path, *, tensors=None, checksum=False, **metadata_changes) -> None:
    """A copy of a checkpoint with replaced tensors / metadata entries; checksum=True recomputes
    the checksum (a writer that is consistent but wrong), else the old one stays."""
    with safe_open(str(source), framework="pt") as f:
        metadata = {**f.metadata(), **metadata_changes}
    tensors = load_file(str(source)) if tensors is None else tensors
    if checksum:
        metadata["sha256"] = _digest(tensors, metadata["layers"])
    save_file(tensors, str(path), metadata=metadata)


def test_foreign_and_other_version_files_are_refused(saved, tmp_path):
    source = saved["nf4"][1]
    save_nf4(tmp_path / "nf4.safetensors", {"w": quantize_nf4(torch.randn(8, 64))})
    refuses(tmp_path / "nf4.safetensors", "not a lowrank_kernels adapter checkpoint")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    refuses(tmp_path / "plain.safetensors", r"not a lowrank_kernels adapter checkpoint \(format None\)")
    rewrite(source, tmp_path / "v2.safetensors", format_version="2")
    refuses(tmp_path / "v2.safetensors", "format version '2'; this library reads version 1")
    rewrite(source, tmp_path / "json.safetensors", layers="{not json")
    refuses(tmp_path / "json.safetensors", "corrupted layer configs")


def test_tensors_that_do_not_fit_their_config_are_refused(saved, tmp_path):
    source = saved["dense"][1]
    configs = json.loads(load_metadata(source)["layers"])
    configs["head"]["scale"] = 2.0  # a config change alone fails the checksum
    rewrite(source, tmp_path / "scale.safetensors", layers=json.dumps(configs))
    refuses(tmp_path / "scale.safetensors", "checksum mismatch")
    configs["head"].update(scale=0.5, rank=3)  # the tensors have rank 4
    rewrite(source, tmp_path / "rank.safetensors", layers=json.dumps(configs), checksum=True)
    refuses(tmp_path / "rank.safetensors", r"layer 'head': tensor A has shape \(10, 4\).*needs \(10, 3\)")
    configs["head"].update(rank=4, quantize="nf4", blocksize=64)
    rewrite(source, tmp_path / "kind.safetensors", layers=json.dumps(configs), checksum=True)
    refuses(
        tmp_path / "kind.safetensors",
        r"missing \['head.residual_absmax', 'head.residual_packed'\], unexpected \['head.residual'\]",
    )
    configs["head"].update(quantize=None, blocksize=None, bias="yes")
    rewrite(source, tmp_path / "bias.safetensors", layers=json.dumps(configs), checksum=True)
    refuses(tmp_path / "bias.safetensors", "layer 'head': invalid config")
    tensors = load_file(str(source))
    tensors["head.A"] = tensors["head.A"].double()
    rewrite(source, tmp_path / "dtype.safetensors", tensors=tensors, checksum=True)
    refuses(tmp_path / "dtype.safetensors", r"tensor A has shape \(10, 4\) and dtype torch.float64")


def load_metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_checkpoints_that_do_not_fit_the_model_are_refused(saved):
    path = saved["nf4"][1]
    refuses(
        path,
        r"layer 'blocks.0.down': .*differs from the checkpoint's in rank \(model 8, checkpoint 4\)",
        target=converted(rank=8, quantize="nf4"),
    )
    refuses(path, r"quantize \(model None, checkpoint 'nf4'\)", target=converted())
    wide = Toy()
    wide.head = nn.Linear(32, 12)
    refuses(
        path,
        r"layer 'head': the model's nn.Linear does not fit the checkpoint: out_features \(model 12, checkpoint 10\)",
        target=wide,
    )
    missing = Toy()
    del missing.head
    refuses(path, "the model has no module 'head'", target=missing)
    half = Toy().to(torch.bfloat16)
    refuses(path, re.escape("dtype (model 'bfloat16', checkpoint 'float32')"), target=half)
