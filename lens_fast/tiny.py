"""Tiny random Lens checkpoints in the official folder layout, for tests, benchmarks and
examples on machines without the real weights.

``make_tiny_checkpoint(folder)`` writes ``model_index.json``, ``transformer/``,
``vae/``, ``scheduler/`` and (optionally) a tiny GPT-OSS ``text_encoder/`` with a
harmony-template ``tokenizer/`` whose fixed prefix is 97 tokens, as the official one.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .models.transformer import LensTransformer2DModel

TINY_TRANSFORMER = dict(patch_size=2, in_channels=128, out_channels=32, num_layers=2, attention_head_dim=32,
                        num_attention_heads=2, inner_dim=64, enc_hidden_dim=40, axes_dims_rope=[8, 12, 12],
                        gate_mlp=True, rms_norm=True, multi_layer_encoder_feature=True,
                        selected_layer_index=[0, 2, 4])
TINY_VAE = dict(act_fn="silu", batch_norm_eps=1e-4, batch_norm_momentum=0.1, block_out_channels=[16, 32, 32, 32],
                down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=32, layers_per_block=1,
                mid_block_add_attention=True, norm_num_groups=8, out_channels=3, patch_size=[2, 2],
                sample_size=1024, up_block_types=["UpDecoderBlock2D"] * 4, use_post_quant_conv=True,
                use_quant_conv=True)
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
             "invert_sigmas": False, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
             "shift": 3.0, "shift_terminal": None, "stochastic_sampling": False, "time_shift_type": "exponential",
             "use_beta_sigmas": False, "use_dynamic_shifting": True, "use_exponential_sigmas": False,
             "use_karras_sigmas": False}


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter with N(0, std) (norm weights around 1) so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_((1.0 + noise) if "norm" in name and p.dim() == 1 else noise)
    return module


def make_tiny_transformer(seed: int = 0, **overrides) -> LensTransformer2DModel:
    cfg = {**TINY_TRANSFORMER, **overrides}
    return randomize_(LensTransformer2DModel(**cfg), seed).eval()


def make_tiny_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**{**TINY_VAE, **overrides}).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.1)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) + 0.5)
    return vae


def make_tiny_checkpoint(folder: str, seed: int = 0, text_encoder: bool = True, variant: Optional[str] = None,
                         **transformer_overrides) -> str:
    """Write a complete tiny Lens checkpoint folder and return its path."""
    os.makedirs(folder, exist_ok=True)
    transformer = make_tiny_transformer(seed, **transformer_overrides)
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    make_tiny_vae(seed).save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(SCHEDULER, f, indent=1)
    index = {"_class_name": "LensPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": [None, None], "tokenizer": [None, None],
             "transformer": ["diffusers", "LensTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}
    if variant is not None:
        index["_lens_variant"] = variant
    if text_encoder:
        from .testing import make_tiny_gpt_oss, make_tiny_tokenizer

        layers = transformer.config.selected_layer_index
        make_tiny_gpt_oss(os.path.join(folder, "text_encoder"), num_layers=max(layers) + 2,
                          hidden=transformer.config.enc_hidden_dim, seed=seed)
        make_tiny_tokenizer(os.path.join(folder, "tokenizer"))
        index["text_encoder"] = ["transformers", "GptOssForCausalLM"]
        index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    return folder
