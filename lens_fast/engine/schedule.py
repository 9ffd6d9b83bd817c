"""Everything about a sampling call that does not depend on the latents, computed once.

A Lens step's modulation vectors (every block's and the output head's) depend only on
sigma, so for a schedule of n steps ``LensTransformer2DModel.modulations`` computes them
as n rows in a few batched matmuls before the loop. The text stream's input
(``LensTransformer2DModel.embed_text``) depends only on the prompt, so the engine runs it
once per call instead of once per step. The loop then only copies row i of each table
into the static buffers the (possibly graph-captured) step reads.

Text-length bucketing. The reference masks padded text keys in the FIRST block only
(``mask_every_block=False``): blocks 1.. attend to the reference's own padding (zero
features of an empty negative prompt, pad positions of the shorter prompt). Padding
added here to reach a multiple of ``text_bucket`` does not exist in the reference, so it
must be invisible in EVERY block. ``bucket_text`` gives two masks and the model's
``block_masks`` rule picks per block:

    a block the model masks:      key valid = reference mask AND bucket-valid
    a block the model leaves open: key valid = bucket-valid

Queries at bucket-pad positions compute finite garbage that no real token ever reads
(every per-token op — norms, MLP, projections — is row-local), so results equal the
unbucketed run up to floating-point reduction order.

No dense masks where the reference has none. Both masks are prefixes of every row in the
usual case (right-padded prompts, an empty negative prompt: length 0; bucket padding at the
end), so ``key_limits`` turns them into per-row key limits [B], which attention takes
without any mask (``joint_attention(txt_len=...)``: SDPA slices the keys, the Triton kernel
bounds its key loop). Only a reference mask with holes stays a dense mask (block 0 only,
unless ``mask_every_block``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

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
def build_step_tables(model, num_steps: int, image_seq_len: int, device=None, mu=None,
                      schedule=None) -> StepTables:
    """Tables for ``num_steps`` steps at ``image_seq_len`` image tokens (the shift mu
    depends on both): the model's ``modulations`` for the schedule's sigmas, with the
    reference's arithmetic (timestep ``t.to(dtype) / 1000``, the model dtype). ``schedule``:
    (sigmas, timesteps) from a scheduler, used instead of Lens's schedule."""
    device = model.device if device is None else torch.device(device)
    dtype = model.dtype
    if schedule is None:
        sigmas, timesteps = lens_sigmas(num_steps, image_seq_len, device=device, mu=mu)
    else:  # the pipeline scheduler's (sigmas [n + 1], timesteps [n])
        sigmas, timesteps = (t.to(device=device, dtype=torch.float32) for t in schedule)
    mods = model.modulations(timesteps.to(dtype) / 1000, dtype)
    block_mods = torch.stack([m.rows() for m in mods.blocks], 0).permute(2, 0, 1, 3).contiguous()
    out_mods = torch.stack(mods.out, 1).contiguous()                     # [n, 2, dim]
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


def key_limits(text_mask: torch.Tensor, text_valid: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """``bucket_text``'s two masks as per-row key limits, int32 [B]: (the reference mask's
    lengths, or None when a row has a hole, so it stays a mask; the bucket-valid lengths,
    always a prefix). One host synchronisation (the prefix check), before the loop."""
    ref_len = text_mask.sum(1, dtype=torch.int32)
    prefix = torch.arange(text_mask.shape[1], device=text_mask.device) < ref_len[:, None]
    return (ref_len if bool(torch.equal(prefix, text_mask)) else None), text_valid.sum(1, dtype=torch.int32)


def bucket_text(txt: torch.Tensor, mask: torch.Tensor, text_bucket: Optional[int]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad the projected text [B, S, dim] with zero rows up to the bucket length.

    Returns ``(txt [B, S_b, dim], reference mask AND bucket-valid [B, S_b], bucket-valid
    [B, S_b])``, the two masks of the module docstring (True = key is attended to).
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
