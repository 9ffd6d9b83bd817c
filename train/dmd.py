"""Decoupled DMD, the math of the ``distill`` recipe, as plain tensor functions
(equations, choices and sources: ``train/distill.md``).

Conventions are Lens's: sigma = 1 is pure noise, ``x_s = (1 - s) x0 + s eps``, the
model predicts the velocity ``v = eps - x0``, so its clean-image estimate is
``x0 = x_s - s v`` (one Euler step to sigma 0). The student samples with the
pipeline's own schedule and Euler step (``lens_fast.sampling``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lens_fast.sampling import cfg_combine, euler_step, lens_sigmas

from .loss import logit_normal_mu


def turbo_schedule(steps: int, n_img: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps + 1] ending in 0, model times [steps]) of the pipeline's shifted
    schedule for ``steps`` steps at ``n_img`` image tokens; the times are what the
    pipeline feeds the model (``timesteps / 1000``), bit for bit."""
    sigmas, timesteps = lens_sigmas(steps, n_img, device=device)
    return sigmas, timesteps / 1000


def velocity(model, x: torch.Tensor, t: torch.Tensor, text: Sequence[torch.Tensor], mask: torch.Tensor,
             img_shapes, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The model's velocity at ``x`` (float32); ``t``: [B] model time; ``dtype``: cast
    the inputs first (a frozen model stored in bf16)."""
    if dtype is not None:
        x, t, text = x.to(dtype), t.to(dtype), [f.to(dtype) for f in text]
    return model(hidden_states=x, encoder_hidden_states=list(text), encoder_hidden_states_mask=mask, timestep=t,
                 img_shapes=img_shapes).sample.float()


def x0_estimate(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """``x - sigma v``: the clean image a velocity points to (per-sample or scalar sigma)."""
    s = sigma.view(-1, *([1] * (x.dim() - 1))) if torch.is_tensor(sigma) and sigma.dim() == 1 else sigma
    return x.float() - s * v.float()


@torch.no_grad()
def simulate(model, noise: torch.Tensor, text, mask, img_shapes, sigmas: torch.Tensor, times: torch.Tensor,
             k: int) -> torch.Tensor:
    """Backward simulation: the student's own first ``k`` Euler steps from ``noise``
    (sigma 1) with the pipeline's schedule; returns x at ``sigmas[k]`` (float32)."""
    x = noise.float()
    b = x.shape[0]
    for i in range(k):
        x = euler_step(x, velocity(model, x, times[i].expand(b), text, mask, img_shapes), sigmas[i], sigmas[i + 1])
    return x


def generate(model, x_k: torch.Tensor, k: int, text, mask, img_shapes, sigmas: torch.Tensor,
             times: torch.Tensor) -> torch.Tensor:
    """The student's image from ``x_k``: one Euler step from ``sigmas[k]`` to 0 (what the
    sampler returns when it stops there), with gradients when they are on."""
    v = velocity(model, x_k, times[k].expand(x_k.shape[0]), text, mask, img_shapes)
    return euler_step(x_k, v, sigmas[k], sigmas[-1])


def truncated_logit_normal(u: torch.Tensor, mu: float, std: float, low: float, high: float) -> torch.Tensor:
    """sigma = sigmoid(mu + std z), z ~ N(0, 1) restricted to sigma in [low, high], by the
    inverse CDF of ``u`` ~ U(0, 1) (float32 [B])."""
    def cdf(s):
        return torch.special.ndtr((torch.logit(torch.tensor(float(s), dtype=torch.float64)) - mu) / std)
    a, b = cdf(low), cdf(high)
    p = (a + u.double() * (b - a)).clamp(1e-12, 1 - 1e-12)
    return torch.sigmoid(mu + std * torch.special.ndtri(p)).float().clamp(low, high)


def renoise_sigmas(u: torch.Tensor, n_img: int, loss_cfg, low: float, high: float) -> torch.Tensor:
    """Re-noising sigmas from the teacher's own training distribution (the logit-normal
    of ``loss_cfg`` at ``n_img`` tokens), kept inside [low, high]."""
    return truncated_logit_normal(u, logit_normal_mu(n_img, loss_cfg.mu_points), loss_cfg.logit_std, low, high)


def unconditional(text: Sequence[torch.Tensor], mask: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Lens's empty negative prompt: zero features and an all-False mask."""
    return [torch.zeros_like(f) for f in text], torch.zeros_like(mask)


@torch.no_grad()
def teacher_x0(model, x: torch.Tensor, sigma: torch.Tensor, text, mask, img_shapes, guidance: Optional[float],
               dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The teacher's conditional x0 at (x, sigma) and, with ``guidance``, its guided x0:
    [cond; uncond] as one batch, Lens's norm-rescaled CFG on the velocities."""
    if guidance is None:
        return x0_estimate(x, velocity(model, x, sigma, text, mask, img_shapes, dtype), sigma), None
    u_text, u_mask = unconditional(text, mask)
    both = velocity(model, torch.cat([x, x]), torch.cat([sigma, sigma]),
                    [torch.cat([c, u]) for c, u in zip(text, u_text)], torch.cat([mask, u_mask]), img_shapes, dtype)
    cond, uncond = both[:x.shape[0]], both[x.shape[0]:]
    return x0_estimate(x, cond, sigma), x0_estimate(x, cfg_combine(cond, uncond, guidance), sigma)


def normalizer(x_gen: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """DMD's per-sample step size: the mean absolute distance from the student's image
    to the teacher's estimate ([B, 1, 1], at least 1e-6)."""
    return (x_gen - reference).abs().mean(dim=tuple(range(1, x_gen.dim())), keepdim=True).clamp_min(1e-6)


def dmd_direction(x_gen: torch.Tensor, real_dm: torch.Tensor, fake_dm: torch.Tensor, cond_ca: torch.Tensor,
                  guided_ca: torch.Tensor, dm_weight: float, ca_weight: float
                  ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The gradient the student's image receives (descent moves it by minus this):
    ``dm_weight (fake - real) / n_DM + ca_weight (cond - guided) / n_CA``, x0 estimates
    at each term's own re-noising sigma, each term normalised by the distance to the
    teacher's conditional estimate there. Also the terms' mean magnitudes."""
    dm = (fake_dm - real_dm) / normalizer(x_gen, real_dm)
    ca = (cond_ca - guided_ca) / normalizer(x_gen, cond_ca)
    return dm_weight * dm + ca_weight * ca, {"dm_size": dm.abs().mean(), "ca_size": ca.abs().mean()}


def proxy_loss(x_gen: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``0.5 mean((x - stopgrad(x - direction))^2)``: its gradient with respect to the
    student's image is ``direction / x.numel()``."""
    return 0.5 * torch.mean((x_gen.float() - (x_gen - direction).detach().float()) ** 2)

