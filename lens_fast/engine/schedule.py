"""Everything about a sampling call that does not depend on the latents, computed once.

A Lens step's timestep embedding and every block's modulation vectors (``img_mod``,
``txt_mod``, ``norm_out``) depend only on sigma, so for a schedule of n steps they are
n rows that can be built in a few batched matmuls before the loop. The text stream's
input projection (``txt_norm`` + ``txt_in``) depends only on the prompt, so it is run
once per call instead of once per step. The loop then only copies row i of each table
into the static buffers the (possibly graph-captured) step reads.

Text-length bucketing. The reference masks padded text keys in the FIRST block only
(``mask_every_block=False``): blocks 1.. attend to the reference's own padding (zero
features of an empty negative prompt, pad positions of the shorter prompt). Padding
added here to reach a multiple of ``text_bucket`` does not exist in the reference, so it
must be invisible in EVERY block:

    block 0:   key valid = reference mask AND bucket-valid
    blocks 1..: key valid = bucket-valid

Queries at bucket-pad positions compute finite garbage that no real token ever reads
(every per-token op — norms, MLP, projections — is row-local), so results equal the
unbucketed run up to floating-point reduction order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..sampling import lens_sigmas


@dataclass
class StepTables:
    """Per-step constants of one schedule, on the model's device.

    ``block_mods`` [n, L, 12, dim] (model dtype): rows 0-5 are the image stream's
    (shift1, scale1, gate1, shift2, scale2, gate2), rows 6-11 the text stream's.
    ``out_mods`` [n, 2, dim]: ``norm_out``'s (scale, shift). ``dt`` [n] float32:
    ``sigma_{i+1} - sigma_i``. ``timesteps`` [n] float32 (sigma * 1000, for callbacks).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    dt: torch.Tensor
    block_mods: torch.Tensor
    out_mods: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.dt.shape[0])


@torch.no_grad()
def build_step_tables(model, num_steps: int, image_seq_len: int, device=None, mu=None) -> StepTables:
    """Tables for ``num_steps`` steps at ``image_seq_len`` image tokens (the shift mu
    depends on both). Arithmetic as the reference: timestep ``t.to(dtype) / 1000``,
    ``temb`` in the model dtype, ``Linear(SiLU(temb))`` per block and stream."""
    device = model.device if device is None else torch.device(device)
    dtype = model.dtype
    sigmas, timesteps = lens_sigmas(num_steps, image_seq_len, device=device, mu=mu)
    sigma_in = timesteps.to(dtype) / 1000
    temb = model.time_text_embed(sigma_in, dtype)                      # [n, dim]
    rows = []
    for block in model.transformer_blocks:
        rows.append(torch.stack([block.img_mod(temb), block.txt_mod(temb)], 1))  # [n, 2, 6*dim]
    dim = temb.shape[-1]
    block_mods = torch.stack(rows, 1).reshape(num_steps, len(rows), 12, dim).contiguous()
    head = model.norm_out.linear(torch.nn.functional.silu(temb).to(dtype))     # [n, 2*dim]
    out_mods = head.reshape(num_steps, 2, dim).contiguous()
    dt = (sigmas[1:] - sigmas[:-1]).contiguous()
    return StepTables(sigmas=sigmas, timesteps=timesteps, dt=dt, block_mods=block_mods, out_mods=out_mods)


def bucket_length(text_len: int, text_bucket: Optional[int]) -> int:
    """Smallest multiple of ``text_bucket`` >= ``text_len`` (at least one bucket);
    ``None`` or 1 keeps the length."""
    if text_bucket is None or text_bucket == 1:
        return text_len
    if not isinstance(text_bucket, int) or isinstance(text_bucket, bool) or text_bucket < 1:
        raise ValueError(f"text_bucket={text_bucket!r}: expected a positive integer or None")
    return max(text_bucket, -(-text_len // text_bucket) * text_bucket)


@torch.no_grad()
def project_text(model, feats: List[torch.Tensor]) -> torch.Tensor:
    """The text stream's input, ``txt_in(concat(txt_norm_k(feat_k)))`` [B, S, dim],
    exactly as the model's forward computes it."""
    if model.config.multi_layer_encoder_feature:
        txt = torch.cat([norm(f) for norm, f in zip(model.txt_norm, feats)], dim=-1)
    else:
        txt = model.txt_norm(feats[0])
    return model.txt_in(txt)


def bucket_text(txt: torch.Tensor, mask: torch.Tensor, text_bucket: Optional[int]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad the projected text [B, S, dim] with zero rows up to the bucket length.

    Returns ``(txt [B, S_b, dim], first_block_mask [B, S_b], later_blocks_mask [B, S_b])``
    as described in the module docstring (True = key is attended to).
    """
    if txt.dim() != 3 or mask is None or tuple(mask.shape) != tuple(txt.shape[:2]):
        raise ValueError(f"text [B, S, dim] and mask [B, S] must agree; got {tuple(txt.shape)} and "
                         f"{None if mask is None else tuple(mask.shape)}")
    b, s, _ = txt.shape
    target = bucket_length(s, text_bucket)
    extra = target - s
    valid = torch.ones(b, target, dtype=torch.bool, device=txt.device)
    if extra:
        valid[:, s:] = False
        txt = torch.cat([txt, txt.new_zeros(b, extra, txt.shape[2])], 1)
        mask = torch.cat([mask.bool(), torch.zeros(b, extra, dtype=torch.bool, device=mask.device)], 1)
    first = mask.bool().to(txt.device) & valid
    return txt.contiguous(), first, valid
