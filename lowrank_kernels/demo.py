"""`python -m lowrank_kernels demo` (`make demo`): the adapters' main job on a built-in default,
the 36 linear layers of the real all-MiniLM-L6-v2 (24 × 384x384, 6 × 1536x384, 6 × 384x1536):

(a) quantization error reduction (PiSSA paper Table 4: the share of plain NF4's nuclear-norm
    error that the adapter removes) per layer type, for QLoRA (0 by definition), LoftQ and
    QPiSSA (1 and 5 rounds) and QPiSSA from the CUR and robust inits (1 round);
(b) the init time of the whole model per init (dense residual, `convert_model`);
(c) fused_pissa_linear vs dense torch + LoRA and bitsandbytes + LoRA on one MiniLM-shaped
    layer (1536x384, 1 and 512 tokens);
and a PNG of the three. Every layer is seeded by (seed, layer name) as in `convert_model`, so the
numbers of (a) are those of a conversion with the same options.

Reuses the packaged benchmarks: lowrank_kernels.bench._harness (machine line, tables, plot
writer), ._minilm (the weights) and .fused_linear (the timed methods).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lowrank_kernels.adapters import INITS, convert_model, loftq_factors, qpissa_factors, quantization_error_reduction
from lowrank_kernels.adapters.convert import layer_generator
from lowrank_kernels.adapters.sources import linear_modules
from lowrank_kernels.bench import fused_linear
from lowrank_kernels.bench._harness import default_results_dir, machine_description, print_table, save_plot
from lowrank_kernels.bench._minilm import minilm_linear_weights

#: layer type -> module name suffix in BERT; "output" is the MLP's, matched after "attention.output".
LAYER_TYPES = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention.output": "attention.output.dense",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
FUSED_SHAPE = (1536, 384)  # MiniLM's intermediate.dense [out, in]
FUSED_TOKENS = (1, 512)

#: column label -> function(W [..., m, n], rank, generator) -> (A, B, NF4 residuals): the alternations
#: of lowrank_kernels.adapters (rsvd refits; QPiSSA's init named by the label).
Method = Callable[..., tuple]
ERROR_METHODS: dict[str, Method] = {
    "LoftQ 1": functools.partial(loftq_factors, iters=1),
    "LoftQ 5": functools.partial(loftq_factors, iters=5),
    "QPiSSA 1": functools.partial(qpissa_factors, init="rsvd", iters=1),
    "QPiSSA 5": functools.partial(qpissa_factors, init="rsvd", iters=5),
    "CUR 1": functools.partial(qpissa_factors, init="cur", iters=1),
    "robust 1": functools.partial(qpissa_factors, init="robust", iters=1),
}


def default_plot() -> Path:
    return default_results_dir() / "demo.png"


def layer_type(name: str) -> str:
    """ "encoder.layer.3.attention.self.query" -> "query" (see LAYER_TYPES)."""
    for kind, suffix in LAYER_TYPES.items():
        if name.endswith(suffix):
            return kind
    raise ValueError(f"{name!r} is not a BERT encoder linear")


def minilm_weights(quick: bool) -> dict[str, torch.Tensor]:
    """Layer name -> fp32 weight [out, in] of all-MiniLM-L6-v2's encoder linears (quick: layer 0's six)."""
    weights = minilm_linear_weights()
    return {
        key.removesuffix(".weight"): w for key, w in weights.items() if not quick or key.startswith("encoder.layer.0.")
    }


def shape_groups(weights: dict[str, torch.Tensor]) -> list[list[str]]:
    """Layer names grouped by weight shape (one batch each, as `convert_model` batches them)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, w in weights.items():
        groups.setdefault(tuple(w.shape), []).append(name)
    return list(groups.values())


# ---- (a) quantization error reduction ---------------------------------------------------------------


def error_reductions(weights: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, dict[str, float]]:
    """Method label -> layer name -> quantization error reduction (fraction), NF4 blocksize 64."""
    result: dict[str, dict[str, float]] = {label: {} for label in ERROR_METHODS}
    for names in shape_groups(weights):
        W = torch.stack([weights[n] for n in names])
        for label, method in ERROR_METHODS.items():
            A, B, residual = method(W, rank, generator=[layer_generator(seed, n) for n in names])
            result[label].update(zip(names, quantization_error_reduction(W, residual, A, B).tolist()))
    return result


def reduction_means(reductions: dict[str, dict[str, float]]) -> dict[str, tuple[int, dict[str, float]]]:
    """Layer type (and "all layers") -> (layer count, method label -> mean reduction)."""
    names = list(next(iter(reductions.values())))
    kinds = {kind: [n for n in names if layer_type(n) == kind] for kind in LAYER_TYPES}
    kinds["all layers"] = names
    return {
        kind: (
            len(members),
            {label: statistics.mean(values[n] for n in members) for label, values in reductions.items()},
        )
        for kind, members in kinds.items()
        if members
    }


def reduction_rows(reductions: dict[str, dict[str, float]]) -> list[list[str]]:
    """Table rows: layer type, layer count, QLoRA (0 by definition), each method's mean in %."""
    return [
        [kind, str(count), "0.0 %"] + [f"{100 * v:.1f} %" for v in means.values()]
        for kind, (count, means) in reduction_means(reductions).items()
    ]


# ---- (b) init times ---------------------------------------------------------------------------------


def init_times(weights: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, float]:
    """Init name -> seconds to convert every layer (dense residual, no metrics) by `convert_model`."""
    tensors = {f"{name}.weight": w for name, w in weights.items()}
    times = {}
    for init in INITS:
        report = convert_model(
            linear_modules(tensors), target_modules=".*", rank=rank, init=init, seed=seed, metrics=False, progress=False
        )
        times[init] = report.seconds
    return times


# ---- (c) fused op ---------------------------------------------------------------------------------


def fused_times(rank: int, seconds: float) -> dict[tuple[int, bool], dict[str, float]]:
    """(tokens, backward) -> method -> median seconds, lowrank_kernels.bench.fused_linear's methods on a random
    MiniLM-shaped NF4 layer (fp32 activations)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = fused_linear.Layer(*FUSED_SHAPE, rank, torch.float32, device)
    return {
        (tokens, backward): fused_linear.measure(layer, tokens, backward, seconds=seconds)
        for tokens in FUSED_TOKENS
        for backward in (False, True)
    }


def fused_rows(times: dict[tuple[int, bool], dict[str, float]]) -> list[list[str]]:
    rows = []
    for (tokens, backward), t in times.items():
        rows.append(
            [str(tokens), "fwd+bwd" if backward else "fwd"]
            + [f"{v * 1e3:.3f}" for v in t.values()]
            + [f"{t['dense+LoRA'] / t['fused']:.2f}x", f"{t['bnb+LoRA'] / t['fused']:.2f}x"]
        )
    return rows


# ---- the demo -------------------------------------------------------------------------------------


def run(rank: int = 16, seed: int = 0, quick: bool = False, plot: str | Path | None = None) -> dict:
    """Prints the three tables and writes the plot (default bench/results/demo.png); returns the
    measured numbers ({"reductions", "init_times", "fused_times"})."""
    start = time.perf_counter()
    weights = minilm_weights(quick)
    shapes = ", ".join(f"{len(g)} x {'x'.join(map(str, weights[g[0]].shape))}" for g in shape_groups(weights))
    print(f"machine: {machine_description()}")
    print(f"all-MiniLM-L6-v2: {len(weights)} linear layers ({shapes}), rank {rank}, seed {seed}\n")

    reductions = error_reductions(weights, rank, seed)
    print(
        "(a) quantization error reduction, mean per layer type: 1 - |W - (nf4(W_res) + A B)|_* / |W - nf4(W)|_* "
        "(higher is better; N = rounds, rsvd refits, NF4 blocksize 64)"
    )
    print_table(["layer type", "layers", "QLoRA", *reductions], reduction_rows(reductions))

    times = init_times(weights, rank, seed)
    print(f"\n(b) init time of all {len(weights)} layers (convert_model, dense residual, rank {rank})")
    print_table(["init", "seconds"], [[init, f"{t:.2f}"] for init, t in times.items()])

    fused = fused_times(rank, seconds=0.5 if quick else 2.0)
    methods = list(next(iter(fused.values())))
    print(
        f"\n(c) one {FUSED_SHAPE[0]}x{FUSED_SHAPE[1]} layer, NF4 residual, rank {rank}, fp32 activations: "
        "median ms per call (speed-up = other / fused)"
    )
    print_table(["tokens", "pass", *methods, "vs dense", "vs bnb"], fused_rows(fused))

    print()
    save_plot(lambda plt: draw(plt, reductions, times, fused, rank), plot or default_plot())
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return {"reductions": reductions, "init_times": times, "fused_times": fused}


def draw(plt, reductions, times, fused, rank: int):
    """Three panels: (a) reduction per layer type and method, (b) init times, (c) fused timings."""
    fig, (ax_a, ax_b, ax_c) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [3, 1.2, 2]})
    means = reduction_means(reductions)
    width = 0.8 / len(reductions)
    for i, label in enumerate(reductions):
        ax_a.bar(
            [k + i * width for k in range(len(means))], [100 * m[label] for _, m in means.values()], width, label=label
        )
    ax_a.set_xticks([k + 0.4 - width / 2 for k in range(len(means))], list(means), rotation=20)
    ax_a.set(ylabel="error reduction vs QLoRA (%)", title=f"(a) quantization error reduction, rank {rank}")
    ax_a.set_ylim(bottom=min(0.0, max(-50.0, ax_a.get_ylim()[0])))  # a diverging method does not squash the rest
    ax_a.axhline(0, color="black", linewidth=0.8)
    ax_a.legend(fontsize=8)
    ax_b.bar(list(times), list(times.values()), color="tab:gray")
    ax_b.set(ylabel="seconds", title="(b) init time, whole model")
    labels = [f"{tokens} tok {'fwd+bwd' if backward else 'fwd'}" for tokens, backward in fused]
    methods = list(next(iter(fused.values())))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax_c.bar([k + i * width for k in range(len(fused))], [t[m] * 1e3 for t in fused.values()], width, label=m)
    ax_c.set_xticks([k + 0.4 - width / 2 for k in range(len(fused))], labels)
    ax_c.set(yscale="log", ylabel="ms", title=f"(c) {FUSED_SHAPE[0]}x{FUSED_SHAPE[1]} layer")
    ax_c.legend(fontsize=8)
    return fig
