"""DiffusionNFT, the math of the ``rl`` recipe, as plain tensor functions (equations,
choices and sources: ``train/rl.md``).

Conventions are Lens's: sigma = 1 is pure noise, ``x_s = (1 - s) x0 + s eps``, the
model predicts the velocity ``v = eps - x0``, so its clean-image estimate is
``x0 = x_s - s v``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from lens_fast.sampling import cfg_combine

from .dmd import unconditional, velocity


def group_advantages(rewards: torch.Tensor, global_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Rewards [G, K] (K images of each of G prompts) -> advantages [G, K]: each reward
    minus its group's mean, over the standard deviation of the whole batch
    (``global_std``) or of its own group, plus ``eps`` (population std)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, images per group], got shape {tuple(rewards.shape)}")
    r = rewards.double()
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(unbiased=False) if global_std else r.std(dim=1, unbiased=False, keepdim=True)
    return (centred / (std + eps)).to(rewards.dtype)


def optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """The optimality probability r in [0, 1] of each sample: ``0.5 + 0.5 clip(A, -c, c) / c``
    (0.5: as good as its group's mean)."""
    if clip <= 0:
        raise ValueError(f"advantage clip={clip}: expected a positive number")
    return 0.5 + 0.5 * advantages.clamp(-clip, clip) / clip


def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(v+, v-) = ((1 - beta) v_old + beta v_theta, (1 + beta) v_old - beta v_theta): the
    positive and negative policies the current model implies around the old one."""
    v_old = v_old.detach()
    return (1 - beta) * v_old + beta * v_theta, (1 + beta) * v_old - beta * v_theta


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def x0_error(x0_pred: torch.Tensor, x0: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """Per-sample ``mean((x0_pred - x0)^2)``; ``adaptive``: divided by the detached
    ``mean|x0_pred - x0|`` (at least 1e-5), DiffusionNFT's adaptive loss weight."""
    diff = x0_pred.float() - x0.float()
    err = _per_sample(diff ** 2)
    if adaptive:
        err = err / _per_sample(diff.detach().abs().double()).clamp_min(1e-5).float()
    return err


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
             r: torch.Tensor, beta: float, adaptive: bool = True, v_ref: Optional[torch.Tensor] = None,
             kl_weight: float = 0.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The DiffusionNFT objective on one micro-batch (float32 scalar) and its parts:
    ``mean(r L+ + (1 - r) L-) / beta + kl_weight mean((v_theta - v_ref)^2)``, where L+-
    are the x0-space errors (``x0_error``) of the positive and negative implicit policies
    at ``x_t`` (sigma [B], r [B]); ``v_ref``: the frozen reference policy's velocity."""
    s = sigma.float().view(-1, *([1] * (x_t.dim() - 1)))
    v_pos, v_neg = implicit_policies(v_theta.float(), v_old.float(), beta)
    pos = x0_error(x_t.float() - s * v_pos, x0, adaptive)
    neg = x0_error(x_t.float() - s * v_neg, x0, adaptive)
    r = r.float()
    policy = torch.mean(r * pos + (1 - r) * neg) / beta
    metrics = {"policy_loss": policy.detach(),
               "old_deviation": torch.mean((v_theta.detach().float() - v_old.float()) ** 2)}
    loss = policy
    if v_ref is not None:
        kl = torch.mean(_per_sample((v_theta.float() - v_ref.float()) ** 2))
        loss = loss + kl_weight * kl
        metrics["kl"] = kl.detach()
    return loss, metrics


def policy_velocity(model, x: torch.Tensor, sigma: torch.Tensor, text: Sequence[torch.Tensor], mask: torch.Tensor,
                    img_shapes, guidance: float, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The velocity the sampler follows (float32): the conditional one, or with
    ``guidance`` != 1 Lens's norm-rescaled CFG of [cond; uncond] run as one batch."""
    if guidance == 1.0:
        return velocity(model, x, sigma, text, mask, img_shapes, dtype)
    u_text, u_mask = unconditional(text, mask)
    both = velocity(model, torch.cat([x, x]), torch.cat([sigma, sigma]),
                    [torch.cat([c, u]) for c, u in zip(text, u_text)], torch.cat([mask, u_mask]), img_shapes, dtype)
    return cfg_combine(both[:x.shape[0]], both[x.shape[0]:], guidance)


def old_decay(step: int, flat: int, rate: float, cap: float) -> float:
    """The old policy's soft-update weight after ``step``: 0 for the first ``flat`` steps,
    then ``rate`` per step up to ``cap`` (``old <- d old + (1 - d) theta``)."""
    return 0.0 if step < flat else min(cap, (step - flat) * rate)


@torch.no_grad()
def soft_update(target: Sequence[torch.Tensor], source: Sequence[torch.Tensor], decay: float) -> None:
    """``target <- decay target + (1 - decay) source`` elementwise (local tensors; the
    source is cast to each target's dtype after the blend in float32)."""
    for t, s in zip(target, source):
        t.copy_(torch.lerp(s.float(), t.float(), decay) if decay else s)
