"""Adapters: turning linear layers and models into PiSSA-family adapters built on the kernels."""
from lowrank_kernels.adapters.inits import INITS, init_factors
from lowrank_kernels.adapters.peft_bridge import LayerInit, init_peft_adapters, pissa_to_lora, use_fused_forward

__all__ = ["INITS", "LayerInit", "init_factors", "init_peft_adapters", "pissa_to_lora", "use_fused_forward"]
