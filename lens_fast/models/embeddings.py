"""Lens's position and timestep embeddings: the 3-axis RoPE table of the joint
[image ; text] sequence and the sinusoidal timestep embedding, in float32 as the reference
computes them (torch only; a few microseconds per call, the model caches the RoPE table)."""
from __future__ import annotations

import math
from typing import Sequence

import torch


def timestep_embedding(sigma: torch.Tensor, dim: int = 256, scale: float = 1000.0,
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


def rope_table(height: int, width: int, txt_len: int, axes_dims: Sequence[int],
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
