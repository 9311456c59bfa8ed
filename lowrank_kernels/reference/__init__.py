"""Readable pure-PyTorch implementations: the oracle every compiled kernel is tested against."""
from lowrank_kernels.reference.nf4 import (
    dequantize_blockwise8_ref,
    dequantize_nf4_ref,
    quantize_blockwise8_ref,
    quantize_nf4_ref,
)

__all__ = ["quantize_nf4_ref", "dequantize_nf4_ref", "quantize_blockwise8_ref", "dequantize_blockwise8_ref"]
