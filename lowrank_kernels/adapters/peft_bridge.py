"""PEFT bridge: our PiSSA-family inits, the fused training forward and PiSSA -> LoRA conversion for
models built with Hugging Face PEFT (``peft.get_peft_model(model, LoraConfig(...))``).

Notation (ARCHITECTURE.md, notation): our split is ``W [out, in] = W_res + A B`` with ``A [out, r]`` ("up") and
``B [r, in]`` ("down"). PEFT names them the other way round and scales the adapter by
``s = layer.scaling[adapter]`` (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA):

    y = x W_resᵀ + s · (x lora_A.weightᵀ) lora_B.weightᵀ + bias
    lora_A.weight [r, in] = B / √s,   lora_B.weight [out, r] = A / √s,   base weight = W_res

so that ``s · lora_B.weight @ lora_A.weight = A B``, exactly as PEFT's own ``pissa_init`` divides the
singular values by ``s``. peft is an optional dependency (``pip install lowrank_kernels[peft]``),
imported on first use.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowrank_kernels._checks import FLOAT_DTYPES, describe
from lowrank_kernels.adapters.convert import layer_generator
from lowrank_kernels.adapters.inits import check_init, init_factors
from lowrank_kernels.fused_linear import fused_pissa_linear


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "the PEFT bridge needs the optional dependency peft: pip install 'lowrank_kernels[peft]'"
        ) from error
    return peft


def _check_peft_model(peft_model: Any) -> None:
    if not isinstance(peft_model, _peft().PeftModel):
        raise TypeError(
            "peft_model must be a peft.PeftModel with LoRA adapters "
            f"(peft.get_peft_model(model, LoraConfig(...))), got {type(peft_model).__name__}"
        )


def _lora_config(peft_model: Any, adapter_name: str):
    """The LoraConfig of ``adapter_name``; TypeError / ValueError if the model is not a PEFT LoRA model
    or has no such adapter."""
    _check_peft_model(peft_model)
    if adapter_name not in peft_model.peft_config:
        raise ValueError(
            f"adapter_name {adapter_name!r} is not an adapter of this model; "
            f"its adapters are {sorted(peft_model.peft_config)}"
        )
    config = peft_model.peft_config[adapter_name]
    if config.peft_type != _peft().PeftType.LORA:
        raise TypeError(f"adapter {adapter_name!r} is a {config.peft_type.value} adapter, not LoRA")
    return config


def _lora_layers(peft_model: Any, adapter_name: str | None = None) -> dict[str, Any]:
    """Every LoRA layer of the model (name -> layer), or only those carrying ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and (adapter_name is None or adapter_name in module.r)
    }


# ---- init_peft_adapters ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerInit:
    """What `init_peft_adapters` did to one layer.

    shape:   ``(out, in)`` of the layer's weight (nn.Linear convention, also for Conv1D layers).
    approx_error: ‖W − A B‖_F / ‖W‖_F, the part of W the rank-``rank`` adapter does not hold
             (= ‖W_res‖_F / ‖W‖_F; for "svd" the optimal rank-r tail).
    reconstruction_error: ‖W − (W_res + s · lora_B @ lora_A)‖_F / ‖W‖_F from the stored
             tensors: what rounding to the weights' dtypes costs (the model's change at init).
    seconds: this layer's share of its batch's decomposition time; ``batch`` = layers in that batch.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    approx_error: float
    reconstruction_error: float
    seconds: float
    batch: int


def init_peft_adapters(
    peft_model: Any, init: str = "rsvd", adapter_name: str = "default", *, seed: int = 0, **options
) -> list[LayerInit]:
    """Initialise adapter ``adapter_name`` of a PEFT LoRA model with our PiSSA-family split.

    For every LoRA Linear (or Conv1D, ``fan_in_fan_out``) layer carrying the adapter, the layer's
    effective weight ``W = base + s · lora_B @ lora_A`` (= the base weight after PEFT's default
    zero-delta LoRA init) is split at the adapter's rank ``r`` by ``init_factors(W, r, init,
    **options)``: the base weight becomes ``W_res``, ``lora_B.weight = A / √s`` and
    ``lora_A.weight = B / √s`` (see the module docstring), in the existing parameters' dtypes. The
    model's output is unchanged up to rounding. Same-shape layers (same shape, dtype, device and
    rank) are split as one batch.

    init:    a name in ``lowrank_kernels.adapters.INITS`` ("svd", "rsvd", "cur", "robust", "random").
    seed:    randomised inits give each layer its own generator seeded by a hash of ``seed`` and
             the layer's name (as `convert_model` does): the same seed gives a layer the same
             adapter on every run and device, whichever other layers are converted with it.
    options: passed to the init function (e.g. ``n_iter=4`` for "rsvd", ``u="stable"`` for "cur").

    Every argument and layer is checked before the first weight is written (unknown init, rank >
    min(out, in), non-Linear layers, merged adapters, layers shared with other adapters, DoRA and
    other variants, non-float or non-finite weights): on such errors the model is untouched, as it
    is when the init function rejects ``options`` (that happens in the first batch, before any
    write). Returns one `LayerInit` per layer, in module order.
    """
    _lora_config(peft_model, adapter_name)
    check_init(init)
    if "generator" in options:
        raise TypeError("init_peft_adapters derives its generators from seed=...; do not pass generator")
    layers = _lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA layers in this model")
    for name, layer in layers.items():
        _check_init_layer(name, layer, adapter_name)
    report = {}
    for key, names in _batches(layers, adapter_name).items():
        report.update(_init_batch({name: layers[name] for name in names}, adapter_name, key[-1], init, seed, options))
    return [report[name] for name in layers]


def _base_weight(layer) -> torch.Tensor:
    """The base layer's weight as ``[out, in]`` (a view: Conv1D stores ``[in, out]``)."""
    weight = layer.get_base_layer().weight
    return weight.T if layer.fan_in_fan_out else weight


def _check_init_layer(name: str, layer, adapter_name: str) -> None:
    """Raises if ``layer`` cannot take our init for ``adapter_name`` (nothing is modified)."""
    from peft.tuners.lora.layer import Linear

    base = layer.get_base_layer()
    if not isinstance(layer, Linear) or not isinstance(getattr(base, "weight", None), torch.Tensor):
        raise ValueError(
            f"{name}: init_peft_adapters handles LoRA Linear layers (nn.Linear or Conv1D base), "
            f"got {type(layer).__name__} over {type(base).__name__}"
        )
    W = _base_weight(layer)
    if W.dtype not in FLOAT_DTYPES or tuple(W.shape) != (layer.out_features, layer.in_features):
        raise TypeError(
            f"{name}: the base weight must be a float32/bfloat16/float16 [out, in] = "
            f"[{layer.out_features}, {layer.in_features}] matrix (initialise before quantizing), "
            f"got {describe(W)}"
        )
    others = sorted(set(layer.r) - {adapter_name})
    if others:
        raise ValueError(
            f"{name}: also holds adapters {others}; their outputs would change with the base weight "
            f"that init_peft_adapters rewrites for {adapter_name!r}"
        )
    if layer.merged:
        raise ValueError(f"{name}: adapter is merged into the base weight; call unmerge_adapter() first")
    if adapter_name in layer.lora_variant:
        raise ValueError(
            f"{name}: adapter {adapter_name!r} uses the LoRA variant "
            f"{type(layer.lora_variant[adapter_name]).__name__} (e.g. DoRA), which PiSSA inits do not "
            "cover"
        )
    rank, scale = layer.r[adapter_name], layer.scaling[adapter_name]
    if rank > min(W.shape):
        raise ValueError(
            f"{name}: adapter rank r={rank} exceeds min(out, in) = {min(W.shape)} of its weight {describe(W)}"
        )
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"{name}: PEFT scaling lora_alpha/r = {scale} must be positive and finite (the adapter holds A/√s and B/√s)"
        )
    if not torch.isfinite(W).all():
        raise ValueError(f"{name}: the base weight {describe(W)} holds NaN or Inf")


def _batches(layers: dict[str, Any], adapter_name: str) -> dict[tuple, list[str]]:
    """Layer names grouped by (shape, dtype, device, rank), in module order."""
    groups: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        W = _base_weight(layer)
        groups.setdefault((tuple(W.shape), W.dtype, W.device, layer.r[adapter_name]), []).append(name)
    return groups


@torch.no_grad()
def _effective_weight(layer, adapter_name: str) -> torch.Tensor:
    """``base + s · lora_B @ lora_A`` as ``[out, in]`` in the base dtype (exactly the base weight when
    lora_B is zero, PEFT's default init)."""
    delta = layer.lora_B[adapter_name].weight.float() @ layer.lora_A[adapter_name].weight.float()
    W = _base_weight(layer)
    return (W.float() + layer.scaling[adapter_name] * delta).to(W.dtype)


def _init_batch(
    layers: dict[str, Any], adapter_name: str, rank: int, init: str, seed: int, options: dict
) -> dict[str, LayerInit]:
    """Splits the same-shape ``layers`` as one batch ``[b, out, in]`` and writes the results."""
    W = torch.stack([_effective_weight(layer, adapter_name) for layer in layers.values()])
    start = time.perf_counter()
    # Every init takes a generator (deterministic ones such as "svd" ignore it).
    generators = [layer_generator(seed, name) for name in layers]  # per layer: independent of batch-mates
    A, B, W_res = init_factors(W, rank, init, generator=generators, **options)
    seconds = (time.perf_counter() - start) / len(layers)
    report = {}
    for i, (name, layer) in enumerate(layers.items()):
        _write_split(layer, adapter_name, A[i], B[i], W_res[i])
        approx, reconstruction = _split_errors(layer, adapter_name, W[i])
        report[name] = LayerInit(name, tuple(W.shape[1:]), rank, approx, reconstruction, seconds, len(layers))
    return report


@torch.no_grad()
def _write_split(layer, adapter_name: str, A: torch.Tensor, B: torch.Tensor, W_res: torch.Tensor) -> None:
    """In place (the Parameters, and any optimizer holding them, stay the same objects)."""
    root = math.sqrt(layer.scaling[adapter_name])
    layer.lora_B[adapter_name].weight.copy_(A.float() / root)
    layer.lora_A[adapter_name].weight.copy_(B.float() / root)
    _base_weight(layer).copy_(W_res)


@torch.no_grad()
def _split_errors(layer, adapter_name: str, W: torch.Tensor) -> tuple[float, float]:
    """(approx_error, reconstruction_error) of `LayerInit` from the stored tensors, in fp32."""
    W = W.float()
    principal = layer.scaling[adapter_name] * (
        layer.lora_B[adapter_name].weight.float() @ layer.lora_A[adapter_name].weight.float()
    )
    norm = torch.linalg.matrix_norm(W).clamp(min=torch.finfo(torch.float32).tiny)
    approx = torch.linalg.matrix_norm(W - principal) / norm
    reconstruction = torch.linalg.matrix_norm(W - principal - _base_weight(layer).float()) / norm
    return approx.item(), reconstruction.item()


# ---- use_fused_forward ---------------------------------------------------------------------------------


def use_fused_forward(peft_model: Any, enable: bool = True) -> dict[str, str]:
    """Route the forward of the model's LoRA Linear layers through `fused_pissa_linear`
    (``w_res`` = the dense base weight, ``A`` = lora_B.weight, ``B`` = lora_A.weight,
    ``scale`` = PEFT's scaling), or back to PEFT's forward with ``enable=False``.

    A layer is routed if it is a plain PEFT ``lora.Linear`` over an ``nn.Linear``; other LoRA layers
    (Embedding, Conv, Conv1D / fan_in_fan_out, quantized bases) keep PEFT's forward. A routed layer
    still calls PEFT's own forward whenever the fused op does not compute the same thing: adapters
    disabled or merged, not exactly one active adapter on the layer, DoRA or another variant,
    ``lora_bias``, dropout > 0 in training mode, a trainable base weight, dtypes that differ between
    x, base weight, bias and adapter weights, autocast, or extra forward arguments (``adapter_names``).

    Returns layer name -> "fused", "fused (now PEFT's forward: <reason>)" or
    "PEFT's forward: <reason>". Raises ValueError if enabling routes no layer at all.
    """
    _check_peft_model(peft_model)
    report = {}
    for name, layer in _lora_layers(peft_model).items():
        if not enable:
            if _is_fused(layer):
                del layer.forward
            report[name] = "PEFT's forward"
            continue
        reason = _unsupported(layer)
        if reason is not None:
            report[name] = f"PEFT's forward: {reason}"
            continue
        # An instance attribute, a partial rather than a bound method: deepcopy rebinds it to the
        # copy and torch.save / pickle can store it (a bound method pickles as getattr by name).
        layer.forward = functools.partial(_fused_forward, layer)
        fallback = _state_fallback(layer)
        report[name] = "fused" if fallback is None else f"fused (now PEFT's forward: {fallback})"
    if enable and not any(status.startswith("fused") for status in report.values()):
        raise ValueError(
            "use_fused_forward: no LoRA layer of this model can use the fused forward: "
            + ("; ".join(f"{name}: {status}" for name, status in report.items()) or "it has none")
        )
    return report


def _is_fused(layer) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _fused_forward


def _unsupported(layer) -> str | None:
    """Why ``layer`` can never take the fused forward, or None."""
    from peft.tuners.lora.layer import Linear

    base = layer.get_base_layer()
    if type(layer).forward is not Linear.forward:
        return f"{type(layer).__name__} is not PEFT's lora.Linear"
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"base layer {type(base).__name__} is not an nn.Linear"
    return None


def _state_fallback(layer) -> str | None:
    """Why the layer's current state needs PEFT's forward, or None."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapters merged"
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters"
    adapter = active[0]
    if adapter in layer.lora_variant:
        return f"LoRA variant {type(layer.lora_variant[adapter]).__name__}"
    if layer.lora_bias[adapter]:
        return "lora_bias"
    dropout = layer.lora_dropout[adapter]
    if dropout.training and not isinstance(dropout, nn.Identity):
        return "dropout in training mode"
    base = layer.get_base_layer()
    if base.weight.requires_grad:
        return "the base weight is trainable"
    dtypes = {base.weight.dtype, layer.lora_A[adapter].weight.dtype, layer.lora_B[adapter].weight.dtype}
    if base.bias is not None:
        dtypes.add(base.bias.dtype)
    if len(dtypes) > 1:
        return f"mixed dtypes {sorted(map(str, dtypes))}"
    return None


def _call_fallback(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """Why this call needs PEFT's forward, or None."""
    if args or kwargs:
        return "extra forward arguments"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast"
    if x.dtype != layer.get_base_layer().weight.dtype:
        return "x's dtype differs from the weight's"
    return None


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a routed PEFT lora.Linear (set on the layer as ``layer.forward``)."""
    if _call_fallback(self, x, args, kwargs) or _state_fallback(self):
        return type(self).forward(self, x, *args, **kwargs)
    adapter = next(name for name in self.active_adapters if name in self.lora_A)
    base = self.get_base_layer()
    return fused_pissa_linear(
        x,
        base.weight,
        self.lora_B[adapter].weight,
        self.lora_A[adapter].weight,
        base.bias,
        float(self.scaling[adapter]),
    )


# ---- pissa_to_lora ----------------------------------------------------------------------------------


def pissa_to_lora(
    trained: Any,
    initial: Mapping[str, torch.Tensor] | str | os.PathLike,
    output_dir=None,
    *,
    adapter_name: str = "default",
    config: Any = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Convert a trained PiSSA adapter into a plain LoRA adapter of rank 2r for the ORIGINAL
    (un-residualised) model, as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``
    does: with ``B_0, A_0`` the adapter at init and ``B_t, A_t`` after training (PEFT names),

        ΔW = s (B_t A_t − B_0 A_0) = s [B_t | −B_0] [A_t ; A_0]
        lora_A.weight [2r, in] = cat(A_t, A_0),   lora_B.weight [out, 2r] = cat(B_t, −B_0)

    and the config gets ``r`` × 2, ``lora_alpha`` × 2 (× √2 with rsLoRA, whose scaling is
    alpha/√r), the same for rank_pattern / alpha_pattern, so the scaling s is unchanged;
    ``init_lora_weights=True`` so loading does not re-split the original weights.

    trained:    the trained peft.PeftModel (state and config of ``adapter_name``), or its adapter
                state dict (``peft.get_peft_model_state_dict`` keys) together with ``config``.
    initial:    the adapter right after init: a state dict with the same keys (e.g. cloned
                ``get_peft_model_state_dict`` output) or a directory saved by ``save_pretrained``.
    output_dir: if given, write ``adapter_config.json`` + ``adapter_model.safetensors`` there, which
                ``PeftModel.from_pretrained(original_model, output_dir)`` loads.
    The original model is the one whose weights `init_peft_adapters` split (with PEFT's default
    zero-delta LoRA init, the pretrained model itself). Non-LoRA entries (modules_to_save, trained
    biases) pass through unchanged; PEFT's own conversion drops them. Returns (state dict,
    LoraConfig) of the LoRA adapter.
    """
    peft = _peft()
    if isinstance(trained, peft.PeftModel):
        if config is not None:
            raise TypeError("config is taken from the PeftModel; pass config only with a state dict")
        config = _lora_config(trained, adapter_name)
        trained = peft.get_peft_model_state_dict(trained, adapter_name=adapter_name)
    elif not isinstance(trained, Mapping) or not isinstance(config, peft.LoraConfig):
        raise TypeError(
            "trained must be a peft.PeftModel, or an adapter state dict passed with its "
            f"config=LoraConfig(...); got {type(trained).__name__} and config {type(config).__name__}"
        )
    if config.use_dora or config.lora_bias:
        raise ValueError(
            "pissa_to_lora converts plain LoRA factors; DoRA magnitudes and lora_bias have no rank-2r LoRA equivalent"
        )
    initial = _initial_state(initial)
    _check_same_adapter(trained, initial)
    state = {key: _converted(key, value, initial) for key, value in trained.items()}
    lora_config = _doubled_config(config)
    if output_dir is not None:
        _save_adapter(output_dir, state, lora_config)
    return state, lora_config


def _initial_state(initial) -> Mapping[str, torch.Tensor]:
    if isinstance(initial, Mapping):
        return initial
    if isinstance(initial, (str, os.PathLike)):
        from peft.utils import SAFETENSORS_WEIGHTS_NAME

        path = os.path.join(initial, SAFETENSORS_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"initial: no {SAFETENSORS_WEIGHTS_NAME} in {os.fspath(initial)!r} "
                "(save the initial adapter with save_pretrained(..., safe_serialization=True))"
            )
        from safetensors.torch import load_file

        return load_file(path)
    raise TypeError(f"initial must be an adapter state dict or a directory, got {type(initial).__name__}")


def _is_factor(key: str) -> bool:
    return key.endswith((".lora_A.weight", ".lora_B.weight"))


def _check_same_adapter(trained: Mapping, initial: Mapping) -> None:
    """Both hold the same LoRA factors with the same shapes, and no adapter tensor we cannot convert."""
    for key in trained:
        if not _is_factor(key) and any(part.startswith("lora_") for part in key.split(".")):
            raise ValueError(
                f"cannot convert {key!r}: only lora_A / lora_B weights of Linear layers "
                "(embedding adapters, DoRA magnitudes and LoRA biases have no converted form)"
            )
    mine, theirs = {k for k in trained if _is_factor(k)}, {k for k in initial if _is_factor(k)}
    if mine != theirs:
        raise ValueError(
            "initial and trained adapters differ in their LoRA weights: only trained "
            f"{sorted(mine - theirs)[:3]}, only initial {sorted(theirs - mine)[:3]}"
        )
    for key in filter(_is_factor, trained):  # in module order, so the first bad layer is named
        if trained[key].shape != initial[key].shape:
            raise ValueError(f"{key}: trained {describe(trained[key])} but initial {describe(initial[key])}")


def _converted(key: str, trained: torch.Tensor, initial: Mapping[str, torch.Tensor]) -> torch.Tensor:
    trained = trained.detach()
    if key.endswith(".lora_A.weight"):
        return torch.cat([trained, initial[key].to(trained)], dim=0)
    if key.endswith(".lora_B.weight"):
        return torch.cat([trained, -initial[key].to(trained)], dim=1)
    return trained.clone()


def _doubled_config(config):
    """The LoRA config of rank 2r with the same scaling."""
    factor = math.sqrt(2) if config.use_rslora else 2
    lora = copy.deepcopy(config)
    lora.init_lora_weights = True
    lora.inference_mode = True
    lora.r *= 2
    lora.lora_alpha *= factor
    lora.rank_pattern = {key: 2 * r for key, r in lora.rank_pattern.items()}
    lora.alpha_pattern = {key: factor * alpha for key, alpha in lora.alpha_pattern.items()}
    return lora


def _save_adapter(output_dir, state: dict[str, torch.Tensor], config) -> None:
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    config.save_pretrained(output_dir)  # makes the directory; writes adapter_config.json
    save_file(
        {key: value.contiguous() for key, value in state.items()},
        os.path.join(output_dir, SAFETENSORS_WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
