"""Attention processors for ``LensJointAttention``, in diffusers' calling convention.

diffusers' Lens calls ``processor(attn, hidden_states, encoder_hidden_states,
image_rotary_emb=(img_freqs, txt_freqs), attention_mask=additive)``: complex RoPE
frequencies [N, D/2] and [S, D/2], and an additive float mask [B, 1, 1, N + S] (-inf on
padded text keys) or None. lens_fast's blocks carry the RoPE table as (cos, sin) pairs
[N + S, D/2, 2] and the text mask as bool [B, S] (or per-row key limits). This module
converts between the two, so a processor written for diffusers' Lens runs unchanged on
lens_fast's eager path, and ``LensAttnProcessor`` (lens_fast's fused attention, the
default) can be called the diffusers way too.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


class LensAttnProcessor:
    """lens_fast's attention: fused QK-norm + RoPE, then ``joint_attention`` (the kernel
    the dispatch picks). Called by the module directly on lens_fast's own tensors; called
    as a diffusers processor, it converts the diffusers arguments first."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                 attention_mask: Optional[torch.Tensor] = None):
        if image_rotary_emb is None:
            raise ValueError("LensAttnProcessor needs image_rotary_emb=(img_freqs, txt_freqs); Lens has no "
                             "attention without RoPE")
        n, s = hidden_states.shape[1], encoder_hidden_states.shape[1]
        freqs = torch.cat([image_rotary_emb[0][:n], image_rotary_emb[1][:s]], 0)
        rope = torch.stack([freqs.real, freqs.imag], -1).float()
        return attn.fused_attention(hidden_states, encoder_hidden_states, rope,
                                    text_mask_from_additive(attention_mask, n))


def text_mask_from_additive(attention_mask: Optional[torch.Tensor], n_img: int) -> Optional[torch.Tensor]:
    """The bool text mask [B, S] of an additive joint mask [B, 1, 1, N + S] (or [B, N + S])."""
    if attention_mask is None:
        return None
    keep = attention_mask.reshape(attention_mask.shape[0], -1)
    keep = keep if keep.dtype == torch.bool else torch.isfinite(keep) & (keep == 0)
    return keep[:, n_img:]


def diffusers_attention_args(rope: torch.Tensor, n_img: int, txt_mask: Optional[torch.Tensor],
                             txt_len: Optional[torch.Tensor], batch: int, text_len: int):
    """(image_rotary_emb, attention_mask) in diffusers' convention from lens_fast's RoPE
    table and text mask / key limits."""
    freqs = torch.complex(rope[..., 0].float(), rope[..., 1].float())
    if txt_len is not None and txt_mask is None:
        txt_mask = torch.arange(text_len, device=txt_len.device)[None, :] < txt_len[:, None]
    mask = None
    if txt_mask is not None:
        keep = torch.cat([torch.ones(batch, n_img, dtype=torch.bool, device=txt_mask.device), txt_mask.bool()], 1)
        mask = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(~keep, float("-inf"))
        mask = mask[:, None, None, :]
    return (freqs[:n_img], freqs[n_img:]), mask


def call_processor(attn, img: torch.Tensor, txt: torch.Tensor, rope: torch.Tensor,
                   txt_mask: Optional[torch.Tensor], txt_len: Optional[torch.Tensor] = None):
    """Run ``attn.processor`` (not lens_fast's) as diffusers' Lens would call it."""
    rotary, mask = diffusers_attention_args(rope, img.shape[1], txt_mask, txt_len, img.shape[0], txt.shape[1])
    return attn.processor(attn, hidden_states=img, encoder_hidden_states=txt, image_rotary_emb=rotary,
                          attention_mask=mask)
