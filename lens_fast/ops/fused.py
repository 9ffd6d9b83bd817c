"""Entry points of the fused block ops used by ``LensTransformer2DModel``.

Each function has the signature and semantics of its reference in ``reference.py``;
the backend behind it is chosen by ``dispatch.select``.
"""
from __future__ import annotations

from .reference import (  # noqa: F401 - re-exported entry points
    gated_residual_rms_norm_modulate_ref as gated_residual_rms_norm_modulate,
    layer_norm_modulate_ref as layer_norm_modulate,
    qk_norm_rope_ref as qk_norm_rope,
    rms_norm_modulate_ref as rms_norm_modulate,
    rms_norm_ref as rms_norm,
    silu_mul_ref as silu_mul,
)
