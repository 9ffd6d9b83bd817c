"""LensTransformer2DModel: the Lens dual-stream MMDiT in plain PyTorch modules.

Module names mirror the official checkpoint, so ``state_dict()`` speaks the official key
names. The glue between GEMMs goes through ``lens_fast.ops`` (fused kernels when the
backend allows, the reference math under ``LENS_FAST_BACKEND=torch``), attention through
``lens_fast.ops.attention.joint_attention``. The inference engine runs this same code
(``lens_fast.engine.denoiser``): ``run_blocks`` with precomputed ``modulations``.
"""
from __future__ import annotations

import functools
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from ..ops.attention import joint_attention
from ..ops.norm_modulate import gated_residual_rms_norm_modulate, rms_norm_modulate
from ..ops.qk_norm_rope import qk_norm_rope
from .config import LensTransformerConfig
from .embeddings import rope_table
from .layers import AdaLayerNormContinuous, FeedForward, GateMLP, LensTimestepProjEmbeddings, RMSNorm
from .loading import ModelLoadingMixin
from .processors import LensAttnProcessor, call_processor

FP16_MAX = 65504.0


class BlockModulation(NamedTuple):
    """One block's adaLN vectors for one timestep: per stream (shift1, scale1, gate1, shift2,
    scale2, gate2), each [B, dim]. ``LensTransformerBlock.modulation`` computes them."""
    img: Tuple[torch.Tensor, ...]
    txt: Tuple[torch.Tensor, ...]

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> "BlockModulation":
        """Views of a packed [12, B, dim] table: image rows 0-5, text rows 6-11."""
        return cls(tuple(rows[:6].unbind(0)), tuple(rows[6:].unbind(0)))

    def rows(self) -> torch.Tensor:
        """The packed [12, ..., dim] table (``from_rows``'s inverse)."""
        return torch.stack([*self.img, *self.txt], 0)


class StepModulation(NamedTuple):
    """Every modulation of the model for one timestep: one ``BlockModulation`` per block and
    the output head's (scale, shift)."""
    blocks: List[BlockModulation]
    out: Tuple[torch.Tensor, torch.Tensor]


class LensJointAttention(nn.Module, AttentionModuleMixin):
    """Joint [image ; text] attention. Its processor (diffusers' attention-processor
    plumbing) is ``LensAttnProcessor``, lens_fast's fused path; any other processor set
    with ``set_processor`` / the model's ``set_attn_processor`` is called the way
    diffusers' Lens calls one (``lens_fast.models.processors.call_processor``)."""

    _default_processor_cls = LensAttnProcessor
    _available_processors = [LensAttnProcessor]
    _supports_qkv_fusion = False  # img_qkv / txt_qkv are fused QKV projections already

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.eps = heads, head_dim, eps
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.norm_added_q = RMSNorm(head_dim, eps)
        self.norm_added_k = RMSNorm(head_dim, eps)
        self.img_qkv = nn.Linear(dim, 3 * inner)
        self.txt_qkv = nn.Linear(dim, 3 * inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])
        self.to_add_out = nn.Linear(inner, dim)
        self.dim_head = head_dim  # the name diffusers' Lens processors read
        self.slice_size: Optional[int] = None  # heads per attention call (attention slicing); None: all
        self.processor = LensAttnProcessor()

    def forward(self, img, txt, rope, txt_mask, txt_len=None):
        """``txt_mask`` [B, S] bool, or ``txt_len`` [B] (per-row count of leading valid text
        keys: the same as a prefix mask, with no mask), or neither (see ``joint_attention``).
        A processor other than ``LensAttnProcessor`` is called as diffusers calls it."""
        if type(self.processor) is not LensAttnProcessor:
            return call_processor(self, img, txt, rope, txt_mask, txt_len)
        return self.fused_attention(img, txt, rope, txt_mask, txt_len)

    def fused_attention(self, img, txt, rope, txt_mask, txt_len=None):
        """lens_fast's attention (``LensAttnProcessor``): fused QK-norm + RoPE, the
        dispatched joint attention, the output projections."""
        n = img.shape[1]
        q, k, v = qk_norm_rope(self.img_qkv(img), self.txt_qkv(txt), self.heads,
                               self.norm_q.weight, self.norm_k.weight,
                               self.norm_added_q.weight, self.norm_added_k.weight,
                               rope, self.eps)
        if q.dtype != v.dtype:
            # Under autocast the linears give bf16 v while RMSNorm with float32 weights and
            # the float32 RoPE give float32 q, k; autocast's SDPA would run all three in the
            # autocast dtype, so do the same (without autocast the dtypes already agree).
            q, k = q.to(v.dtype), k.to(v.dtype)
        step = self.slice_size
        if step is None or step >= q.shape[2]:
            out = joint_attention(q, k, v, txt_mask, n_img=n, txt_len=txt_len)
        else:  # attention slicing: a few heads at a time (same numbers, less memory)
            out = torch.cat([joint_attention(q[:, :, i:i + step], k[:, :, i:i + step], v[:, :, i:i + step],
                                             txt_mask, n_img=n, txt_len=txt_len)
                             for i in range(0, q.shape[2], step)], 2)
        out = out.flatten(2).to(q.dtype)
        return self.to_out[0](out[:, :n]), self.to_add_out(out[:, n:])


class LensTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, rms_norm: bool, gate_mlp: bool,
                 eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.attn = LensJointAttention(dim, heads, head_dim, eps)
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        norm = (lambda: RMSNorm(dim, eps)) if rms_norm else (lambda: nn.LayerNorm(dim, eps, elementwise_affine=False))
        mlp = (lambda: GateMLP(dim, int(dim / 3 * 8))) if gate_mlp else (lambda: FeedForward(dim))
        self.img_norm1, self.img_norm2, self.img_mlp = norm(), norm(), mlp()
        self.txt_norm1, self.txt_norm2, self.txt_mlp = norm(), norm(), mlp()

    def _norm_mod(self, norm, x, shift, scale):
        if isinstance(norm, RMSNorm):
            return rms_norm_modulate(x, norm.weight, shift, scale, self.eps)
        return norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def _residual_norm_mod(self, norm, x, y, gate, shift, scale):
        if isinstance(norm, RMSNorm):
            return gated_residual_rms_norm_modulate(x, y, gate, norm.weight, shift, scale, self.eps)
        x = x + gate.unsqueeze(1) * y
        return x, self._norm_mod(norm, x, shift, scale)

    # The block in four steps, so the model's loop can fuse one block's exit with the
    # next block's entry (``exit_into``) and the engine can compile ``body``, the same code
    # for every block; ``forward_modulated`` runs them in turn.
    def modulation(self, temb) -> BlockModulation:
        """The block's modulation for the timestep embedding ``temb`` [B, dim]."""
        return BlockModulation(self.img_mod(temb).chunk(6, dim=-1), self.txt_mod(temb).chunk(6, dim=-1))

    def entry(self, img, txt, mods):
        """norm1 + modulate of both streams: the attention inputs."""
        (i_sh1, i_sc1, *_), (t_sh1, t_sc1, *_) = mods
        return self._norm_mod(self.img_norm1, img, i_sh1, i_sc1), self._norm_mod(self.txt_norm1, txt, t_sh1, t_sc1)

    def body(self, img, txt, img_in, txt_in, mods, rope, txt_mask, txt_len=None):
        """Attention, its gated residual fused with norm2, the MLPs. Returns the streams and
        the MLP outputs whose gated residual is still to be added."""
        (_, _, i_g1, i_sh2, i_sc2, _), (_, _, t_g1, t_sh2, t_sc2, _) = mods
        img_attn, txt_attn = self.attn(img_in, txt_in, rope, txt_mask, txt_len)
        img, img_h = self._residual_norm_mod(self.img_norm2, img, img_attn, i_g1, i_sh2, i_sc2)
        txt, txt_h = self._residual_norm_mod(self.txt_norm2, txt, txt_attn, t_g1, t_sh2, t_sc2)
        return img, txt, self.img_mlp(img_h), self.txt_mlp(txt_h)

    def exit(self, img, txt, img_mlp, txt_mlp, mods):
        img = img + mods[0][5].unsqueeze(1) * img_mlp
        txt = txt + mods[1][5].unsqueeze(1) * txt_mlp
        if txt.dtype == torch.float16:
            txt = txt.clip(-FP16_MAX, FP16_MAX)
        if img.dtype == torch.float16:
            img = img.clip(-FP16_MAX, FP16_MAX)
        return img, txt

    def exit_into(self, nxt: "LensTransformerBlock", img, txt, img_mlp, txt_mlp, mods, next_mods):
        """``exit`` fused with ``nxt.entry``: one pass per stream adds the MLP residual and
        computes the next norm1 (``gated_residual_rms_norm_modulate``). Not for float16,
        whose clamp sits between the two. Returns (img, txt, img_in, txt_in) for ``nxt.body``."""
        (i_sh1, i_sc1, *_), (t_sh1, t_sc1, *_) = next_mods
        img, img_in = nxt._residual_norm_mod(nxt.img_norm1, img, img_mlp, mods[0][5], i_sh1, i_sc1)
        txt, txt_in = nxt._residual_norm_mod(nxt.txt_norm1, txt, txt_mlp, mods[1][5], t_sh1, t_sc1)
        return img, txt, img_in, txt_in

    def forward_modulated(self, img, txt, mods: BlockModulation, rope, txt_mask):
        """The block with its modulation passed in (see ``LensTransformer2DModel.modulations``)."""
        img_in, txt_in = self.entry(img, txt, mods)
        img, txt, img_mlp, txt_mlp = self.body(img, txt, img_in, txt_in, mods, rope, txt_mask)
        return self.exit(img, txt, img_mlp, txt_mlp, mods)

    def forward(self, img, txt, temb, rope, txt_mask):
        return self.forward_modulated(img, txt, self.modulation(temb), rope, txt_mask)


@functools.lru_cache(maxsize=64)
def _cached_rope(h: int, w: int, txt_len: int, axes: Tuple[int, ...], device: torch.device):
    return rope_table(h, w, txt_len, axes, device=device)


class LensTransformer2DModel(ModelLoadingMixin, ModelMixin, ConfigMixin, AttentionMixin):
    """The Lens denoiser. Constructor keys are the official ``config.json`` keys; the
    defaults are the official 48-layer configuration (4.104e9 parameters).

    A diffusers ``ModelMixin`` / ``ConfigMixin`` / ``AttentionMixin``: ``config``,
    ``register_to_config``, gradient checkpointing, layerwise casting, group offloading
    and attention processors behave as in diffusers' ``LensTransformer2DModel``;
    ``from_pretrained`` / ``save_pretrained`` take diffusers' arguments but are lens_fast's
    (safetensors only, checked before loading, atomic, no silent overwrite)."""

    config_class = LensTransformerConfig
    config_name = "config.json"
    weights_name = "diffusion_pytorch_model"
    _supports_gradient_checkpointing = True
    _no_split_modules = ["LensTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _repeated_blocks = ["LensTransformerBlock"]

    @register_to_config
    def __init__(self, patch_size: int = 2, in_channels: int = 128, out_channels: Optional[int] = 32,
                 num_layers: int = 48, attention_head_dim: int = 64, num_attention_heads: int = 24,
                 inner_dim: Optional[int] = 1536, enc_hidden_dim: int = 2880,
                 axes_dims_rope: Sequence[int] = (8, 28, 28), gate_mlp: bool = True, rms_norm: bool = True,
                 multi_layer_encoder_feature: bool = True,
                 selected_layer_index: Sequence[int] = (5, 11, 17, 23), mask_every_block: bool = False):
        super().__init__()
        LensTransformerConfig.from_dict(dict(  # validation only: ConfigMixin keeps the config
            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            inner_dim=inner_dim, enc_hidden_dim=enc_hidden_dim, axes_dims_rope=list(axes_dims_rope),
            gate_mlp=gate_mlp, rms_norm=rms_norm, multi_layer_encoder_feature=multi_layer_encoder_feature,
            selected_layer_index=list(selected_layer_index), mask_every_block=mask_every_block))
        dim = num_attention_heads * attention_head_dim  # inner dim is always heads x head_dim
        self.inner_dim = dim
        self.out_channels = out_channels or in_channels
        self.num_text_layers = len(selected_layer_index) if multi_layer_encoder_feature else 1
        self.time_text_embed = LensTimestepProjEmbeddings(dim)
        if multi_layer_encoder_feature:
            self.txt_norm = nn.ModuleList([RMSNorm(enc_hidden_dim, 1e-5) for _ in selected_layer_index])
        else:
            self.txt_norm = RMSNorm(enc_hidden_dim, 1e-5)
        self.txt_in = nn.Linear(enc_hidden_dim * self.num_text_layers, dim)
        self.img_in = nn.Linear(in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [LensTransformerBlock(dim, num_attention_heads, attention_head_dim, rms_norm, gate_mlp)
             for _ in range(num_layers)])
        self.norm_out = AdaLayerNormContinuous(dim, 1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self.gradient_checkpointing = False
        self._layout_hooks: List[Callable] = []

    @property
    def mask_every_block(self) -> bool:
        """Whether the text mask applies in every block (config key ``mask_every_block``).

        The reference applies it in the FIRST block only: its blocks pop "attention_mask"
        from one kwargs dict shared by all of them, so blocks 1..L-1 attend to padded text
        tokens too. The official numbers (and the conformance data) come from that, so it is
        the default, and what a folder without the key means. True masks every block (what
        lens-reference.md describes); it changes outputs wherever text is padded. Setting it
        changes the config, so ``save_pretrained`` and the trainer's export keep it."""
        return bool(self.config.get("mask_every_block", False))

    @mask_every_block.setter
    def mask_every_block(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"mask_every_block={value!r}: expected True or False")
        self.register_to_config(mask_every_block=value)

    def block_masks(self, mask: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """The text mask each block attends with: ``mask`` for block 0, and for the others
        ``mask`` with ``mask_every_block``, else None (see ``mask_every_block``)."""
        return [mask if (i == 0 or self.mask_every_block) else None for i in range(len(self.transformer_blocks))]

    # -- diffusers features lens_fast serves differently ---------------------------------
    def set_attention_slice(self, slice_size):
        """Attention slicing (``LensPipeline.enable_attention_slicing``): each attention
        runs ``slice_size`` heads at a time ("auto": half of them, "max": one; None: all).
        Same numbers, less memory for the attention scores, on the eager path."""
        heads = self.config.num_attention_heads
        size = {"auto": max(1, heads // 2), "max": 1}.get(slice_size, slice_size) if isinstance(slice_size, str) \
            else slice_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"slice_size={slice_size!r}: expected 'auto', 'max', None or a positive number of heads")
        for module in self.modules():
            if isinstance(module, LensJointAttention):
                module.slice_size = size

    def set_attention_backend(self, backend: str) -> None:
        raise NotImplementedError(f"set_attention_backend({backend!r}): lens_fast chooses its attention kernel "
                                  "per call (LENS_FAST_BACKEND, lens_fast.ops.attention); set that instead")

    def enable_xformers_memory_efficient_attention(self, *args, **kwargs):
        raise NotImplementedError("xformers attention: lens_fast uses its own attention kernels "
                                  "(lens_fast.ops.attention); nothing to enable")

    def uses_reference_attention(self) -> bool:
        """Whether every attention runs lens_fast's own processor without slicing (what the
        fast path requires)."""
        return all(type(m.processor) is LensAttnProcessor and m.slice_size is None
                   for m in self.modules() if isinstance(m, LensJointAttention))

    def fuse_projections(self) -> "LensTransformer2DModel":
        """Inference layout: every SwiGLU's w1 and w3 become one [2F, dim] weight (one GEMM
        + the fused ``swiglu`` kernel). Explicit and idempotent; ``state_dict()``,
        ``save_pretrained`` and ``load_state_dict`` keep the official w1/w3 keys. Training
        keeps w1/w3 separate: do not call it on a model that FSDP2 will shard."""
        unfused = [m for m in self.modules() if isinstance(m, GateMLP) and not m.fused]
        for module in unfused:
            module.fuse()
        if unfused:
            self.layout_changed()
        return self

    def register_layout_hook(self, hook: Callable[["LensTransformer2DModel"], None]) -> None:
        """``hook(model)`` runs whenever modules of this model are replaced (``fuse_projections``,
        FP8 quantisation), so that state kept per module (LoRA adapters, ``lens_fast.lora``) can
        follow. Registering a hook twice is a no-op."""
        if hook not in self._layout_hooks:
            self._layout_hooks.append(hook)

    def layout_changed(self) -> None:
        """Run the layout hooks (called by whatever replaced modules)."""
        for hook in list(self._layout_hooks):
            hook(self)

    # -- the pieces of the forward, public for the engine --------------------------------
    def embed_text(self, encoder_hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """The text stream's input [B, S, dim]: each selected layer's features RMS-normed,
        concatenated, projected by ``txt_in``."""
        if self.config.multi_layer_encoder_feature:
            txt = torch.cat([norm(f) for norm, f in zip(self.txt_norm, encoder_hidden_states)], dim=-1)
        else:
            txt = self.txt_norm(encoder_hidden_states[0])
        return self.txt_in(txt)

    def time_embedding(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``temb`` [B, dim] for sigmas [B] (the reference's timestep / 1000)."""
        return self.time_text_embed(sigma, dtype)

    def modulations(self, sigma: torch.Tensor, dtype: Optional[torch.dtype] = None) -> StepModulation:
        """Every block's and the output head's modulation for sigmas [B] (a function of sigma
        alone: the engine computes a whole schedule's in one batch of B = steps)."""
        dtype = self.dtype if dtype is None else dtype
        temb = self.time_embedding(sigma, dtype)
        return StepModulation([block.modulation(temb) for block in self.transformer_blocks],
                              self.norm_out.modulation(temb, dtype))

    def run_blocks(self, img, txt, mods: Sequence[BlockModulation], rope, masks: Sequence[Optional[torch.Tensor]],
                   body: Optional[Callable] = None, lengths: Optional[Sequence[Optional[torch.Tensor]]] = None):
        """All blocks on (img, txt) with their modulations passed in, calling the block
        methods directly (so only for plain blocks; ``forward`` checks). Outside float16
        (whose per-block clamp sits in between) block i's MLP residual is fused with block
        i+1's norm1 (``exit_into``): the same math as calling the blocks in turn, one read of
        each stream fewer per block. ``body`` replaces ``LensTransformerBlock.body`` (called
        as ``body(block, ...)``), e.g. by a compiled version of it (the engine). ``lengths``:
        per block, text key limits [B] in place of (or beside a None in) ``masks``."""
        blocks = list(self.transformer_blocks)
        if not blocks:
            return img, txt
        body = LensTransformerBlock.body if body is None else body
        chain = torch.float16 not in (img.dtype, txt.dtype)
        img_in, txt_in = blocks[0].entry(img, txt, mods[0])
        for i, block in enumerate(blocks):
            txt_len = None if lengths is None else lengths[i]
            img, txt, img_mlp, txt_mlp = body(block, img, txt, img_in, txt_in, mods[i], rope, masks[i], txt_len)
            if i + 1 == len(blocks):
                return block.exit(img, txt, img_mlp, txt_mlp, mods[i])
            if chain:
                img, txt, img_in, txt_in = block.exit_into(blocks[i + 1], img, txt, img_mlp, txt_mlp, mods[i],
                                                           mods[i + 1])
            else:
                img, txt = block.exit(img, txt, img_mlp, txt_mlp, mods[i])
                img_in, txt_in = blocks[i + 1].entry(img, txt, mods[i + 1])

    def project_output(self, img, out_modulation: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``proj_out(norm_out(img))`` with the output head's (scale, shift) passed in."""
        return self.proj_out(self.norm_out.modulate(img, out_modulation))

    def _calls_blocks_directly(self) -> bool:
        """Whether ``forward`` may call block methods directly (``run_blocks``): only plain
        blocks qualify (FSDP2, checkpoint wrappers, hooks and ``Module.compile`` act on
        ``__call__`` and would be bypassed), and not under per-block gradient checkpointing."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return False
        return all(type(b) is LensTransformerBlock and not b._forward_hooks and not b._forward_pre_hooks
                   and getattr(b, "_compiled_call_impl", None) is None for b in self.transformer_blocks)

    def _can_chain_blocks(self, img, txt) -> bool:
        """Whether ``forward`` fuses each block's exit with the next block's entry."""
        return torch.float16 not in (img.dtype, txt.dtype) and self._calls_blocks_directly()

    def rope_table(self, h: int, w: int, txt_len: int, device) -> torch.Tensor:
        """The RoPE table of the joint sequence, cached per (h, w, text length, device)."""
        return _cached_rope(h, w, txt_len, tuple(self.config.axes_dims_rope), torch.device(device))

    # -- inputs ----------------------------------------------------------------------
    def _check_inputs(self, hidden_states, encoder_hidden_states, mask, timestep, img_shapes):
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.in_channels:
            raise ValueError(f"hidden_states must be [B, N, {self.config.in_channels}], "
                             f"got {tuple(hidden_states.shape)}")
        b, n, _ = hidden_states.shape
        if self.config.multi_layer_encoder_feature:
            if not isinstance(encoder_hidden_states, (list, tuple)):
                raise ValueError("encoder_hidden_states must be a list of "
                                 f"{self.num_text_layers} text-feature tensors (multi_layer_encoder_feature=True), "
                                 f"got {type(encoder_hidden_states).__name__}")
            feats = list(encoder_hidden_states)
        else:
            feats = list(encoder_hidden_states) if isinstance(encoder_hidden_states, (list, tuple)) \
                else [encoder_hidden_states]
        if len(feats) != self.num_text_layers:
            raise ValueError(f"expected {self.num_text_layers} text-feature tensors "
                             f"(one per selected_layer_index {self.config.selected_layer_index}), got {len(feats)}")
        s = feats[0].shape[1] if feats[0].dim() == 3 else -1
        for i, f in enumerate(feats):
            if f.dim() != 3 or f.shape[0] != b or f.shape[1] != s or f.shape[2] != self.config.enc_hidden_dim:
                raise ValueError(f"text feature {i} must be [B={b}, S, {self.config.enc_hidden_dim}] with the same S "
                                 f"for every layer, got {tuple(f.shape)}")
        if mask is not None and tuple(mask.shape) != (b, s):
            raise ValueError(f"encoder_hidden_states_mask must be [B, S] = [{b}, {s}], got {tuple(mask.shape)}")
        if timestep is None or timestep.dim() > 1 or (timestep.dim() == 1 and timestep.shape[0] not in (1, b)):
            raise ValueError(f"timestep must be a [B={b}] tensor of sigmas, got "
                             f"{None if timestep is None else tuple(timestep.shape)}")
        if img_shapes is None:
            raise ValueError("img_shapes is required: [(1, h, w)] with h * w = N")
        shapes = [tuple(int(v) for v in s_) for s_ in img_shapes]
        if any(sh != shapes[0] for sh in shapes):
            raise ValueError(f"all images in a batch must share one shape, got img_shapes={shapes}")
        f_, h, w = shapes[0]
        if f_ != 1 or h * w != n:
            raise ValueError(f"img_shapes {shapes[0]} must be (1, h, w) with h*w = N = {n}")
        return feats, (h, w)

    def forward(self, hidden_states: torch.Tensor,
                encoder_hidden_states: Union[List[torch.Tensor], torch.Tensor] = None,
                encoder_hidden_states_mask: Optional[torch.Tensor] = None,
                timestep: torch.Tensor = None,
                img_shapes: Optional[Sequence[Tuple[int, int, int]]] = None,
                attention_kwargs: Optional[dict] = None,
                return_dict: bool = True):
        feats, (h, w) = self._check_inputs(hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                           timestep, img_shapes)
        b = hidden_states.shape[0]
        mask = encoder_hidden_states_mask
        if mask is not None:
            mask = mask.to(device=hidden_states.device, dtype=torch.bool)
        img = self.img_in(hidden_states)
        sigma = timestep.to(img.dtype).reshape(-1).expand(b)
        txt = self.embed_text(feats)
        temb = self.time_embedding(sigma, img.dtype)
        rope = self.rope_table(h, w, txt.shape[1], img.device)
        masks = self.block_masks(mask)
        if self._calls_blocks_directly():
            mods = [block.modulation(temb) for block in self.transformer_blocks]
            img, txt = self.run_blocks(img, txt, mods, rope, masks)
        else:
            for block, block_mask in zip(self.transformer_blocks, masks):
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    img, txt = self._gradient_checkpointing_func(block, img, txt, temb, rope, block_mask)
                else:
                    img, txt = block(img, txt, temb, rope, block_mask)
        out = self.project_output(img, self.norm_out.modulation(temb, img.dtype))
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
