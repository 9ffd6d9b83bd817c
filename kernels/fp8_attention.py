"""Opt-in FP8 joint attention (forward only, Hopper and newer), on the flash-attention kernel.

Design trade-off. Only Q K^T runs in FP8 (e4m3, one scale per (batch, head), amax / 448):
Lens's q and k come out of a per-head RMSNorm, so their range per head is tight and a
per-head scale costs little accuracy, while the scales fold into the softmax scale for
free. P @ V stays in the value dtype (bf16/fp16): p in e4m3 keeps 3 mantissa bits, which
we judged too coarse for the attention output of a 48-block denoiser. So half the matrix
FLOPs run at the FP8 rate (the cast of q and k is one extra read+write of each) and the
accuracy loss is that of rounding q and k. ``fp8_attention_error`` reports it against a
bf16 run of the same kernel so callers can decide per model whether to enable it.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import flash_attention

E4M3_MAX = 448.0


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor-core dots need sm_89+ on CUDA; the CPU interpreter emulates them."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


def quantize_per_head(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> (e4m3 copy [B, L, H, D] contiguous, dequant scale [B, H] float32)."""
    if x.dim() != 4:
        raise ValueError(f"expected [B, L, H, D]; got shape {tuple(x.shape)}")
    amax = x.detach().abs().amax(dim=(1, 3)).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    x8 = (x.float() / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8.contiguous(), scale.contiguous()


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  txt_mask: Optional[torch.Tensor] = None, *, n_img: int,
                  out: Optional[torch.Tensor] = None,
                  config: Optional[flash_attention.Config] = None) -> torch.Tensor:
    """Joint attention with Q K^T in FP8 (per-head scales) and P @ V in v's dtype.
    Forward only: the result carries no autograd graph."""
    if any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled():
        raise RuntimeError("fp8_attention is forward-only; call it under torch.no_grad() or "
                           "use lens_fast.ops.attention.joint_attention for training")
    if v.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"fp8_attention needs v in float16 or bfloat16; got {v.dtype}")
    if not fp8_supported(q.device):
        raise RuntimeError(f"FP8 attention needs a CUDA GPU of compute capability >= 8.9 (or "
                           f"the CPU interpreter); got inputs on {q.device}")
    q8, q_scale = quantize_per_head(q)
    k8, k_scale = quantize_per_head(k)
    o, _ = flash_attention.attention_forward(q8, k8, v, txt_mask, n_img=n_img, out=out,
                                             config=config, q_scale=q_scale, k_scale=k_scale)
    return o


def fp8_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      txt_mask: Optional[torch.Tensor] = None, *, n_img: int) -> torch.Tensor:
    """What the FP8 kernel computes, in float32 torch: q, k rounded through e4m3 with the
    same per-head scales, then exact attention. Output in v's dtype."""
    q8, qs = quantize_per_head(q)
    k8, ks = quantize_per_head(k)
    qd = q8.float() * qs[:, None, :, None]
    kd = k8.float() * ks[:, None, :, None]
    return _attention_fp32(qd, kd, v, txt_mask, n_img).to(v.dtype)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def fp8_attention_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        txt_mask: Optional[torch.Tensor] = None, *, n_img: int) -> Dict[str, float]:
    """Relative L2 errors of the FP8 path: vs the 16-bit kernel on the same inputs
    (``fp8_vs_16bit``), and of both against a float32 truth (``fp8_vs_fp32``,
    ``16bit_vs_fp32``, 16-bit meaning v's dtype), plus their ratio."""
    with torch.no_grad():
        truth = _attention_fp32(q, k, v, txt_mask, n_img)
        o8 = fp8_attention(q, k, v, txt_mask, n_img=n_img)
        o16, _ = flash_attention.attention_forward(q.to(v.dtype), k.to(v.dtype), v, txt_mask,
                                                   n_img=n_img)
    e8, e16 = _rel_err(o8, truth), _rel_err(o16, truth)
    return {"fp8_vs_16bit": _rel_err(o8, o16), "fp8_vs_fp32": e8, "16bit_vs_fp32": e16,
            "fp8_over_16bit_error": e8 / max(e16, 1e-30)}


def _attention_fp32(q, k, v, txt_mask, n_img):
    scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) * q.shape[-1] ** -0.5
    if txt_mask is not None:
        keep = torch.cat([torch.ones(q.shape[0], n_img, dtype=torch.bool, device=q.device),
                          txt_mask.bool()], 1)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.float())
