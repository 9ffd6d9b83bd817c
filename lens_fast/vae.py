"""The Lens latent space: FLUX.2 VAE (``diffusers.AutoencoderKLFlux2``) plus the
patchify and BatchNorm normalisation that turn its 32-channel latents into the
denoiser's 128-channel token sequence.

Token layout: ``b c (h p1) (w p2) -> b (h w) (c p1 p2)``, normalised with the VAE's
BatchNorm running statistics in the patchified (128-channel) space. ``PixelSpace`` in
``lens_fast.toy`` implements the same interface over raw RGB for the CPU demo.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors import SafetensorError

from .errors import CorruptFile, MissingFile, one_line
from .models.loading import check_weights_folder, resolve_dtype


def patchify(latents: torch.Tensor, p: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*p*p, H/p, W/p] in (c, p1, p2) channel order."""
    b, c, h, w = latents.shape
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
    x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, cp, h, w = x.shape
    c = cp // (p * p)
    x = x.reshape(b, c, p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, h * p, w * p)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h*w, C]."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, C] -> [B, C, h, w]."""
    b, n, c = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens cannot form a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def load_flux2_vae(path: str, torch_dtype=None, device="cpu", variant: Optional[str] = None):
    """diffusers' ``AutoencoderKLFlux2`` from a folder, safetensors only, in eval mode;
    one-line errors for a missing or unusable folder."""
    from diffusers import AutoencoderKLFlux2

    if not os.path.isdir(path):
        raise MissingFile(f"VAE folder {path} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingFile(f"VAE folder {path} has no config.json")
    check_weights_folder(path, "the VAE")
    kwargs = {"use_safetensors": True}
    dtype = resolve_dtype(torch_dtype)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if variant is not None:
        kwargs["variant"] = variant
    try:
        vae = AutoencoderKLFlux2.from_pretrained(path, **kwargs)
    except OSError as e:  # a weight file (or the variant's) is missing: an OSError, as diffusers raises
        raise MissingFile(f"cannot load the VAE from {path}: {one_line(e)}") from None
    except (ValueError, RuntimeError, SafetensorError) as e:
        raise CorruptFile(f"cannot load the VAE from {path}: {one_line(e)}") from None
    return vae.to(device).eval()


class LensVAE:
    """FLUX.2 VAE with the Lens latent normalisation.

    ``encode(images)`` takes [B, 3, H, W] in [-1, 1] (H, W multiples of 16) and returns
    normalised tokens [B, (H/16)(W/16), 128] (posterior mode); ``decode(tokens, H, W)``
    is the inverse, returning images in [-1, 1].
    """

    spatial_factor = 16  # VAE /8, then 2x2 patchify

    def __init__(self, vae):
        self.vae = vae
        if not hasattr(vae, "bn"):
            raise TypeError(f"{type(vae).__name__} has no BatchNorm 'bn' latent statistics; "
                            "expected diffusers.AutoencoderKLFlux2")
        self.patch = 2
        self.latent_channels = vae.config.latent_channels
        self.token_channels = self.latent_channels * self.patch * self.patch

    @classmethod
    def from_pretrained(cls, folder: str, subfolder: Optional[str] = "vae", torch_dtype=None, device="cpu"):
        path = os.path.join(folder, subfolder) if subfolder else folder
        return cls(load_flux2_vae(path, torch_dtype, device))

    # -- normalisation -----------------------------------------------------------------
    def _stats(self, like: torch.Tensor):
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(device=like.device, dtype=like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        return mean, std.to(device=like.device, dtype=like.dtype)

    @property
    def dtype(self):
        return next(self.vae.parameters()).dtype

    @property
    def device(self):
        return next(self.vae.parameters()).device

    def to(self, *args, **kwargs):
        self.vae.to(*args, **kwargs)
        return self

    def latent_grid(self, height: int, width: int):
        if height % self.spatial_factor or width % self.spatial_factor:
            raise ValueError(f"height and width must be divisible by {self.spatial_factor}, got {height}x{width}")
        return height // self.spatial_factor, width // self.spatial_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        self.latent_grid(images.shape[2], images.shape[3])
        latents = self.vae.encode(images.to(self.device, self.dtype)).latent_dist.mode()
        x = patchify(latents, self.patch)
        mean, std = self._stats(x)
        return to_tokens((x - mean) / std)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        h, w = self.latent_grid(height, width)
        x = from_tokens(tokens, h, w).to(self.dtype)
        mean, std = self._stats(x)
        # The reference's exact arithmetic: x / (1 / std) - (-mean).
        latents = unpatchify(x / (1.0 / std) - (-mean), self.patch)
        return self.vae.decode(latents).sample
