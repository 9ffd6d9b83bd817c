"""Fused ops of the Lens block: one file per op (``norm_modulate``, ``qk_norm_rope``,
``swiglu``, ``attention``), each top to bottom: the PyTorch reference (``*_ref``), the
backends, the ``torch.library`` custom op with its fake and autograd, the public entry
point named as the op (``from lens_fast.ops.norm_modulate import rms_norm_modulate``).
Triton kernels live in ``lens_fast.kernels``, CUDA C++ in ``csrc/``; ``dispatch`` picks a
backend per call (cached), ``optional`` probes optional dependencies once.

| op                                 | forward                          | backward        |
|------------------------------------|----------------------------------|-----------------|
| qk_norm_rope                       | cuda, triton, torch              | triton, torch   |
| rms_norm                           | cuda, triton, torch              | triton, torch   |
| rms_norm_modulate                  | cuda, triton, torch              | triton, torch   |
| gated_residual_rms_norm_modulate   | cuda, triton, torch              | triton, torch   |
| layer_norm_modulate                | cuda, triton, torch              | triton, torch   |
| silu_mul, swiglu                   | triton, torch                    | triton, torch   |
| joint_attention                    | flash_attn, triton, sdpa, torch  | the same        |
"""
