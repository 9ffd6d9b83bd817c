"""Sampling during training: the inference loop of ``LensPipeline.denoise`` (Lens
sigmas, norm-rescaled CFG with the empty caption as zero features + all-False mask)
on token latents, and PNG grids of reference vs sample."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from lens_fast.atomic import save_image
from lens_fast.pipeline import LensPipeline


@torch.no_grad()
def sample_tokens(model, text: List[torch.Tensor], mask: torch.Tensor, grid, steps: int, guidance: float,
                  seed: int = 0, channels: Optional[int] = None) -> torch.Tensor:
    """Token latents [B, N, C] sampled from ``model`` for the given text features."""
    b = mask.shape[0]
    dev = mask.device
    channels = channels or model.config.in_channels
    g = torch.Generator(device="cpu").manual_seed(seed)
    latents = torch.randn(b, grid[0] * grid[1], channels, generator=g).to(dev)
    if guidance != 1.0:
        text = [torch.cat([t, torch.zeros_like(t)]) for t in text]
        mask = torch.cat([mask, torch.zeros_like(mask)])
    pipe = LensPipeline(transformer=model, lens_defaults=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.denoise(latents, text, mask, tuple(grid), steps, guidance).float()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(path: str, rows: List[torch.Tensor], pad: int = 2) -> str:
    """One row per tensor ([B, 3, H, W] in [-1, 1]), written atomically as PNG."""
    arrays = [to_uint8(r) for r in rows]
    b, h, w, _ = arrays[0].shape
    canvas = np.full((len(rows) * (h + pad) + pad, b * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, arr in enumerate(arrays):
        for j in range(b):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = arr[j]
    return save_image(Image.fromarray(canvas), path, "PNG")
