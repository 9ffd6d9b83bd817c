"""The rectified-flow loss of Lens: logit-normal sigmas whose location grows linearly
with the image-token count, caption dropout to the exact unconditional input that
inference feeds (zero features, all-False mask), ``x_t = (1 - s) x0 + s eps`` and MSE
against ``eps - x0``. All draws come from generators fixed by (seed, step, data rank),
so a step's loss does not depend on the world size or on a resume."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from lens_fast.sampling import add_noise

NOISE, SIGMA, DROPOUT = 0, 1, 2  # generator streams


def step_generator(seed: int, step: int, data_rank: int, stream: int, device) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(step), int(data_rank), int(stream)]).generate_state(2)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def logit_normal_mu(n_img: int, mu_points: Sequence[Sequence[float]]) -> float:
    """mu on the line through (n1, mu1) and (n2, mu2), at n image tokens."""
    (n1, m1), (n2, m2) = mu_points
    return float(m1 + (m2 - m1) * (n_img - n1) / (n2 - n1))


def sample_sigmas(batch: int, n_img: int, mu_points, logit_std: float, generator: torch.Generator,
                  device) -> torch.Tensor:
    """sigma = sigmoid(mu(n) + std * z), z ~ N(0, 1); float32 [batch]."""
    z = torch.randn(batch, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(logit_normal_mu(n_img, mu_points) + logit_std * z)


def drop_captions(text: List[torch.Tensor], mask: torch.Tensor, p: float,
                  generator: torch.Generator) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Replace each row's caption with probability p by the unconditional input of
    inference (zero features, all-False mask). Returns (text, mask, dropped [B] bool)."""
    b = mask.shape[0]
    dropped = torch.rand(b, generator=generator, device=generator.device) < p
    dropped = dropped.to(mask.device)
    if p == 0 or not bool(dropped.any()):
        return text, mask, dropped
    keep = (~dropped).view(b, 1, 1)
    return [t * keep.to(t.dtype) for t in text], mask & ~dropped.view(b, 1), dropped


def flow_matching_loss(model, latents: torch.Tensor, text: List[torch.Tensor], mask: torch.Tensor,
                       img_shapes, loss_cfg, seed: int, step: int, data_rank: int,
                       streams: Tuple[int, int, int] = (NOISE, SIGMA, DROPOUT)) -> torch.Tensor:
    """Mean squared error of the predicted velocity on one micro-batch (float32).
    ``streams``: the generator streams of the noise, sigma and dropout draws (a recipe
    that runs this loss several times per step gives each run its own)."""
    b, n, _ = latents.shape
    dev = latents.device
    x0 = latents.float()
    noise_stream, sigma_stream, dropout_stream = streams
    noise = torch.randn(x0.shape, generator=step_generator(seed, step, data_rank, noise_stream, dev), device=dev)
    sigma = sample_sigmas(b, n, loss_cfg.mu_points, loss_cfg.logit_std,
                          step_generator(seed, step, data_rank, sigma_stream, dev), dev)
    text, mask, _ = drop_captions(text, mask, loss_cfg.caption_dropout,
                                  step_generator(seed, step, data_rank, dropout_stream, dev))
    x_t = add_noise(x0, noise, sigma)
    pred = model(hidden_states=x_t, encoder_hidden_states=text, encoder_hidden_states_mask=mask, timestep=sigma,
                 img_shapes=img_shapes).sample
    return torch.mean((pred.float() - (noise - x0)) ** 2)
