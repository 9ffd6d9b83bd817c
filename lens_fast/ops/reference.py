"""PyTorch references of every fused op, written to match the Lens reference
implementation operation by operation (so `LENS_FAST_BACKEND=torch` is the reference
path). Kernels are tested against these; benchmarks use them as the baseline.

Conventions
- Norm statistics in float32 whatever the input dtype (as the reference).
- RMSNorm follows diffusers: normalise in float32; with a half/bf16 weight the result
  is cast to the weight dtype before the weight multiply.
- RoPE tables are float32 ``[L, D/2, 2]`` holding (cos, sin) per interleaved pair.
- The joint attention layout is ``[B, L, H, D]`` with L = image tokens then text tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    input_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight is None:
        return y.to(input_dtype)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return y * weight


def modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-sample [B, C] shift/scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def rms_norm_modulate_ref(x, weight, shift, scale, eps: float):
    return modulate_ref(rms_norm_ref(x, weight, eps), shift, scale)


def gated_residual_rms_norm_modulate_ref(x, y, gate, weight, shift, scale, eps: float):
    """``x' = x + gate * y`` then ``(x', modulate(rmsnorm(x')))``: one sub-layer's exit
    fused with the next sub-layer's entry."""
    x = x + gate.unsqueeze(1) * y
    return x, rms_norm_modulate_ref(x, weight, shift, scale, eps)


def layer_norm_modulate_ref(x, shift, scale, eps: float):
    """Output head: LayerNorm without affine, then ``x * (1 + scale) + shift``."""
    return modulate_ref(F.layer_norm(x, (x.shape[-1],), None, None, eps), shift, scale)


def silu_mul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: ``silu(a) * b`` (a = w1 x, b = w3 x)."""
    return F.silu(a) * b


def apply_rope_ref(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [B, L, H, D] by ``rope`` [L, D/2, 2] in float32."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = rope[..., 0].unsqueeze(1)  # [L, 1, D/2]
    sin = rope[..., 1].unsqueeze(1)
    re = xf[..., 0] * cos - xf[..., 1] * sin
    im = xf[..., 0] * sin + xf[..., 1] * cos
    return torch.stack([re, im], dim=-1).flatten(-2).to(x.dtype)


def qk_norm_rope_ref(img_qkv: torch.Tensor, txt_qkv: torch.Tensor, heads: int,
                     norm_q: torch.Tensor, norm_k: torch.Tensor,
                     norm_added_q: torch.Tensor, norm_added_k: torch.Tensor,
                     rope: torch.Tensor, eps: float = 1e-6
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the fused QKV projections of both streams to the joint attention inputs.

    img_qkv [B, N, 3*H*D], txt_qkv [B, S, 3*H*D]; rope [N + S, D/2, 2] (image rows
    first). Returns q, k, v each [B, N + S, H, D]: per-head RMSNorm on q and k with the
    stream's own weights, RoPE on q and k of both streams, v carried through.
    """
    b, n, _ = img_qkv.shape
    s = txt_qkv.shape[1]
    d = img_qkv.shape[-1] // (3 * heads)
    iq, ik, iv = img_qkv.view(b, n, 3, heads, d).unbind(2)
    tq, tk, tv = txt_qkv.view(b, s, 3, heads, d).unbind(2)
    iq, ik = rms_norm_ref(iq, norm_q, eps), rms_norm_ref(ik, norm_k, eps)
    tq, tk = rms_norm_ref(tq, norm_added_q, eps), rms_norm_ref(tk, norm_added_k, eps)
    iq, ik = apply_rope_ref(iq, rope[:n]), apply_rope_ref(ik, rope[:n])
    if s > 0:
        tq, tk = apply_rope_ref(tq, rope[n:n + s]), apply_rope_ref(tk, rope[n:n + s])
    return torch.cat([iq, tq], 1), torch.cat([ik, tk], 1), torch.cat([iv, tv], 1)


def joint_attention_ref(q, k, v, txt_mask: Optional[torch.Tensor], n_img: int,
                        upcast: bool = True) -> torch.Tensor:
    """Math reference of the joint attention: [B, L, H, D] in and out; padded text keys
    (mask False) get -inf; image keys are always valid."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    if txt_mask is not None:
        keep = torch.cat([torch.ones(txt_mask.shape[0], n_img, dtype=torch.bool, device=q.device),
                          txt_mask.bool()], 1)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    return torch.einsum("bhlm,bmhd->blhd", probs, v).to(dtype)


def timestep_embedding_ref(sigma: torch.Tensor, dim: int = 256, scale: float = 1000.0,
                           max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``sigma * scale``, cos half first (diffusers
    ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
    emb = sigma[:, None].float() * torch.exp(exponent)[None, :]
    emb = scale * emb
    return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)


def rope_axis_angles(index: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Angles [len(index), dim/2] of one RoPE axis, in float32 as the reference."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=index.device).float().div(dim))
    return torch.outer(index.float(), inv)


def rope_table_ref(height: int, width: int, txt_len: int, axes_dims: Sequence[int],
                   theta: float = 10000.0, device=None) -> torch.Tensor:
    """The Lens 3-axis RoPE table [h*w + txt_len, D/2, 2] (cos, sin), float32.

    Image token (r, c): frame 0, height index r - (h - h//2), width index
    c - (w - w//2) (centred grid). Text token j: index max(h//2, w//2) + j on all axes.
    """
    fd, hd, wd = axes_dims
    rows = torch.arange(height, device=device) - (height - height // 2)
    cols = torch.arange(width, device=device) - (width - width // 2)
    zero = torch.zeros(1, device=device, dtype=torch.long)
    f_ang = rope_axis_angles(zero, fd, theta).expand(height * width, -1)
    h_ang = rope_axis_angles(rows, hd, theta)[:, None, :].expand(height, width, -1).reshape(height * width, -1)
    w_ang = rope_axis_angles(cols, wd, theta)[None, :, :].expand(height, width, -1).reshape(height * width, -1)
    img = torch.cat([f_ang, h_ang, w_ang], dim=1)
    t_idx = torch.arange(txt_len, device=device) + max(height // 2, width // 2)
    txt = torch.cat([rope_axis_angles(t_idx, d, theta) for d in axes_dims], dim=1)
    ang = torch.cat([img, txt], dim=0)
    return torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1).contiguous()
