"""Entry points of the fused block ops used by ``LensTransformer2DModel``.

Each function has the signature and semantics of its reference in ``reference.py``. Its
backend is picked with ``dispatch.select``: cuda -> triton -> torch by availability,
device, dtype and layout; ``LENS_FAST_BACKEND=torch|triton|cuda`` forces one. Kernel
backends run inside one ``torch.library`` custom op per op (``lens_fast::<name>``, fake +
autograd registered, so ``torch.compile(fullgraph=True)`` sees no graph break). An eager
call that resolves to ``torch`` for every op (forced, or auto on CPU tensors:
``kernel_utils.runs_reference``) runs the reference directly, with plain autograd: the
reference path exactly, without custom-op overhead. Under torch.compile, and wherever a
kernel op falls back (e.g. mixed dtypes), the custom op runs the same reference inside
(backward: the reference's autograd through ``torch.func.vjp``).
Backends per op:

| op                                 | forward              | backward        |
|------------------------------------|----------------------|-----------------|
| qk_norm_rope                       | cuda, triton, torch  | triton, torch   |
| rms_norm                           | cuda, triton, torch  | triton, torch   |
| rms_norm_modulate                  | cuda, triton, torch  | triton, torch   |
| gated_residual_rms_norm_modulate   | cuda, triton, torch  | triton, torch   |
| layer_norm_modulate                | cuda, triton, torch  | triton, torch   |
| silu_mul, swiglu                   | triton, torch        | triton, torch   |

The timestep embedding stays in PyTorch (``timestep_embedding_ref``: [B, 256], a few
microseconds, not worth a kernel).
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from . import norm_modulate as _nm
from . import qk_norm_rope as _qk
from . import reference as _ref
from .kernel_utils import runs_reference
from .reference import timestep_embedding_ref as timestep_embedding  # noqa: F401 - re-exported
from .swiglu import silu_mul, swiglu  # noqa: F401 - re-exported entry points

__all__ = ["qk_norm_rope", "rms_norm", "rms_norm_modulate", "gated_residual_rms_norm_modulate",
           "layer_norm_modulate", "silu_mul", "swiglu", "timestep_embedding"]


def _check_modulation(x: Tensor, **vectors: Optional[Tensor]) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, C]; got shape {tuple(x.shape)}")
    b, _, c = x.shape
    for name, v in vectors.items():
        if tuple(v.shape) != (b, c):
            raise ValueError(f"{name} has shape {tuple(v.shape)}; expected per-sample [B={b}, C={c}]")


def _check_weight(x: Tensor, weight: Optional[Tensor]) -> None:
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [C={x.shape[-1]}]")


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """RMSNorm over the last dim (float32 statistics), times ``weight`` when given."""
    _check_weight(x, weight)
    if runs_reference(x, weight):
        return _ref.rms_norm_ref(x, weight, eps)
    return _nm.rms_norm_op(x, weight, float(eps))[0]


def rms_norm_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """``rmsnorm(x) * weight * (1 + scale) + shift`` with per-sample [B, C] shift/scale."""
    _check_modulation(x, shift=shift, scale=scale)
    _check_weight(x, weight)
    if runs_reference(x, weight, shift, scale):
        return _ref.rms_norm_modulate_ref(x, weight, shift, scale, eps)
    return _nm.rms_norm_modulate_op(x, weight, shift, scale, float(eps))[0]


def gated_residual_rms_norm_modulate(x: Tensor, y: Tensor, gate: Tensor, weight: Tensor, shift: Tensor,
                                     scale: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """``x' = x + gate * y``; returns ``(x', rms_norm_modulate(x'))``."""
    _check_modulation(x, gate=gate, shift=shift, scale=scale)
    _check_weight(x, weight)
    if y.shape != x.shape:
        raise ValueError(f"y has shape {tuple(y.shape)}; expected x's shape {tuple(x.shape)}")
    if runs_reference(x, y, gate, weight, shift, scale):
        return _ref.gated_residual_rms_norm_modulate_ref(x, y, gate, weight, shift, scale, eps)
    res, out, _ = _nm.gated_residual_rms_norm_modulate_op(x, y, gate, weight, shift, scale, float(eps))
    return res, out


def layer_norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine (float32 statistics), then ``* (1 + scale) + shift``."""
    _check_modulation(x, shift=shift, scale=scale)
    if runs_reference(x, shift, scale):
        return _ref.layer_norm_modulate_ref(x, shift, scale, eps)
    return _nm.layer_norm_modulate_op(x, shift, scale, float(eps))[0]


def qk_norm_rope(img_qkv: Tensor, txt_qkv: Tensor, heads: int, norm_q: Tensor, norm_k: Tensor,
                 norm_added_q: Tensor, norm_added_k: Tensor, rope: Tensor,
                 eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    """Both streams' fused QKV projections -> joint q, k, v [B, N + S, H, D] (image rows
    first) with per-head RMSNorm on q/k and RoPE on both streams."""
    _qk.check_inputs(img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k, rope)
    if runs_reference(img_qkv, txt_qkv):
        return _ref.qk_norm_rope_ref(img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k, rope, eps)
    return _qk.qk_norm_rope_op(img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k, rope,
                               float(eps))
