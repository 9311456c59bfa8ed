"""Random draws of the decompositions: one generator per matrix of a batch, drawn matrix by
matrix on the generator's device, so a batch sees the draws of a loop over its matrices and a
seed gives the same numbers whatever device W is on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

import torch

#: Randomness of a (batched) decomposition: one generator shared by the batch's matrices (drawn
#: from matrix after matrix; None = torch's default), or one generator per matrix.
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def matrix_generators(generator: Any, batch: tuple[int, ...]) -> list[torch.Generator | None]:
    """One generator per matrix of the batch (row-major over the leading dims). A sequence gives
    every matrix its own stream, so a matrix's draws do not depend on its batch-mates (per-layer
    seeds for model conversion); a single generator or None is shared, matrix after matrix."""
    count = math.prod(batch)
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * count
    generators = list(generator) if isinstance(generator, Sequence) else None
    if generators is None or len(generators) != count or not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(
            f"generator must be a torch.Generator, None or a sequence of {count} torch.Generators "
            f"(one per matrix of batch {tuple(batch)}), got {generator!r}"
        )
    return generators


def draw_device(generator: torch.Generator | None) -> torch.device:
    """Random numbers are drawn on the generator's device (CPU by default), so a seed gives the
    same numbers whatever device W is on."""
    return generator.device if generator is not None else torch.device("cpu")


def gaussian(shape: tuple[int, ...], generators: list[torch.Generator | None], like: torch.Tensor) -> torch.Tensor:
    """Standard normal test matrix ``[..., N, l]`` drawn in fp32 on the generators' device, one
    batch element after the other from its generator (so a batch sees the same draws as a loop
    over its matrices with the same generator), then moved to W's device and dtype."""
    draws = [torch.randn(shape[-2:], generator=g, device=draw_device(g)) for g in generators]
    return torch.stack(draws).reshape(shape).to(like.device, like.dtype)


def uniforms(batch: tuple[int, ...], sizes: tuple[int, ...], generator: Generators, device) -> list[torch.Tensor]:
    """fp64 U(0, 1) draws ``[*batch, size]`` for each size, drawn matrix by matrix from its
    generator (a batch sees the same draws as a loop over its matrices with the same generator)."""
    draws_of = [
        [torch.rand(size, generator=g, device=draw_device(g), dtype=torch.float64) for size in sizes]
        for g in matrix_generators(generator, batch)
    ]
    return [
        torch.stack([draws[j] for draws in draws_of]).reshape(*batch, size).to(device) for j, size in enumerate(sizes)
    ]
