"""lowrank_kernels: compiled kernels for PiSSA-family fine-tuning.

Public API: NF4 storage bit-compatible with bitsandbytes; fused_pissa_linear (the QPiSSA /
PiSSA training op); decompositions for adapter initialisation (rsvd, pissa_factors, cur,
cur_factors, random_pissa_factors); Robust PiSSA (huber_factorize, robust_pissa_factors);
adapters (PiSSALinear, convert_model, QPiSSA, checkpoints; more in lowrank_kernels.adapters);
build_info(); the CPU output cache (output_cache_info, set_output_cache_limit,
empty_output_cache).
"""

from lowrank_kernels._extension import ExtensionNotBuiltError
from lowrank_kernels.adapters import (
    PiSSALinear,
    convert_model,
    load_converted,
    merge_model,
    qpissa_factors,
    quantization_error_reduction,
    save_converted,
)
from lowrank_kernels.build_info import build_info, format_build_info
from lowrank_kernels.decompose import cur, cur_factors, pissa_factors, random_pissa_factors, rsvd
from lowrank_kernels.fused_linear import fused_pissa_linear
from lowrank_kernels.nf4 import NF4Weight, dequantize_nf4, load_nf4, quantize_nf4, save_nf4
from lowrank_kernels.output_cache import empty_output_cache, output_cache_info, set_output_cache_limit
from lowrank_kernels.robust import huber_factorize, robust_pissa_factors

__version__ = "0.1.0"

__all__ = [
    "ExtensionNotBuiltError",
    "NF4Weight",
    "PiSSALinear",
    "build_info",
    "convert_model",
    "cur",
    "cur_factors",
    "dequantize_nf4",
    "empty_output_cache",
    "format_build_info",
    "fused_pissa_linear",
    "load_converted",
    "load_nf4",
    "merge_model",
    "output_cache_info",
    "pissa_factors",
    "qpissa_factors",
    "quantization_error_reduction",
    "quantize_nf4",
    "huber_factorize",
    "random_pissa_factors",
    "robust_pissa_factors",
    "rsvd",
    "save_converted",
    "save_nf4",
    "set_output_cache_limit",
]
