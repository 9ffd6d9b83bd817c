"""VAE decode for the fast path: channels_last, compiled, tiled above a size threshold.

Token latents are de-normalised and unpatchified exactly as ``LensVAE.decode``; the
32-channel latent [B, 32, H/8, W/8] is then decoded whole when its area is at most
``max_untiled_area`` latent pixels, else in overlapping ``tile`` x ``tile`` latent tiles
(``overlap`` latent pixels shared by neighbours; the last tile of a row/column is aligned
to the border, so every tile has the same shape and compiles once). Each decoded tile is
blended in pixel space with separable linear ramps across its overlaps with neighbours
and the sum is normalised by the summed weights.

Tiling is an approximation: the FLUX.2 decoder's GroupNorms and its mid-block
self-attention see one tile instead of the whole latent. The blending itself is exact (a
decoder without global ops gives the untiled result to 5e-7; tested). Measured on the
tiny random FLUX.2-config VAE of the tests (``tests/test_engine.py``: latent 32 x 24,
tile 24, overlap 12; decoded values span about [-3, 3] with std 0.30): max |tiled -
untiled| = 0.24, mean 0.013; the test bounds them at 0.35 / 0.02. Tile and overlap scale
the error: on the 48 x 40 latent, tile 32 / overlap 16 gives max 0.32, mean 0.013, tile 40
/ overlap 16 max 0.28, mean 0.007, tile 24 / overlap 8 max 0.68, mean 0.037. A trained VAE
(smoother statistics) is expected to do better; measure it on the real checkpoint before
lowering the threshold. The defaults (untiled up to 160^2 latent pixels
= 1280^2 px of area; tile 128 = 1024 px; overlap 32 = 256 px) leave every official
1024-base bucket untiled (largest area 1472 x 736 = 16928 latent px) and tile the
1440-base buckets: 1440^2 into 2 x 2 tiles, 2080 x 1040 into 3 x 2.
Peak decoder activation memory scales with the tile area: a 1024^2-pixel tile in bf16
holds roughly 4 live [1, 128, 1024, 1024] tensors at the last up-block (~1.1 GB)
instead of ~2.1 GB for a whole 1440^2 image.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..vae import from_tokens, unpatchify

VAE_SCALE = 8  # FLUX.2 VAE: one latent pixel is 8 x 8 image pixels


def tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles of length ``tile`` covering [0, size) with at least
    ``overlap`` shared between neighbours; the last tile ends at ``size``."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap={overlap} must be in [0, tile={tile})")
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp(length: int, start: int, tile_px: int, total: int, overlap_px: int, device, dtype) -> torch.Tensor:
    """1-D blend weight of one tile: rises over ``overlap_px`` after its start and falls
    over ``overlap_px`` before its end, except at the image borders (weight 1 there)."""
    pos = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(length, device=device, dtype=torch.float32)
    if overlap_px > 0:
        if start > 0:
            w = torch.minimum(w, pos / overlap_px)
        if start + tile_px < total:
            w = torch.minimum(w, (length - pos) / overlap_px)
    return w.to(dtype)


class FastDecoder:
    """Decode token latents [B, N, 128] to images [B, 3, H, W] in [-1, 1]."""

    def __init__(self, lens_vae, tile: int = 128, overlap: int = 32, max_untiled_area: Optional[int] = 160 * 160,
                 compile: bool = False, channels_last: bool = False):
        if tile < 1 or not 0 <= overlap < tile:
            raise ValueError(f"tile={tile}, overlap={overlap}: expected tile >= 1 and 0 <= overlap < tile")
        self.lens_vae = lens_vae
        self.tile, self.overlap = int(tile), int(overlap)
        self.max_untiled_area = max_untiled_area  # None: never tile
        self.channels_last = bool(channels_last)
        if channels_last:
            lens_vae.vae.to(memory_format=torch.channels_last)
        # dynamic=None: the first shape compiles static, a second one recompiles once with
        # dynamic spatial sizes (convolutions run as cuDNN calls either way), so untiled
        # sizes do not each cost a compile; tiles all share one shape.
        self._decode_fn = torch.compile(self._decode_latents, dynamic=None) if compile else self._decode_latents

    def release(self) -> None:
        """Put the VAE back in the default memory format."""
        if self.channels_last:
            self.lens_vae.vae.to(memory_format=torch.contiguous_format)
            self.channels_last = False

    def _decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.lens_vae.vae
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        return vae.decoder(z)

    def latents(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Token latents -> the VAE's 32-channel latent [B, 32, H/8, W/8] (de-normalised,
        with the reference's exact arithmetic ``x / (1 / std) - (-mean)``)."""
        lv = self.lens_vae
        h, w = lv.latent_grid(height, width)
        x = from_tokens(tokens, h, w).to(lv.dtype)
        bn = lv.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(device=x.device, dtype=x.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + lv.vae.config.batch_norm_eps).to(x.device, x.dtype)
        return unpatchify(x / (1.0 / std) - (-mean), lv.patch)

    def needs_tiling(self, z: torch.Tensor) -> bool:
        return self.max_untiled_area is not None and z.shape[-2] * z.shape[-1] > self.max_untiled_area

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor, tiled: Optional[bool] = None) -> torch.Tensor:
        """Decode a 32-channel latent; ``tiled`` forces (True) or forbids (False) tiling,
        None applies the size threshold."""
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        tiled = self.needs_tiling(z) if tiled is None else tiled
        if not tiled:
            return self._decode_fn(z)
        b, _, hl, wl = z.shape
        th, tw = min(self.tile, hl), min(self.tile, wl)
        rows, cols = tile_starts(hl, th, min(self.overlap, th - 1)), tile_starts(wl, tw, min(self.overlap, tw - 1))
        s, ov = VAE_SCALE, self.overlap * VAE_SCALE
        out = weight = None
        for r in rows:
            wr = _ramp(th * s, r * s, th * s, hl * s, ov, z.device, torch.float32)
            for c in cols:
                tile = self._decode_fn(z[:, :, r:r + th, c:c + tw]).float()
                wc = _ramp(tw * s, c * s, tw * s, wl * s, ov, z.device, torch.float32)
                wt = wr[:, None] * wc[None, :]
                if out is None:
                    out = tile.new_zeros(b, tile.shape[1], hl * s, wl * s)
                    weight = tile.new_zeros(hl * s, wl * s)
                out[:, :, r * s:(r + th) * s, c * s:(c + tw) * s] += tile * wt
                weight[r * s:(r + th) * s, c * s:(c + tw) * s] += wt
        return (out / weight).to(z.dtype)

    def decode(self, tokens: torch.Tensor, height: int, width: int, tiled: Optional[bool] = None) -> torch.Tensor:
        return self.decode_latents(self.latents(tokens, height, width), tiled).contiguous()
