"""The denoiser forward of the fast path: the model's own code, with every sigma-only
quantity precomputed (see ``schedule``) and the block's ``body`` as the unit that
``torch.compile`` sees.

``FastDenoiser`` runs ``LensTransformer2DModel.run_blocks`` (the loop the eager model
runs, one block's MLP residual fused with the next block's norm1) with the modulations
read from the step tables instead of computed from ``temb``, and hands it a compiled
``LensTransformerBlock.body`` (attention, its gated residual with norm2, the MLPs): a
plain function of (block, tensors), so compiled once it serves all L blocks, since dynamo
lifts the parameters of an inlined module to graph inputs instead of specialising on the
instance. Shapes are static (``dynamic=False``): one graph per (resolution, batch, text
bucket), a bounded set when text lengths are bucketed. The block entries and exits between
bodies are the model's fused adaLN ops, called eagerly (each one kernel).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.transformer import BlockModulation, LensTransformerBlock


def default_compile_mode(device: torch.device) -> Optional[str]:
    """max-autotune without inductor's own CUDA graphs on CUDA (the engine captures
    whole steps itself); inductor's default on the CPU."""
    return "max-autotune-no-cudagraphs" if torch.device(device).type == "cuda" else None


class FastDenoiser:
    """Runs ``LensTransformer2DModel`` from precomputed step constants.

    ``forward(x, txt, rope, text_mask, ref_len, open_len, mods, out_mods)``: x [B, N, C_in]
    image tokens in the model dtype, txt [B, S, dim] the projected text stream, rope the
    joint table [N + S, D/2, 2]; for the blocks the model masks (``block_masks``) the
    reference mask with bucket padding off, as per-row key limits ``ref_len`` [B] int32 or,
    when that is None (a row with holes), as the mask ``text_mask`` [B, S] bool; for the other
    blocks the bucket padding alone, as key limits ``open_len`` [B] (no mask); mods
    [L, 12, B, dim], out_mods [2, B, dim] (scale, shift). Returns [B, N, C_out].
    """

    def __init__(self, model, compile: bool = False, compile_mode: Optional[str] = None):
        self.model = model
        self.compiled = bool(compile)
        self.block_body = LensTransformerBlock.body
        if compile:
            recompile_limit_at_least(64)
            self.block_body = torch.compile(LensTransformerBlock.body, mode=compile_mode, dynamic=False)

    def forward(self, x, txt, rope, text_mask, ref_len, open_len, mods, out_mods):
        model = self.model
        masks, lengths = [], []
        for reference in model.block_masks(text_mask):
            masked = reference is not None and ref_len is None
            masks.append(text_mask if masked else None)
            lengths.append(None if masked else open_len if reference is None else ref_len)
        block_mods = [BlockModulation.from_rows(rows) for rows in mods]
        img, _ = model.run_blocks(model.img_in(x), txt, block_mods, rope, masks, body=self.block_body,
                                  lengths=lengths)
        return model.project_output(img, tuple(out_mods.unbind(0)))

    def __call__(self, *args):
        return self.forward(*args)


def recompile_limit_at_least(n: int) -> None:
    """Raise dynamo's per-function recompile limit to ``n`` (never lowers it): with static
    shapes the block function legitimately holds one graph per (resolution, batch, text
    bucket), e.g. 18 official resolutions x 2 batch sizes, more than the default 8."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < n:
        setattr(cfg, name, n)
