"""The GPU memory arithmetic of the fast path, written out as code (see the package
docstring for the 1440^2 / 24 GB walk-through). An estimate for planning, not a
measurement: ``bench/pipeline.py`` reports the measured peak of every case.
"""
from __future__ import annotations

from typing import Dict

GB = 1e9

# Official shapes (lens-reference.md; GPT-OSS-20B; diffusers AutoencoderKLFlux2 defaults).
DENOISER_PARAMS = 4.104e9
DIM, MLP_HIDDEN, LAYERS, IN_CHANNELS = 1536, 4096, 48, 128
TEXT_LAYERS_USED = 4          # selected_layer_index (5, 11, 17, 23)
ENC_HIDDEN = 2880
GPT_OSS_LAYER_PARAMS = 0.822e9    # 32 experts x (2880 x 5760 + 2880 x 2880) + attention
GPT_OSS_LAYERS = 24
GPT_OSS_EMBED_PARAMS = 201088 * 2880
VAE_PARAMS = 84.0e6
# Live [B, L, dim]-sized tensors at a block's peak: residual streams, normed input, QKV
# (3), q/k/v after norm + RoPE (3), attention output, and at the MLP w1, w3 and their
# product (3 x 4096/1536), plus float32 statistics of the reference norms: ~20.
BLOCK_LIVE_TENSORS = 20
# Live full-resolution decoder tensors at the VAE's peak: the 256-channel upsampled map
# entering the last up-block, its GroupNorm output and its SiLU output.
VAE_LIVE_256CH_MAPS = 3


def estimate_peak_memory(height: int, width: int, cfg: bool = True, text_len: int = 512, steps: int = 20,
                         offload: str = "sequential", vae_tile_px: int = 1024, bytes_per: int = 2
                         ) -> Dict[str, float]:
    """Bytes (as GB) of each resident item and the phase peaks for one image.

    ``offload``: 'none' (text encoder resident), 'model' (moved in whole to encode) or
    'sequential' (one layer at a time). ``vae_tile_px``: tile side in pixels (0: untiled).
    """
    if offload not in ("none", "model", "sequential"):
        raise ValueError(f"offload={offload!r}; expected 'none', 'model' or 'sequential'")
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
    batch = 2 if cfg else 1
    tokens = (height // 16) * (width // 16) + text_len
    te_full = (GPT_OSS_LAYERS * GPT_OSS_LAYER_PARAMS + GPT_OSS_EMBED_PARAMS) * bytes_per / GB
    te_streamed = (GPT_OSS_LAYER_PARAMS + GPT_OSS_EMBED_PARAMS) * bytes_per / GB
    tile_h = min(height, vae_tile_px) if vae_tile_px else height
    tile_w = min(width, vae_tile_px) if vae_tile_px else width
    item = {
        "denoiser_weights": DENOISER_PARAMS * bytes_per / GB,
        "denoiser_activations": BLOCK_LIVE_TENSORS * batch * tokens * DIM * bytes_per / GB,
        "step_tables": steps * LAYERS * 12 * DIM * bytes_per / GB,
        "text_features": TEXT_LAYERS_USED * batch * text_len * ENC_HIDDEN * bytes_per / GB,
        "vae_weights": VAE_PARAMS * bytes_per / GB,
        "vae_activations": VAE_LIVE_256CH_MAPS * 256 * tile_h * tile_w * bytes_per / GB,
        "vae_blend_canvas": (2 * 3 * height * width * 4 / GB) if (tile_h, tile_w) != (height, width) else 0.0,
        "text_encoder_resident": te_full if offload == "none" else 0.0,
        "text_encoder_while_encoding": {"none": 0.0, "model": te_full, "sequential": te_streamed}[offload],
    }
    resident = (item["denoiser_weights"] + item["step_tables"] + item["text_features"] + item["vae_weights"]
                + item["text_encoder_resident"])
    # The CUDA graph pool keeps the step's intermediates allocated after the loop.
    item["peak_encode"] = resident + item["text_encoder_while_encoding"]
    item["peak_denoise"] = resident + item["denoiser_activations"]
    item["peak_decode"] = resident + item["denoiser_activations"] + item["vae_activations"] + item["vae_blend_canvas"]
    item["peak"] = max(item["peak_encode"], item["peak_denoise"], item["peak_decode"])
    return item
