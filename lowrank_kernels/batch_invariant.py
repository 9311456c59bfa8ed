"""Dense linear algebra on batches of matrices whose result for each matrix is bitwise the
result of the same call on that matrix alone (on the CPU; elsewhere these are the plain calls).

Why: a batch of same-shape layers must give each layer the factors it gets alone (the
decompositions promise it, and `convert_model_distributed` relies on it). torch's batched CPU
calls do not: MKL rounds differently depending on the 16-byte alignment of a matrix's first
element (matrix i of a packed batch ``[b, m, n]`` starts ``i·m·n`` elements in; a new tensor
starts 64-byte aligned), and ATen's ``bmm`` picks other kernels than ``mm`` by shape (measured:
``[3, 11, 16] @ [3, 16, 48]``, every matrix aligned, differs from the single products). Seen on
MiniLM's 384×384 weights: `rsvd` at rank 3 gave 4 of 6 matrices other bits in a batch.

* `matmul`: fp32 products with a thin right factor run the `skinny_matmul` kernel (one FMA
  chain per output element in a fixed order: the same bits in any batch, for any thread count);
  other products run matrix by matrix (`matmul_per_matrix`).
* `addmm`: ``c + alpha · a @ b`` rounded once, matrix by matrix.
* `per_matrix`: a torch.linalg function (which copies its input into a packed buffer of its
  own), batched where every packed matrix starts aligned, else matrix by matrix.

A matrix handed to a single call is dense (row- or column-major) and 64-byte aligned, as a new
tensor is; matrices of a batch that are not get copied so (`_as_single`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowrank_kernels import ops

#: Bytes: c10's CPU allocator aligns every new tensor to this.
_ALIGNMENT = 64

# Widest fp32 X for which skinny_matmul beat MKL on this CPU (4096², 2 threads), by the layout
# of W: W @ X 1.7x at 16-24 columns, 1.1x at 64; Wᵀ @ X (a column-major W read in place)
# 1.3-1.4x at 16-24 columns, 1.15x at 32, a loss from ~48 on. For bf16/fp16 W the kernel wins at
# any width (MKL has no fast mixed-precision GEMM: 1.7-7x).
_FASTER_FP32_MAX_COLUMNS = {"row": 64, "column": 32}
# Widest X the kernel takes for its bits (`matmul`), in place of MKL matrix by matrix: one FMA
# chain per output element in a fixed order gives the same bits in any batch and for any thread
# count, in one batched call instead of a Python loop over the matrices; up to this width X stays
# in L1/L2. (Not measured against MKL.)
_INVARIANT_MAX_COLUMNS = 128


def use_skinny_matmul(a: torch.Tensor, x: torch.Tensor, *, for_invariance: bool = False) -> bool:
    """The one policy for `skinny_product` versus MKL matrix by matrix (`matmul_per_matrix`) for
    ``a [..., m, k] @ x [..., k, n]`` on the CPU (elsewhere: never, cuBLAS).

    Default, for speed (rsvd's passes over W: ``a`` in W's dtype, ``x`` fp32): where the kernel
    measured faster, reading ``a`` in place, so only for row- or column-major matrices (any other
    layout would be copied first): bf16/fp16 ``a`` always, fp32 up to ``_FASTER_FP32_MAX_COLUMNS``.
    ``for_invariance`` (`matmul`, small fp32 products): up to ``_INVARIANT_MAX_COLUMNS`` in any
    layout, for bits that depend on neither the batch nor the thread count."""
    if not _on_cpu(a, x):
        return False
    if for_invariance:
        return a.dtype == x.dtype == torch.float32 and x.shape[-1] <= _INVARIANT_MAX_COLUMNS
    layout = matrix_layout(a)
    if layout is None:
        return False
    return a.dtype != torch.float32 or x.shape[-1] <= _FASTER_FP32_MAX_COLUMNS[layout]


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [..., m, k] @ b [..., k, n]`` (one batch shape on both sides, or none)."""
    if use_skinny_matmul(a, b, for_invariance=True):
        _check_batches(a, b)
        return skinny_product(a, b)
    return matmul_per_matrix(a, b)


def skinny_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a [..., m, k] @ b [..., k, n]`` (CPU; a in any float dtype, b thin) by the
    skinny_matmul kernel, which reads a row-major W or the transpose of one. The choice follows
    each matrix's layout, not the batch's (`matrix_layout`), so a batch takes the path its
    matrices take alone; a batch stored otherwise is packed first, other layouts copied
    row-major."""
    if matrix_layout(a) == "column":
        return ops.op("skinny_matmul")(a.mT.contiguous(), b.float().contiguous(), True)
    return ops.op("skinny_matmul")(a.contiguous(), b.float().contiguous(), False)


def matmul_per_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` by torch (MKL on the CPU), one matrix at a time where batched."""
    return _product(torch.matmul, a, b)


def addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """``c [..., m, n] + alpha · a [..., m, k] @ b [..., k, n]``, rounded once (``torch.addmm``)."""
    if c.dim() > 2 and (not _on_cpu(c, a, b) or _no_matrices(c)):
        flat = [t.reshape(-1, *t.shape[-2:]) for t in (c, a, b)]
        return torch.baddbmm(*flat, alpha=alpha).reshape(c.shape)
    return _product(lambda c, a, b, out=None: torch.addmm(c, a, b, alpha=alpha, out=out), c, a, b)


def per_matrix(fn: Callable, x: torch.Tensor, *args, always: bool = False, **kwargs):
    """``fn(x, *args, **kwargs)`` for a torch.linalg function of ``x [..., m, n]``.
    ``always``: matrix by matrix whenever x is batched on the CPU, for functions with outputs of
    other sizes (eigenvalues, R of QR, ...) whose alignment the input's size does not decide.
    Tuple results of the matrix-by-matrix path are plain tuples."""
    if x.dim() == 2 or not _on_cpu(x) or _no_matrices(x) or (not always and _packed_aligned(x.shape, x.dtype)):
        return fn(x, *args, **kwargs)
    return _stack([fn(matrix, *args, **kwargs) for matrix in _singles(x)], x.shape[:-2])


# ---- helpers ------------------------------------------------------------------------------------------


def _check_batches(*operands: torch.Tensor) -> None:
    if any(t.dim() != operands[0].dim() or t.shape[:-2] != operands[0].shape[:-2] for t in operands):
        raise ValueError(
            f"batch_invariant: operands of shapes {[list(t.shape) for t in operands]} must share one "
            f"batch shape (or all be matrices)"
        )


def _product(fn: Callable, *operands: torch.Tensor) -> torch.Tensor:
    """``fn(*operands, out=None)`` for a GEMM-like ``fn`` of matrices (the result has the rows of
    the second-to-last operand and the columns of the last), matrix by matrix where batched:
    into one preallocated result where its matrices start aligned (as new tensors do), else
    stacked."""
    _check_batches(*operands)
    if not _on_cpu(*operands) or _no_matrices(operands[0]):
        return fn(*operands)
    if operands[0].dim() == 2:
        return fn(*map(_as_single, operands))
    batch, rows, columns = operands[0].shape[:-2], operands[-2].shape[-2], operands[-1].shape[-1]
    groups = list(zip(*map(_singles, operands)))
    if len(groups) == 1:
        return fn(*groups[0]).reshape(*batch, rows, columns)
    if not _packed_aligned((rows, columns), operands[-1].dtype):
        return _stack([fn(*group) for group in groups], batch)
    out = torch.empty(len(groups), rows, columns, dtype=operands[-1].dtype)
    for matrix, group in zip(out, groups):
        fn(*group, out=matrix)
    return out.reshape(*batch, rows, columns)


def _on_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def _no_matrices(x: torch.Tensor) -> bool:
    """A batch of zero matrices (the batched call returns the empty result)."""
    return x.shape[:-2].numel() == 0


def matrix_layout(x: torch.Tensor) -> str | None:
    """ "row" or "column" if every matrix of ``x [..., m, n]`` is row- or column-major without
    gaps (whatever the batch strides: a batch expanded from one matrix or every other matrix of
    a larger batch qualifies), else None. Matrices with one row or column count as row-major."""
    m, n = x.shape[-2:]
    if min(m, n) <= 1 or (x.stride(-1) == 1 and x.stride(-2) == n):
        return "row"
    if x.stride(-2) == 1 and x.stride(-1) == m:
        return "column"
    return None


def _dense(x: torch.Tensor) -> bool:
    """Each matrix of ``x [..., m, n]`` row-major or column-major without gaps."""
    return matrix_layout(x) is not None


def _packed_aligned(shape: torch.Size, dtype: torch.dtype) -> bool:
    """Matrices ``[..., m, n]`` packed one after another all start aligned."""
    return shape[-2] * shape[-1] * dtype.itemsize % _ALIGNMENT == 0


def _as_single(x: torch.Tensor) -> torch.Tensor:
    """The matrix ``x [m, n]`` as a single call gets it: itself if dense and aligned, else a new
    tensor (with x's layout if dense)."""
    if _dense(x):
        return x if x.data_ptr() % _ALIGNMENT == 0 else x.clone()
    return x.contiguous()


def _singles(x: torch.Tensor) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """The matrices of the batch ``x [..., m, n]``, each as a single call gets it (checked once
    for the whole batch where its matrices are dense and all start aligned)."""
    matrices = x.reshape(-1, *x.shape[-2:])
    steps_aligned = matrices.shape[0] == 1 or matrices.stride(0) * x.element_size() % _ALIGNMENT == 0
    if _dense(x) and steps_aligned and x.data_ptr() % _ALIGNMENT == 0:
        return matrices.unbind()
    return [_as_single(matrix) for matrix in matrices]


def _stack(results: list, batch: torch.Size):
    """Per-matrix results (tensors, or tuples of tensors) stacked to the batch shape."""
    if isinstance(results[0], torch.Tensor):
        # Column-major results (LAPACK's) stay column-major: later products then take the same
        # path (a transposed operand) as on the single call's result.
        first = results[0]
        column_major = first.dim() >= 2 and not first.is_contiguous() and first.mT.is_contiguous()
        stacked = torch.stack([r.mT for r in results]).mT if column_major else torch.stack(results)
        return stacked.reshape(*batch, *stacked.shape[1:])
    return tuple(_stack([r[k] for r in results], batch) for k in range(len(results[0])))
