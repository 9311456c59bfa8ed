"""Adapters: turning linear layers and models into PiSSA-family adapters built on the kernels.

* `PiSSALinear`: frozen residual (dense or NF4) + trainable ``A``/``B``, `fused_pissa_linear` forward.
* `convert_model` / `merge_model`: in-place conversion of a model's linears (batched per shape).
* `qpissa_factors` / `loftq_factors` and the quantization error metrics.
* `save_converted` / `load_converted` / `read_converted`: checked safetensors checkpoints.
* `convert_files`: streaming conversion of a model on disk (lowrank or PEFT format, resumable,
  torchrun shards without a gather).
* `init_factors` / `INITS`: init name -> PiSSA split.
* PEFT bridge (optional extra `peft`): `init_peft_adapters`, `use_fused_forward`, `pissa_to_lora`.
"""

from lowrank_kernels.adapters.checkpoint import CheckpointError, load_converted, read_converted, save_converted
from lowrank_kernels.adapters.convert import ConversionReport, LayerReport, convert_model, merge_model
from lowrank_kernels.adapters.inits import INITS, init_factors
from lowrank_kernels.adapters.peft_bridge import LayerInit, init_peft_adapters, pissa_to_lora, use_fused_forward
from lowrank_kernels.adapters.pissa_linear import AdapterOptions, PiSSALinear, adapter_split
from lowrank_kernels.adapters.qpissa import (
    QuantizedFactors,
    error_metrics,
    loftq_factors,
    nuclear_norm,
    qpissa_factors,
    quantization_error,
    quantization_error_reduction,
    reconstruction_error,
)
from lowrank_kernels.adapters.streaming import convert_files

__all__ = [
    "INITS",
    "AdapterOptions",
    "CheckpointError",
    "ConversionReport",
    "LayerInit",
    "LayerReport",
    "PiSSALinear",
    "QuantizedFactors",
    "adapter_split",
    "convert_files",
    "convert_model",
    "error_metrics",
    "init_factors",
    "init_peft_adapters",
    "load_converted",
    "loftq_factors",
    "merge_model",
    "nuclear_norm",
    "pissa_to_lora",
    "qpissa_factors",
    "quantization_error",
    "quantization_error_reduction",
    "read_converted",
    "reconstruction_error",
    "save_converted",
    "use_fused_forward",
]
