"""A small model with linears of three shapes (two repeated, one with and one without bias) and
non-linear parameters, for the conversion and checkpoint tests; and model snapshots."""

from __future__ import annotations

import torch
from torch import nn

LINEARS = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "blocks.2.up", "blocks.2.down", "head"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Toy(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.blocks = nn.ModuleList([Block() for _ in range(3)])
            self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def snapshot(model: nn.Module) -> dict[str, object]:
    """Everything conversion may change: module types, tensors (cloned) and requires_grad flags."""
    return {
        "types": {name: type(m) for name, m in model.named_modules()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN included, unlike torch.equal)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def unchanged(model: nn.Module, before: dict[str, object]) -> bool:
    after = snapshot(model)
    return (
        after["types"] == before["types"]
        and after["grad"] == before["grad"]
        and after["state"].keys() == before["state"].keys()
        and all(same_bits(after["state"][k], v) for k, v in before["state"].items())
    )


def residual64(m) -> torch.Tensor:
    """A PiSSALinear's residual in fp64 (NF4 through the reference dequantizer)."""
    from lowrank_kernels.reference import dequantize_nf4_ref

    if not m.quantize:
        return m.residual.double()
    q = m.residual_weight()
    return dequantize_nf4_ref(q.packed, q.block_absmax(), q.blocksize, q.numel, torch.float64).view(q.shape)


def effective_weight64(m) -> torch.Tensor:
    """W_res + s A B of a PiSSALinear, fp64."""
    return residual64(m) + m.scale * m.A.double() @ m.B.double()


def tiny_llama(
    path,
    *,
    dtype=torch.float32,
    layers: int = 2,
    max_shard_size: str = "60KB",
    seed: int = 0,
    hidden: int = 32,
    intermediate: int = 48,
):
    """A small random Llama (4 heads / 2 KV heads, untied lm_head) saved offline with
    save_pretrained in several shards with an index; returns the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(path, max_shard_size=max_shard_size, safe_serialization=True)
    return model
