"""Training configs: nested dataclasses, a registry of named configs (small Python
functions), YAML files and ``section.key=value`` overrides. Unknown keys are errors
that name the key and the keys that exist.

A YAML file either spells out sections or starts from a named config::

    base: stage2
    optim: {lr: 5.0e-5}
    data: {shards: "/data/laion-{000000..000999}.tar"}
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import yaml

from lens_fast.errors import InvalidValue, MissingFile, one_line
from lens_fast.models.config import LensTransformerConfig
from lens_fast.resolutions import RATIOS, parse_ratio


class ConfigError(InvalidValue):
    """A config key, value or file is wrong; the message says which and what was expected."""


@dataclass
class ModelConfig:
    # config.json keys of the model; lens_fast's own options (LensTransformerConfig.extensions,
    # e.g. mask_every_block) may be added. A pretrained folder brings its own config.
    transformer: Dict[str, Any] = field(default_factory=lambda: dict(LensTransformerConfig.defaults))
    pretrained: Optional[str] = None  # diffusers folder (checkpoint root or its transformer/)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 1000  # linear warm-up from 0, then constant
    # Optional linear cool-down to 0 over the last `decay_steps` before train.max_steps
    # (warmup-stable-decay); 0 keeps the LR constant to the end, as Lens trains.
    decay_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    max_steps: int = 400_000
    seed: int = 0
    grad_accum: int = 1  # micro-batches per optimiser step and rank


@dataclass
class LossConfig:
    # logit(sigma) ~ N(mu(n), logit_std^2); mu linear in the image-token count n through
    # (n1, mu1) and (n2, mu2) (extrapolated outside), defaults from Lens's scheduler config.
    mu_points: List[List[float]] = field(default_factory=lambda: [[256, 0.5], [4096, 1.15]])
    logit_std: float = 1.0
    caption_dropout: float = 0.1


@dataclass
class DataConfig:
    source: str = "webdataset"  # webdataset | cache | synthetic
    shards: List[str] = field(default_factory=list)  # tar paths, globs or {000..099} ranges
    path: Optional[str] = None  # cache folder (source: cache)
    areas: List[int] = field(default_factory=lambda: [512, 768, 1024])  # bucket base sides
    ratios: List[str] = field(default_factory=lambda: list(RATIOS))  # W:H
    batch_per_area: Dict[int, int] = field(default_factory=lambda: {512: 24, 768: 10, 1024: 6})
    area_weights: Optional[List[float]] = None  # probability of each area per step (equal by default)
    multiple: int = 16  # bucket sides are multiples of this
    min_side: int = 64  # images with a shorter side are skipped (too small)
    max_consecutive_skips: int = 1000  # this many skipped samples in a row: stop with an error (no progress)
    caption_keys: List[str] = field(default_factory=lambda: ["json:caption", "txt"])
    max_text_tokens: int = 512
    workers: int = 4  # decode threads per rank
    prefetch: bool = True
    text_len: int = 8  # synthetic source only: text tokens per sample


@dataclass
class EncoderConfig:
    vae: Optional[str] = None  # checkpoint folder holding vae/, or "pixel"
    text_encoder: Optional[str] = None  # checkpoint folder holding text_encoder/ + tokenizer/
    pixel_patch: int = 2  # patch side of the "pixel" stand-in
    dtype: str = "bfloat16"
    template_date: Optional[str] = "2025-01-01"  # fixed chat-template date: reproducible features


@dataclass
class ParallelConfig:
    fsdp: Any = "auto"  # auto: on under torchrun or on CUDA; True / False
    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"
    activation_checkpointing: str = "full"  # none | full | selective
    ac_every: int = 2  # selective: checkpoint every k-th block
    compile: bool = True
    reshard_after_forward: bool = True


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    every: int = 1


@dataclass
class CheckpointConfig:
    every: int = 2000
    keep_last: Optional[int] = None  # None keeps every checkpoint
    export_ema: bool = True  # export DIR/export/transformer from the EMA (else the raw) weights


@dataclass
class LoggingConfig:
    every: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    sample_every: int = 0  # 0: no sample grids
    sample_count: int = 4
    sample_steps: int = 20  # pretrain recipe; a distilled student samples with distill.steps, guidance 1
    sample_guidance: float = 4.0


@dataclass
class DistillConfig:
    """Recipe ``distill`` (``train/distill.md``): Decoupled DMD of a teacher folder into a
    few-step, CFG-free student (a Turbo), started from the teacher's weights."""

    teacher: Optional[str] = None  # Lens checkpoint folder (root holding transformer/, or a transformer folder)
    steps: int = 4  # the student's sampling steps (the Turbo schedule: lens_sigmas(steps, tokens))
    guidance: float = 5.0  # the teacher's CFG scale baked in by the CA term (Lens's norm-rescaled CFG)
    fake_updates: int = 5  # fake-score updates per student update (two time-scale rule, DMD2)
    fake_lr: Optional[float] = None  # fake-score learning rate (default: optim.lr)
    dm_weight: float = 1.0  # distribution matching (teacher cond - fake), the regulariser
    ca_weight: float = 1.0  # CFG augmentation (teacher guided - cond), the engine
    schedule: str = "hybrid"  # hybrid: sigma_CA < sigma_k, sigma_DM anywhere (Decoupled DMD); coupled: one sigma
    sigma_range: List[float] = field(default_factory=lambda: [0.02, 0.98])  # re-noising sigmas stay inside
    teacher_dtype: str = "bfloat16"  # the frozen teacher's storage and compute dtype


@dataclass
class RLConfig:
    """Recipe ``rl`` (``train/rl.md``): online RL with DiffusionNFT from the policy in
    ``model.pretrained``, on a prompt set (``lens-fast rl-prompts``) scored by rewards."""

    prompts: Optional[str] = None  # the prompt set (JSONL written by lens-fast rl-prompts)
    rewards: Dict[str, float] = field(default_factory=lambda: {"judge": 1.0})  # name -> weight: judge, shapeeval
    judge_env: str = "LENS_JUDGE"  # the judge endpoint: {judge_env}_BASE_URL, _MODEL, _API_KEY
    judge_options: Dict[str, Any] = field(default_factory=dict)  # ChatEndpoint settings: timeout_s, max_retries...
    rewrite: Optional[str] = None  # prompt rewriter before the text encoder: None, "toy" (the toy world's) or package.module:function
    prompts_per_step: int = 16  # G: prompts (groups) per step, over all ranks
    images_per_prompt: int = 8  # K: rollouts per prompt, normalised within the group
    height: int = 1024
    width: int = 1024
    sample_steps: int = 10  # the rollout sampler's steps (Lens's schedule); its sigmas are the training times
    guidance: float = 1.0  # 1: CFG-free (DiffusionNFT); else the policy is the norm-rescaled CFG sampler
    sample_mu: Optional[float] = None  # the schedule's shift (None: the reference's empirical mu)
    fast_rollouts: bool = True  # roll out through the inference engine on an unsharded copy of the old policy
    rollout_batch: int = 16  # images per sampler call
    rollout_dtype: str = "bfloat16"  # the fast path's copy
    timesteps_per_sample: int = 2  # training times per rollout image, drawn from the sampler's sigmas
    beta: float = 1.0  # DiffusionNFT's beta: how far the implicit policies sit from the old one
    adv_clip: float = 5.0  # advantages clipped to +-adv_clip, then mapped to r in [0, 1]
    global_std: bool = True  # normalise by the batch's std (else each group's own)
    adaptive_weight: bool = True  # x0-space error over its detached mean magnitude
    kl_weight: float = 1e-4  # ||v_theta - v_ref||^2 to the frozen start policy (0: no reference model)
    old_decay: List[float] = field(default_factory=lambda: [0, 0.001, 0.5])  # [flat steps, rate, cap]
    frozen_dtype: str = "bfloat16"  # the old and reference policies' storage dtype
    max_text_tokens: int = 512


SECTIONS = dict(model=ModelConfig, optim=OptimConfig, train=TrainSection, loss=LossConfig, data=DataConfig,
                encoders=EncoderConfig, parallel=ParallelConfig, ema=EMAConfig, checkpoint=CheckpointConfig,
                logging=LoggingConfig, distill=DistillConfig, rl=RLConfig)
RECIPES = ("pretrain", "distill", "rl")  # implemented in lens_fast.train.recipe / .distill / .rl


@dataclass
class TrainConfig:
    name: str = "custom"
    recipe: str = "pretrain"  # what the run trains: pretrain (also fine-tuning), distill or rl
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config") -> "TrainConfig":
        cfg = cls()
        apply_dict(cfg, data, source)
        cfg.validate()
        return cfg

    def override(self, assignments: List[str]) -> "TrainConfig":
        """Apply ``section.key=value`` strings (values parsed as YAML) and re-validate."""
        for a in assignments:
            if "=" not in a:
                raise ConfigError(f"override {a!r}: expected section.key=value")
            path, value = a.split("=", 1)
            parts = path.strip().split(".")
            if len(parts) != 2:
                raise ConfigError(f"override {a!r}: expected section.key=value with one dot, e.g. optim.lr=1e-4")
            try:
                parsed = yaml.safe_load(value)
            except (yaml.YAMLError, ValueError) as e:  # ValueError: a YAML date that does not exist
                raise ConfigError(f"override {a!r}: value is not valid YAML: {one_line(e)}") from None
            if isinstance(parsed, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
                try:
                    parsed = float(parsed)
                except ValueError:
                    pass
            apply_dict(self, {parts[0]: {parts[1]: parsed}}, f"override {a!r}")
        self.validate()
        return self

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        try:
            LensTransformerConfig.from_dict(self.model.transformer, source="model.transformer")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        t = self.model.transformer
        p, c_out = t.get("patch_size", 2), t.get("out_channels") or t.get("in_channels")
        if p * p * c_out != t.get("in_channels"):
            raise ConfigError(f"model.transformer: patch_size^2 * out_channels = {p * p * c_out} must equal "
                              f"in_channels = {t.get('in_channels')} (the velocity lives in the token space)")
        _positive(self.optim.lr, "optim.lr", strict=True)
        betas = self.optim.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"optim.betas={betas}: expected two numbers in [0, 1)")
        _positive(self.optim.eps, "optim.eps", strict=True)
        _positive(self.optim.weight_decay, "optim.weight_decay")
        _positive(self.optim.warmup_steps, "optim.warmup_steps", integer=True)
        _positive(self.optim.decay_steps, "optim.decay_steps", integer=True)
        if self.optim.decay_steps > self.train.max_steps:
            raise ConfigError(f"optim.decay_steps={self.optim.decay_steps} exceeds train.max_steps="
                              f"{self.train.max_steps}; expected a cool-down inside the run")
        _positive(self.optim.grad_clip, "optim.grad_clip", strict=True)
        _positive(self.train.max_steps, "train.max_steps", integer=True)
        _positive(self.train.grad_accum, "train.grad_accum", strict=True, integer=True)
        _positive(self.train.seed, "train.seed", integer=True)
        pts = self.loss.mu_points
        shape_ok = isinstance(pts, (list, tuple)) and len(pts) == 2 and all(
            isinstance(q, (list, tuple)) and len(q) == 2 for q in pts)
        if not shape_ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   for q in pts for v in q) or pts[0][0] == pts[1][0]:
            raise ConfigError(f"loss.mu_points={pts}: expected [[n1, mu1], [n2, mu2]] of finite numbers, n1 != n2")
        _positive(self.loss.logit_std, "loss.logit_std", strict=True)
        if isinstance(self.loss.caption_dropout, bool) or not isinstance(self.loss.caption_dropout, (int, float)) \
                or not 0 <= self.loss.caption_dropout < 1:
            raise ConfigError(f"loss.caption_dropout={self.loss.caption_dropout}: expected a probability in [0, 1)")
        self._validate_data()
        if self.encoders.template_date is not None:
            from lens_fast.text_encoder import validate_template_date

            validate_template_date(self.encoders.template_date, source="encoders.template_date")
        if self.parallel.fsdp not in ("auto", True, False):
            raise ConfigError(f"parallel.fsdp={self.parallel.fsdp!r}: expected auto, true or false")
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(self.parallel, key) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"parallel.{key}={getattr(self.parallel, key)!r}: expected float32, bfloat16 "
                                  "or float16")
        if self.parallel.activation_checkpointing not in ("none", "full", "selective"):
            raise ConfigError(f"parallel.activation_checkpointing={self.parallel.activation_checkpointing!r}: "
                              "expected none, full or selective")
        _positive(self.parallel.ac_every, "parallel.ac_every", strict=True, integer=True)
        if isinstance(self.ema.decay, bool) or not isinstance(self.ema.decay, (int, float)) \
                or not 0 <= self.ema.decay < 1:
            raise ConfigError(f"ema.decay={self.ema.decay}: expected a number in [0, 1)")
        _positive(self.ema.every, "ema.every", strict=True, integer=True)
        _positive(self.checkpoint.every, "checkpoint.every", strict=True, integer=True)
        if self.checkpoint.keep_last is not None:
            _positive(self.checkpoint.keep_last, "checkpoint.keep_last", strict=True, integer=True)
        _positive(self.logging.every, "logging.every", strict=True, integer=True)
        _positive(self.logging.sample_every, "logging.sample_every", integer=True)
        _positive(self.logging.sample_count, "logging.sample_count", strict=True, integer=True)
        _positive(self.logging.sample_steps, "logging.sample_steps", strict=True, integer=True)
        _finite(self.logging.sample_guidance, "logging.sample_guidance")
        self._validate_recipe()

    def _validate_recipe(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe={self.recipe!r}: expected one of {list(RECIPES)}")
        d = self.distill
        if self.recipe == "rl":
            self._validate_rl()
        if self.recipe != "distill":
            if d.teacher is not None:
                raise ConfigError(f"distill.teacher={d.teacher!r} is set but the recipe is {self.recipe}; "
                                  "add --recipe distill (recipe: distill) or drop the teacher")
            return
        _positive(d.steps, "distill.steps", strict=True, integer=True)
        _positive(d.guidance, "distill.guidance", strict=True)
        _positive(d.fake_updates, "distill.fake_updates", strict=True, integer=True)
        if d.fake_lr is not None:
            _positive(d.fake_lr, "distill.fake_lr", strict=True)
        _positive(d.dm_weight, "distill.dm_weight")
        _positive(d.ca_weight, "distill.ca_weight")
        if d.schedule not in ("hybrid", "coupled"):
            raise ConfigError(f"distill.schedule={d.schedule!r}: expected hybrid or coupled")
        r = d.sigma_range
        if (not isinstance(r, (list, tuple)) or len(r) != 2 or not all(isinstance(v, (int, float)) for v in r)
                or not 0 < r[0] < r[1] < 1):
            raise ConfigError(f"distill.sigma_range={r!r}: expected [low, high] with 0 < low < high < 1")
        if d.teacher_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"distill.teacher_dtype={d.teacher_dtype!r}: expected float32, bfloat16 or float16")

    def _validate_rl(self) -> None:
        r = self.rl
        for key in ("prompts_per_step", "images_per_prompt", "height", "width", "sample_steps", "rollout_batch",
                    "timesteps_per_sample", "max_text_tokens"):
            _positive(getattr(r, key), f"rl.{key}", strict=True, integer=True)
        if r.images_per_prompt < 2:
            raise ConfigError(f"rl.images_per_prompt={r.images_per_prompt}: expected >= 2 (rewards are normalised "
                              "within each prompt's group)")
        if r.timesteps_per_sample > r.sample_steps:
            raise ConfigError(f"rl.timesteps_per_sample={r.timesteps_per_sample} exceeds rl.sample_steps="
                              f"{r.sample_steps}: the training times are distinct sigmas of the sampler")
        for key in ("guidance", "beta", "adv_clip"):
            _positive(getattr(r, key), f"rl.{key}", strict=True)
        _positive(r.kl_weight, "rl.kl_weight")
        if not isinstance(r.rewards, dict) or not r.rewards or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in r.rewards.values()):
            raise ConfigError(f"rl.rewards={r.rewards!r}: expected a mapping of reward names to positive weights, "
                              "e.g. {judge: 1.0} or {shapeeval: 1.0}")
        unknown = [n for n in r.rewards if n not in ("shapeeval", "judge") and ":" not in str(n)]
        if unknown:
            raise ConfigError(f"rl.rewards has {unknown}; expected 'shapeeval', 'judge' or 'package.module:factory'")
        flat_rate_cap = r.old_decay
        if (not isinstance(flat_rate_cap, (list, tuple)) or len(flat_rate_cap) != 3
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in flat_rate_cap)
                or not flat_rate_cap[2] < 1):
            raise ConfigError(f"rl.old_decay={flat_rate_cap!r}: expected [flat steps, rate, cap] >= 0 with cap < 1")
        if r.rewrite not in (None, "toy") and (not isinstance(r.rewrite, str) or ":" not in r.rewrite):
            raise ConfigError(f"rl.rewrite={r.rewrite!r}: expected null, toy or package.module:function")
        for key in ("rollout_dtype", "frozen_dtype"):
            if getattr(r, key) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"rl.{key}={getattr(r, key)!r}: expected float32, bfloat16 or float16")

    def _validate_data(self) -> None:
        d = self.data
        if d.source not in ("webdataset", "cache", "synthetic"):
            raise ConfigError(f"data.source={d.source!r}: expected webdataset, cache or synthetic")
        if isinstance(d.shards, str):
            d.shards = [d.shards]
        _positive(d.multiple, "data.multiple", strict=True, integer=True)
        _positive(d.min_side, "data.min_side", integer=True)
        _positive(d.max_consecutive_skips, "data.max_consecutive_skips", strict=True, integer=True)
        _positive(d.max_text_tokens, "data.max_text_tokens", strict=True, integer=True)
        _positive(d.workers, "data.workers", strict=True, integer=True)
        if not d.areas:
            raise ConfigError("data.areas is empty; expected at least one bucket base side, e.g. [512]")
        for a in d.areas:
            if not isinstance(a, int) or a <= 0 or a % d.multiple:
                raise ConfigError(f"data.areas has {a!r}: expected positive multiples of data.multiple={d.multiple}")
        d.batch_per_area = {int(k): v for k, v in d.batch_per_area.items()}
        missing = [a for a in d.areas if a not in d.batch_per_area]
        if missing:
            raise ConfigError(f"data.batch_per_area={d.batch_per_area} has no batch size for area(s) {missing}")
        for a, b in d.batch_per_area.items():
            _positive(b, f"data.batch_per_area[{a}]", strict=True, integer=True)
        if d.area_weights is not None and (
                not isinstance(d.area_weights, (list, tuple)) or len(d.area_weights) != len(d.areas)
                or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in d.area_weights)
                or sum(d.area_weights) <= 0):
            raise ConfigError(f"data.area_weights={d.area_weights}: expected {len(d.areas)} non-negative weights "
                              "(one per area) with a positive sum")
        for r in d.ratios:
            parse_ratio(r)
        if not d.ratios:
            raise ConfigError("data.ratios is empty; expected W:H ratios such as 1:1")


def _positive(v, name, strict=False, integer=False):
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not math.isfinite(v) or v < 0 or (strict and v == 0):
        kind = "integer" if integer else "number"
        raise ConfigError(f"{name}={v!r}: expected a {'' if integer else 'finite '}"
                          f"{'positive' if strict else 'non-negative'} {kind}")


def _finite(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{name}={v!r}: expected a finite number")


def apply_dict(cfg: TrainConfig, data: Dict[str, Any], source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for key, value in data.items():
        if key in ("name", "recipe"):
            setattr(cfg, key, str(value))
            continue
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {key!r}; expected one of {['name', 'recipe', *SECTIONS]}")
        section = getattr(cfg, key)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section {key!r} must be a mapping, got {type(value).__name__}")
        names = [f.name for f in dataclasses.fields(section)]
        for k, v in value.items():
            if k not in names:
                raise ConfigError(f"{source}: unknown key {key}.{k}; expected one of {names}")
            if key == "model" and k == "transformer":
                unknown = sorted(set(v) - set(LensTransformerConfig.known_keys()))
                if unknown:
                    raise ConfigError(f"{source}: unknown model.transformer key(s) {unknown}; expected keys from "
                                      f"{LensTransformerConfig.known_keys()}")
                v = {**section.transformer, **v}
            setattr(section, k, v)


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
