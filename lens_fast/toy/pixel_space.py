"""Pixel space standing in for the FLUX.2 VAE in the CPU demo, with LensVAE's interface:
``encode`` turns RGB in [-1, 1] into patch tokens ``b c (h p1) (w p2) -> b (h w) (c p1 p2)``
(the same token layout as the real latents), ``decode`` is the exact inverse."""
from __future__ import annotations

import torch

from ..vae import from_tokens, patchify, to_tokens, unpatchify


class PixelSpace:
    def __init__(self, patch: int = 4, channels: int = 3):
        if patch < 1:
            raise ValueError(f"patch={patch}: expected a positive integer")
        self.patch = patch
        self.spatial_factor = patch
        self.token_channels = channels * patch * patch
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def latent_grid(self, height: int, width: int):
        f = self.spatial_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be divisible by {f}, got {height}x{width}")
        return height // f, width // f

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        self.latent_grid(images.shape[2], images.shape[3])
        return to_tokens(patchify(images.float(), self.patch))

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        h, w = self.latent_grid(height, width)
        return unpatchify(from_tokens(tokens.float(), h, w), self.patch)

    def to(self, *args, **kwargs):
        return self
