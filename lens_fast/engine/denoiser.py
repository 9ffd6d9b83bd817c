"""The denoiser forward of the fast path: the model's own weights and fused ops, with
every sigma-only quantity precomputed (see ``schedule``) and the block as the unit that
``torch.compile`` sees.

``block_forward`` is the math of ``LensTransformerBlock.forward`` with the modulation
vectors passed in instead of computed from ``temb`` (tests check the two agree). It is a
plain function of (block, tensors): compiled once, it serves all L blocks, since dynamo
lifts the parameters of an inlined module to graph inputs instead of specialising on the
instance. Shapes are static (``dynamic=False``): one graph per (resolution, batch, text
bucket), a bounded set when text lengths are bucketed.

Attention goes through ``lens_fast.ops.attention.joint_attention`` (whatever its
dispatch picks). One exception: while a CUDA graph is being captured outside
``torch.compile``, the SDPA and FlashAttention backends would synchronise with the host
(they read the mask on the CPU to plan key runs / varlen lengths), which capture
forbids; there the engine runs SDPA with a broadcast [B, 1, 1, L] boolean key mask
instead (same result; cuDNN excluded, as ``joint_attention`` does under compile).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models.transformer import FP16_MAX
from ..ops import fused
from ..ops.attention import joint_attention, key_valid_mask, select_backend

_GRAPH_SAFE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_SYNCING_BACKENDS = ("sdpa", "flash_attn")


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def attention(q, k, v, txt_mask: Optional[torch.Tensor], n_img: int) -> torch.Tensor:
    """``joint_attention``, made safe to capture in a CUDA graph (module docstring)."""
    if not torch.compiler.is_compiling() and txt_mask is not None and _capturing(q) \
            and select_backend(q, k, v, txt_mask) in _SYNCING_BACKENDS:
        keep = key_valid_mask(txt_mask, n_img)[:, None, None, :]
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(_GRAPH_SAFE_SDPA):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep)
        return out.transpose(1, 2).contiguous()
    return joint_attention(q, k, v, txt_mask, n_img=n_img)


def block_forward(block, img: torch.Tensor, txt: torch.Tensor, mods: torch.Tensor, rope: torch.Tensor,
                  txt_mask: Optional[torch.Tensor]):
    """One Lens block with precomputed modulation ``mods`` [12, B, dim] (image rows 0-5,
    text rows 6-11, each (shift1, scale1, gate1, shift2, scale2, gate2))."""
    i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2, t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = mods.unbind(0)
    attn = block.attn
    n = img.shape[1]
    img_in = block._norm_mod(block.img_norm1, img, i_sh1, i_sc1)
    txt_in = block._norm_mod(block.txt_norm1, txt, t_sh1, t_sc1)
    q, k, v = fused.qk_norm_rope(attn.img_qkv(img_in), attn.txt_qkv(txt_in), attn.heads,
                                 attn.norm_q.weight, attn.norm_k.weight,
                                 attn.norm_added_q.weight, attn.norm_added_k.weight, rope, attn.eps)
    out = attention(q, k, v, txt_mask, n).flatten(2).to(q.dtype)
    img_attn, txt_attn = attn.to_out[0](out[:, :n]), attn.to_add_out(out[:, n:])
    img, img_h = block._residual_norm_mod(block.img_norm2, img, img_attn, i_g1, i_sh2, i_sc2)
    txt, txt_h = block._residual_norm_mod(block.txt_norm2, txt, txt_attn, t_g1, t_sh2, t_sc2)
    img = img + i_g2.unsqueeze(1) * block.img_mlp(img_h)
    txt = txt + t_g2.unsqueeze(1) * block.txt_mlp(txt_h)
    if txt.dtype == torch.float16:
        txt = txt.clip(-FP16_MAX, FP16_MAX)
    if img.dtype == torch.float16:
        img = img.clip(-FP16_MAX, FP16_MAX)
    return img, txt


def default_compile_mode(device: torch.device) -> Optional[str]:
    """max-autotune without inductor's own CUDA graphs on CUDA (the engine captures
    whole steps itself); inductor's default on the CPU."""
    return "max-autotune-no-cudagraphs" if torch.device(device).type == "cuda" else None


class FastDenoiser:
    """Runs ``LensTransformer2DModel`` from precomputed step constants.

    ``forward(x, txt, rope, first_mask, later_mask, mods, out_mods)``: x [B, N, C_in]
    image tokens in the model dtype, txt [B, S, dim] the projected text stream, rope the
    joint table [N + S, D/2, 2], masks [B, S] bool (block 0 / blocks 1..), mods
    [L, 12, B, dim], out_mods [2, B, dim] (scale, shift). Returns [B, N, C_out].
    """

    def __init__(self, model, compile: bool = False, compile_mode: Optional[str] = None):
        self.model = model
        self.compiled = bool(compile)
        if compile:
            recompile_limit_at_least(64)
            self.block_fn = torch.compile(block_forward, mode=compile_mode, dynamic=False)
        else:
            self.block_fn = block_forward

    def forward(self, x, txt, rope, first_mask, later_mask, mods, out_mods):
        model = self.model
        img = model.img_in(x)
        for j, block in enumerate(model.transformer_blocks):
            reference_mask = j == 0 or model.mask_every_block
            img, txt = self.block_fn(block, img, txt, mods[j], rope, first_mask if reference_mask else later_mask)
        scale, shift = out_mods.unbind(0)
        img = fused.layer_norm_modulate(img, shift, scale, model.norm_out.eps)
        return model.proj_out(img)

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
