"""Readable pure-PyTorch implementations: the oracle every compiled kernel is tested against."""

from lowrank_kernels.reference.decompose import gram_ref, row_col_sq_norms_ref
from lowrank_kernels.reference.fused_linear import nf4_lowrank_linear_grad_input_ref, nf4_lowrank_linear_ref
from lowrank_kernels.reference.nf4 import (
    dequantize_blockwise8_ref,
    dequantize_nf4_ref,
    quantize_blockwise8_ref,
    quantize_nf4_ref,
)
from lowrank_kernels.reference.robust import huber_normal_equations_ref, huber_weights_ref

__all__ = [
    "row_col_sq_norms_ref",
    "gram_ref",
    "huber_weights_ref",
    "huber_normal_equations_ref",
    "nf4_lowrank_linear_ref",
    "nf4_lowrank_linear_grad_input_ref",
    "quantize_nf4_ref",
    "dequantize_nf4_ref",
    "quantize_blockwise8_ref",
    "dequantize_blockwise8_ref",
]
