"""Lens sampling math: empirical mu, exponential time shift, the sigma schedule,
norm-rescaled CFG and the float32 Euler step (the reference's scheduler semantics)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The schedule's shift location for N image tokens and n steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def time_shift_exponential(mu: float, sigmas: np.ndarray, power: float = 1.0) -> np.ndarray:
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0) ** power)


def lens_sigmas(num_steps: int, image_seq_len: int, device=None,
                mu: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [n + 1] float32 ending in 0, timesteps [n] = sigmas * 1000) as the
    reference's FlowMatchEulerDiscreteScheduler computes them (float64 shift, then float32).
    ``mu`` overrides the empirical shift (0 = no shift); the default is the reference's."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_steps!r}")
    mu = compute_empirical_mu(image_seq_len, num_steps) if mu is None else float(mu)
    base = np.linspace(1.0, 1.0 / num_steps, num_steps)
    shifted = torch.from_numpy(time_shift_exponential(mu, base)).to(dtype=torch.float32, device=device)
    timesteps = shifted * 1000.0
    sigmas = torch.cat([shifted, torch.zeros(1, device=shifted.device)])
    return sigmas, timesteps


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``comb = uncond + g (cond - uncond)`` rescaled per token to ``||cond||``
    (norm over channels; scale 1 where ``||comb|| = 0``)."""
    comb = uncond + guidance_scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    comb_norm = torch.norm(comb, dim=-1, keepdim=True)
    scale = torch.where(comb_norm > 0, cond_norm / comb_norm.clamp_min(1e-12), torch.ones_like(comb_norm))
    return comb * scale


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """``x + (sigma_next - sigma) v`` in float32 (returned in float32)."""
    return latents.to(torch.float32) + (sigma_next - sigma) * velocity.to(torch.float32)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Training noising ``x_t = (1 - s) x0 + s eps`` with per-sample sigma [B]."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise
