"""Named training configs (small Python functions registered by name: ``stage1``,
``stage2``, ``finetune``, ``distill``, ``lora``, ``rl``, ``tiny-cpu``) and ``load_config``,
which takes one of those names or a YAML file (optionally ``base: NAME``)."""
from __future__ import annotations

import os
from typing import Callable, Dict

import yaml

from lens_fast.errors import MissingFile, one_line
from lens_fast.resolutions import RATIOS

from .config import (CheckpointConfig, ConfigError, DataConfig, EMAConfig, EncoderConfig, LoggingConfig, OptimConfig, ParallelConfig, TrainConfig, TrainSection, apply_dict)


# -- the registry -----------------------------------------------------------------------
REGISTRY: Dict[str, Callable[[], TrainConfig]] = {}


def register(name: str):
    def deco(fn):
        REGISTRY[name] = fn
        return fn
    return deco


@register("stage1")
def stage1() -> TrainConfig:
    """Paper stage 1: one fixed low resolution (512^2: 1024 image tokens, x 24 per GPU
    = ~24K image tokens, the stage-2 budget), global batch 3072 = 24 x 128 GPUs,
    constant LR, 400K steps."""
    cfg = TrainConfig(name="stage1")
    cfg.data = DataConfig(areas=[512], ratios=["1:1"], batch_per_area={512: 24})
    cfg.checkpoint.every = 2000
    return cfg


@register("stage2")
def stage2() -> TrainConfig:
    """Paper stage 2: 27 buckets = areas 512/768/1024 x 9 ratios, 24/10/6 images per GPU."""
    cfg = TrainConfig(name="stage2")
    cfg.data = DataConfig(areas=[512, 768, 1024], ratios=list(RATIOS), batch_per_area={512: 24, 768: 10, 1024: 6})
    return cfg


@register("finetune")
def finetune() -> TrainConfig:
    """Fine-tuning from an official checkpoint folder (set model.pretrained or
    --pretrained): stage-2 buckets, 10x lower LR, short warm-up, faster EMA."""
    cfg = stage2()
    cfg.name = "finetune"
    cfg.optim.lr = 1e-5
    cfg.optim.warmup_steps = 100
    cfg.train.max_steps = 10_000
    cfg.ema.decay = 0.999
    cfg.checkpoint.every = 500
    return cfg


@register("distill")
def distill() -> TrainConfig:
    """Decoupled-DMD distillation of --teacher FOLDER into a 4-step, CFG-free Turbo:
    stage-2 buckets, student and fake score at a constant lr 1e-6 (DMD2 trained SDXL at
    5e-7; not yet measured at Lens scale), 5 fake updates per student update, EMA 0.99."""
    cfg = stage2()
    cfg.name, cfg.recipe = "distill", "distill"
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-6, 0
    cfg.train.max_steps = 4_000
    cfg.ema.decay = 0.99
    cfg.checkpoint.every = 250
    return cfg


@register("lora")
def lora() -> TrainConfig:
    """LoRA adapters (rank 16 on the attention and MLP projections) on the frozen base
    --pretrained FOLDER: stage-2 buckets, lr 1e-4 after a 100-step warm-up, 2,000 steps, no
    EMA; writes DIR/export/lora/pytorch_lora_weights.safetensors (diffusers' layout)."""
    cfg = stage2()
    cfg.name, cfg.recipe = "lora", "lora"
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-4, 100
    cfg.train.max_steps = 2_000
    cfg.ema.enabled = False
    cfg.checkpoint.every = 500
    return cfg


@register("rl")
def rl() -> TrainConfig:
    """Online RL (DiffusionNFT) of --pretrained FOLDER on rl.prompts scored by the rubric
    judge (LENS_JUDGE_BASE_URL / _MODEL / _API_KEY): 16 prompts x 8 rollouts per step at
    1024^2, 10 CFG-free sampler steps, lr 3e-6 constant, EMA 0.9 (DiffusionNFT's settings
    scaled to a full fine-tune; not yet measured at Lens scale)."""
    cfg = TrainConfig(name="rl", recipe="rl")
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = 3e-6, 0, 1e-4
    cfg.train.max_steps = 1_000
    cfg.ema.decay = 0.9
    cfg.checkpoint.every = 50
    return cfg


@register("tiny-cpu")
def tiny_cpu() -> TrainConfig:
    """A 2-block, 64-wide Lens in pixel space (patch 4 on RGB: 48 channels) on the
    synthetic source; fp32, no compile; trains in seconds on a CPU (tests, CI)."""
    cfg = TrainConfig(name="tiny-cpu")
    cfg.model.transformer.update(patch_size=4, in_channels=48, out_channels=3, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=4, inner_dim=64, enc_hidden_dim=32, axes_dims_rope=[4, 6, 6],
                                 selected_layer_index=[0, 1])
    cfg.optim = OptimConfig(lr=2e-3, warmup_steps=2)
    cfg.train = TrainSection(max_steps=20, seed=0)
    cfg.data = DataConfig(source="synthetic", areas=[32, 48], ratios=["1:1", "2:1", "1:2"],
                          batch_per_area={32: 8, 48: 4}, multiple=8, text_len=6)
    cfg.encoders = EncoderConfig(vae="pixel", pixel_patch=4, dtype="float32")
    cfg.parallel = ParallelConfig(fsdp="auto", param_dtype="float32", reduce_dtype="float32",
                                  activation_checkpointing="selective", ac_every=2, compile=False)
    cfg.ema = EMAConfig(decay=0.9)
    cfg.checkpoint = CheckpointConfig(every=10)
    cfg.logging = LoggingConfig(every=1, tensorboard=False, sample_every=0, sample_count=2, sample_steps=4)
    return cfg


def load_config(name_or_file: str) -> TrainConfig:
    """A registered config by name, or a YAML file (optionally ``base: NAME``)."""
    if name_or_file in REGISTRY:
        cfg = REGISTRY[name_or_file]()
        cfg.validate()
        return cfg
    if not name_or_file.endswith((".yaml", ".yml")):
        raise ConfigError(f"config {name_or_file!r} is neither a registered config {sorted(REGISTRY)} "
                          "nor a .yaml/.yml file")
    if not os.path.isfile(name_or_file):
        raise MissingFile(f"config file {name_or_file} does not exist")
    with open(name_or_file, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except (yaml.YAMLError, ValueError) as e:
            raise ConfigError(f"{name_or_file} is not valid YAML: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name_or_file}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None and base not in REGISTRY:
        raise ConfigError(f"{name_or_file}: base {base!r} is not a registered config; expected one of "
                          f"{sorted(REGISTRY)}")
    cfg = REGISTRY[base]() if base else TrainConfig(name=os.path.splitext(os.path.basename(name_or_file))[0])
    apply_dict(cfg, data, name_or_file)
    cfg.validate()
    return cfg
