"""Triton kernels (GPU). Importing a module here requires triton; lowrank_kernels.ops imports
them only when they serve an op. Tests run them on CPU tensors under TRITON_INTERPRET=1."""
