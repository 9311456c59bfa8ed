"""Streaming conversion of models on disk (`convert_files`): the PEFT output loads in vanilla
transformers + PEFT and reproduces the original logits; the lowrank output equals in-memory
conversion bit for bit, with the real module names; sources that do not cover their
architecture are refused by key; outputs are never written over the source or an existing
output, and an interrupted run resumes to the bytes of an uninterrupted one."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from adapter_models import same_bits, tiny_llama

from lowrank_kernels.adapters import (
    PiSSALinear,
    convert_model,
    load_converted,
    read_converted,
    save_converted,
    streaming,
)
from lowrank_kernels.adapters.sources import SourceError, open_source
from lowrank_kernels.adapters.streaming import OutputError, convert_files

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 33, 2, 17, 40, 8]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("llama") / "src"
    return path, tiny_llama(path, layers=3)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_source_is_read_lazily_with_its_real_module_names(llama):
    path, _ = llama
    source = open_source(path)
    assert len(source.files()) > 1 and (path / "model.safetensors.index.json").is_file()
    assert source.causal_lm and source.output_embedding == "lm_head"
    assert "model.layers.0.self_attn.q_proj" in source.linears and "lm_head" in source.linears
    assert source.linears["model.layers.2.mlp.down_proj"] == (32, 48)


def test_peft_output_loads_in_transformers_and_peft_and_reproduces_the_logits(llama, tmp_path):
    path, original = llama
    out = tmp_path / "out"
    report = convert_files(path, out, fmt="peft", rank=4, seed=1, max_shard_size=40_000)
    assert len(report) == 21  # 7 linears x 3 layers, lm_head excluded
    assert len(json.loads((out / "residual" / "model.safetensors.index.json").read_text())["weight_map"]) == len(
        original.state_dict()
    )
    assert not (out / ".resume").exists()
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "residual", local_files_only=True)
    model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and len(config["target_modules"]) == 21
    with torch.no_grad():
        want, got = original(IDS).logits, model(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    q = model.base_model.model.model.layers[1].self_attn.q_proj  # the adapter is the principal part
    W = original.model.layers[1].self_attn.q_proj.weight.double()
    AB = q.lora_B["default"].weight.double() @ q.lora_A["default"].weight.double()
    torch.testing.assert_close(torch.linalg.svdvals(AB)[:4], torch.linalg.svdvals(W)[:4], rtol=1e-3, atol=0)


def test_peft_nf4_output_loads_as_a_bitsandbytes_4bit_model_computing_our_qpissa_layers(tmp_path):
    """bitsandbytes' CPU 4-bit path needs in_features divisible by the block size: hidden 64."""
    pytest.importorskip("bitsandbytes")
    original = tiny_llama(tmp_path / "src", layers=1, hidden=64, intermediate=128, dtype=torch.bfloat16)
    options = dict(rank=4, quantize="nf4", seed=4, target_modules=["q_proj", "v_proj", "down_proj"])
    convert_files(tmp_path / "src", tmp_path / "peft", fmt="peft", **options)
    convert_files(tmp_path / "src", tmp_path / "ours.safetensors", **options)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "residual", device_map="cpu")
    import bitsandbytes as bnb

    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(base.model.layers[0].self_attn.k_proj, bnb.nn.Linear4bit)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "peft" / "adapter").eval()
    ours = load_converted(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src"), tmp_path / "ours.safetensors"
    ).eval()
    with torch.no_grad():
        got, want, exact = model(IDS).logits.float(), ours(IDS).logits.float(), original(IDS).logits.float()
        with model.disable_adapter():
            residual_only = model(IDS).logits.float()
    assert (residual_only - want).abs().max() > 0.1 * want.abs().max()  # the adapter matters
    # the same QPiSSA layers, computed by bitsandbytes + PEFT vs our fused kernels (bf16 rounding)
    torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item())
    assert (got - exact).abs().max() < 0.1 * exact.abs().max()  # ≈ the original at init


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_lowrank_output_equals_in_memory_conversion_bit_for_bit(llama, tmp_path, quantize):
    path, original = llama
    out = tmp_path / "out"
    options = dict(rank=4, quantize=quantize, quant_iters=2, seed=3)
    convert_files(path, out, max_shard_size=8_000, batch_elements=3000, **options)  # small batches
    assert len(list(out.glob("adapters-*-of-*.safetensors"))) > 2
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    convert_model(
        model,
        target_modules=[n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"],
        progress=False,
        metrics=False,
        **options,
    )
    layers = read_converted(out)
    assert sorted(layers) == sorted(n for n, m in model.named_modules() if isinstance(m, PiSSALinear))
    for name, layer in layers.items():
        want = model.get_submodule(name).state_dict()
        assert all(same_bits(t, want[k]) for k, t in layer.state_dict().items()), name
    loaded = load_converted(transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True), out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, PiSSALinear)
    one_file = tmp_path / "one.safetensors"  # the one-file output is save_converted's file
    convert_files(path, one_file, **options)
    save_converted(model, tmp_path / "ref.safetensors")
    assert one_file.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_non_target_tensors_keep_their_dtype_and_bytes(tmp_path):
    original = tiny_llama(tmp_path / "src", dtype=torch.bfloat16, layers=1)
    convert_files(tmp_path / "src", tmp_path / "out", fmt="peft", rank=2, target_modules=["q_proj"])
    from safetensors.torch import load_file

    residual = {}
    for f in (tmp_path / "out" / "residual").glob("*.safetensors"):
        residual.update(load_file(f))
    for key, tensor in original.state_dict().items():
        assert residual[key].dtype == torch.bfloat16, key
        if "q_proj" not in key:
            assert same_bits(residual[key], tensor), key


def test_weights_that_do_not_cover_the_architecture_are_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_llama(tmp_path / "src", layers=1, max_shard_size="10MB")
    file = tmp_path / "src" / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(2, 2)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(
        SourceError,
        match=r"missing 1: model\.layers\.0\.mlp\.up_proj\.weight; "
        r"unexpected 1: model\.layers\.0\.extra\.weight",
    ):
        open_source(tmp_path / "src")


def test_outputs_over_the_source_or_an_existing_output_are_refused(llama, tmp_path):
    path, _ = llama
    before = tree(path)
    for output in (path, path / "out", path / "model.safetensors"):
        with pytest.raises(OutputError, match="source"):
            convert_files(path, output, rank=2)
    out = tmp_path / "out"
    convert_files(path, out, rank=2, target_modules=["q_proj"])
    with pytest.raises(OutputError, match="--overwrite"):
        convert_files(path, out, rank=2, target_modules=["q_proj"])
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="does not write"):  # --overwrite removes only what we write
        convert_files(path, tmp_path, rank=2, overwrite=True)
    assert tree(path) == before and (tmp_path / "mine.txt").read_text() == "keep"


class Killed(BaseException):
    """Stands for a signal: not an Exception, like KeyboardInterrupt."""


def test_an_interrupted_run_resumes_to_the_bytes_of_an_uninterrupted_one(llama, tmp_path, monkeypatch):
    path, _ = llama
    options = dict(fmt="peft", rank=4, seed=2, max_shard_size=30_000)
    convert_files(path, tmp_path / "full", **options)
    real = streaming._convert_shard
    calls, killed = [], []

    def failing(job, shard, *args):
        calls.append(shard.number)
        if shard.number == 3 and not killed:  # the first run dies in shard 3
            killed.append(shard.number)
            raise Killed
        return real(job, shard, *args)

    monkeypatch.setattr(streaming, "_convert_shard", failing)
    with pytest.raises(Killed):
        convert_files(path, tmp_path / "part", **options)
    files = [p.name for p in (tmp_path / "part").rglob("*") if p.is_file()]
    assert not any(".tmp" in name or ".link" in name for name in files), files  # no temporary files left
    with pytest.raises(OutputError, match="--resume"):
        convert_files(path, tmp_path / "part", **options)
    records = sorted((tmp_path / "part" / ".resume").glob("shard-*.json"))
    assert [r.name[:11] for r in records] == ["shard-00001", "shard-00002"]
    residual2 = next(rel for rel in json.loads(records[1].read_text())["files"] if rel.startswith("residual/"))
    shard2 = tmp_path / "part" / residual2
    data = bytearray(shard2.read_bytes())
    data[-1] ^= 1  # a corrupted finished shard is converted again
    shard2.write_bytes(bytes(data))
    calls.clear()
    convert_files(path, tmp_path / "part", resume=True, **options)
    assert 1 not in calls and 2 in calls and 3 in calls and not records[0].exists()
    assert tree(tmp_path / "part") == tree(tmp_path / "full")


def test_too_little_space_or_a_file_size_limit_is_refused_before_any_work(llama, tmp_path, monkeypatch):
    import collections
    import resource

    path, _ = llama
    monkeypatch.setattr(
        streaming.shutil,
        "disk_usage",
        lambda d: collections.namedtuple("u", "total used free")(10**6, 10**6 - 1000, 1000),
    )
    with pytest.raises(OutputError, match="needs about .* GB free"):
        convert_files(path, tmp_path / "out", rank=2)
    monkeypatch.undo()
    real = resource.getrlimit
    monkeypatch.setattr(
        streaming.resource,
        "getrlimit",
        lambda what: (1000, resource.RLIM_INFINITY) if what == resource.RLIMIT_FSIZE else real(what),
    )
    with pytest.raises(OutputError, match=r"file size limit \(ulimit -f\) is 1000 bytes"):
        convert_files(path, tmp_path / "out", rank=2)
    assert not any((tmp_path / "out").rglob("*.safetensors"))


KILLED_IN_SECOND_COMMIT = """
import os, signal, sys
from lowrank_kernels.adapters import shards, streaming
commit = shards.ShardWriter.commit
count = []
def dying(self, metadata):
    count.append(1)
    if len(count) == 2:  # the second shard's data is on disk, its file half-written
        real_read = self._read
        def read(start, end):
            yield from real_read(start, end)
            os.kill(os.getpid(), signal.SIGKILL)
        self._read = read
    return commit(self, metadata)
shards.ShardWriter.commit = dying
streaming.convert_files(sys.argv[1], sys.argv[2], rank=2, max_shard_size=8000)
"""


@pytest.mark.slow  # a SIGKILLed subprocess; the resume logic is in the fast tier (interrupted run above)
def test_a_killed_run_leaves_no_temporary_file_and_resumes(llama, tmp_path):
    import subprocess
    import sys

    path, _ = llama
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", KILLED_IN_SECOND_COMMIT, str(path), str(tmp_path / "out")],
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-2000:]
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    # the first shard and its record; of the second nothing (its files were unnamed)
    assert len(names) == 2 and names[0].startswith(".resume/shard-00001-") and names[1].startswith("adapters-00001-"), (
        names
    )
    convert_files(path, tmp_path / "out", rank=2, max_shard_size=8000, resume=True)
    convert_files(path, tmp_path / "full", rank=2, max_shard_size=8000)
    assert tree(tmp_path / "out") == tree(tmp_path / "full")


def test_files_honour_the_umask(llama, tmp_path):
    path, _ = llama
    old = os.umask(0o027)
    try:
        convert_files(path, tmp_path / "out", rank=2, target_modules=["q_proj"])
    finally:
        os.umask(old)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert modes == {0o640}, modes
