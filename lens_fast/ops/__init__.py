"""Fused ops of the Lens block: one entry point per op, dispatched to CUDA, Triton or
the PyTorch reference (see ``dispatch``)."""
