"""Adapters: turning linear layers and models into PiSSA-family adapters built on the kernels."""
from lowrank_kernels.adapters.inits import INITS, init_factors

__all__ = ["INITS", "init_factors"]
