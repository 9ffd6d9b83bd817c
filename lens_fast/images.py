"""Image post-processing: decoded VAE output -> what ``LensPipeline`` returns.

A leaf module (it imports nothing of lens_fast), shared by the pipeline's reference decode
and the engine's fast decode, so both return the same images.
"""
from __future__ import annotations

import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def decoded_to_output(decoded: torch.Tensor, output_type: str):
    """Decoded images [B, 3, H, W] in [-1, 1] as the reference returns them: PIL (uint8,
    truncated like the reference), ``np`` (HWC float in [0, 1]) or ``pt`` (the decoder's
    output as it is, as the reference returns it)."""
    if output_type == "pil":
        from PIL import Image

        arr = ((decoded.clamp(-1, 1) + 1.0) * (255.0 / 2.0)).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()
        return [Image.fromarray(a) for a in arr]
    if output_type == "pt":
        return decoded
    images = (decoded.clamp(-1, 1) + 1.0) * 0.5
    if output_type != "np":
        raise ValueError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
    return images.permute(0, 2, 3, 1).to("cpu", torch.float32).numpy()
