"""Triton kernels of lens_fast (installed as lens_fast.kernels)."""
