"""What a curation run does: stages, thresholds, models, captioning, shards, execution.

A config is a ``CurateConfig`` (nested dataclasses), built in Python, read from a YAML file
with the same sections, or changed with ``section.key=value`` overrides (``--set``). Unknown
keys and bad values are errors naming the key and what was expected. Defaults and where each
comes from are in STAGES.md beside this file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from ..errors import InvalidValue, MissingFile

# The paper's order; "caption" and "shard" follow.
STAGES = ("decode", "area", "nsfw", "aesthetic", "watermark", "clarity", "entropy", "luminance", "dedup")
SCORE_STAGES = ("area", "nsfw", "aesthetic", "watermark", "clarity", "entropy", "luminance", "dedup")
MODEL_STAGES = ("nsfw", "aesthetic", "watermark")
IMAGE_FORMATS = ("jpg", "png", "webp")


class CurateConfigError(InvalidValue):
    """A curation config key, value or file is wrong; the message says which."""


@dataclass
class DecodeStage:
    max_pixels: int = 89_478_485  # PIL's decompression-bomb limit: larger headers are refused unread
    max_aspect: float = 4.0  # long side / short side; beyond, even the 2:1 bucket keeps under half
    background: List[int] = field(default_factory=lambda: [255, 255, 255])  # alpha is composited on it


@dataclass
class AreaStage:
    enabled: bool = True
    min_area: Optional[int] = None  # pixels; None: the smallest bucket's area (nothing is upscaled)


@dataclass
class ClassifierStage:
    """NSFW or watermark: the probability of ``labels`` from an image classifier folder, or
    from a head on the CLIP embedding (a folder holding head.safetensors)."""
    enabled: bool = True
    model: Optional[str] = None
    labels: List[str] = field(default_factory=list)
    max_score: float = 0.5  # drop at or above


@dataclass
class AestheticStage:
    enabled: bool = True
    model: Optional[str] = None  # folder with head.safetensors: an MLP on the CLIP embedding
    min_score: float = 3.0  # the paper drops aesthetic < 3


@dataclass
class ClarityStage:
    enabled: bool = True
    side: int = 512  # the gray image is scaled to this short side first (0: as it is)
    min_score: float = 100.0


@dataclass
class EntropyStage:
    enabled: bool = True
    min_score: float = 3.0  # bits


@dataclass
class LuminanceStage:
    enabled: bool = True
    min_score: float = 0.05
    max_score: float = 0.98


@dataclass
class DedupStage:
    enabled: bool = True
    max_cosine: float = 0.95  # an image this close to a kept one is dropped
    clusters: Optional[int] = None  # k-means centroids; None: about sqrt(n)
    sample: int = 200_000  # embeddings k-means is trained on
    seed: int = 0


@dataclass
class EmbedderConfig:
    model: Optional[str] = None  # a transformers CLIP/SigLIP (or open_clip) folder, or "toy"
    batch_size: int = 64
    device: str = "auto"  # auto: cuda when present


@dataclass
class CaptionConfig:
    enabled: bool = True
    base_url: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1 ; env LENS_FAST_CAPTION_BASE_URL
    model: Optional[str] = None  # env LENS_FAST_CAPTION_MODEL
    api_key_env: str = "LENS_FAST_CAPTION_API_KEY"
    prompt_file: Optional[str] = None  # None: caption_prompt.txt beside this file
    max_tokens: int = 400
    temperature: float = 0.0
    image_side: int = 768  # the image is sent with its long side at most this
    image_format: str = "JPEG"  # how it is sent: JPEG or PNG
    max_concurrency: int = 8  # per worker process
    requests_per_minute: Optional[float] = None  # for the whole run (split between workers)
    tokens_per_minute: Optional[float] = None
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 0.5  # first retry's wait (doubling, with jitter, up to backoff_max_s; Retry-After wins)
    backoff_max_s: float = 20.0
    min_words: int = 5  # a shorter answer is malformed and retried
    drop_failed: bool = False  # finish without images whose caption failed (else stop, rerun retries)


@dataclass
class ShardConfig:
    buckets: str = "stage2"  # a train config name or YAML whose data.areas/ratios/multiple are used
    samples_per_shard: int = 1000
    image_format: str = "jpg"
    quality: int = 95
    resize: bool = True  # store at the bucket size (cover + centre crop) instead of the original
    seed: int = 0  # fixes the order of samples inside a bucket


@dataclass
class ExecutionConfig:
    executor: str = "local"  # local | ray
    workers: Optional[int] = None  # local: processes (None: all cores); ray: actors per phase
    unit_size: int = 1000  # images per unit of work for folder and list inputs (a tar is one unit)
    score_all: bool = True  # score every stage on every decodable image (False: stop at the first drop)
    ray_address: Optional[str] = None  # None: start or join a local Ray instance


# Keys that change how a run executes, not what it produces: a resume may change them.
EXECUTION_ONLY = {("execution", "executor"), ("execution", "workers"), ("execution", "ray_address"),
                  ("embedder", "batch_size"), ("embedder", "device"), ("caption", "max_concurrency"),
                  ("caption", "requests_per_minute"), ("caption", "tokens_per_minute"), ("caption", "timeout_s"),
                  ("caption", "max_retries"), ("caption", "backoff_s"), ("caption", "backoff_max_s"),
                  ("caption", "drop_failed"), ("caption", "base_url"), ("caption", "api_key_env")}


@dataclass
class CurateConfig:
    decode: DecodeStage = field(default_factory=DecodeStage)
    area: AreaStage = field(default_factory=AreaStage)
    nsfw: ClassifierStage = field(default_factory=lambda: ClassifierStage(labels=["nsfw", "porn", "hentai", "sexy"]))
    aesthetic: AestheticStage = field(default_factory=AestheticStage)
    watermark: ClassifierStage = field(default_factory=lambda: ClassifierStage(labels=["watermark"]))
    clarity: ClarityStage = field(default_factory=ClarityStage)
    entropy: EntropyStage = field(default_factory=EntropyStage)
    luminance: LuminanceStage = field(default_factory=LuminanceStage)
    dedup: DedupStage = field(default_factory=DedupStage)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> Dict[str, Any]:
        """The settings that decide the output (what a resume must keep)."""
        d = self.to_dict()
        for section, key in EXECUTION_ONLY:
            d[section].pop(key, None)
        return d

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]

    def stage_on(self, stage: str) -> bool:
        if stage == "decode":
            return True
        return bool(getattr(self, stage).enabled)

    def needs_embedding(self) -> bool:
        heads = [s for s in ("nsfw", "aesthetic", "watermark") if self.stage_on(s) and _is_head(getattr(self, s).model)]
        return self.dedup.enabled or bool(heads)

    # -- building -----------------------------------------------------------------------
    def update(self, data: Dict[str, Any], source: str = "config") -> "CurateConfig":
        if not isinstance(data, dict):
            raise CurateConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
        sections = {f.name for f in dataclasses.fields(self)}
        for name, values in data.items():
            if name not in sections:
                raise CurateConfigError(f"{source}: unknown section {name!r}; expected one of {sorted(sections)}")
            section = getattr(self, name)
            if not isinstance(values, dict):
                raise CurateConfigError(f"{source}: section {name} must be a mapping, got {values!r}")
            keys = {f.name for f in dataclasses.fields(section)}
            for key, value in values.items():
                if key not in keys:
                    raise CurateConfigError(f"{source}: unknown key {name}.{key}; expected one of {sorted(keys)}")
                setattr(section, key, value)
        return self

    def override(self, assignments: List[str]) -> "CurateConfig":
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep or "." not in key:
                raise CurateConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. clarity.min_score=50")
            section, name = key.split(".", 1)
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise CurateConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
            self.update({section: {name: value}}, f"--set {item}")
        return self

    @classmethod
    def from_file(cls, path: str) -> "CurateConfig":
        if not os.path.isfile(path):
            raise MissingFile(f"curation config {path} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise CurateConfigError(f"{path} is not valid YAML: {e}") from None
        return cls().update(data, path)

    def validate(self) -> "CurateConfig":
        def positive(name, value, allow_zero=False):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not (value >= 0 if allow_zero else value > 0):
                kind = "non-negative" if allow_zero else "positive"
                raise CurateConfigError(f"{name}={value!r}: expected a {kind} number")

        positive("decode.max_pixels", self.decode.max_pixels)
        positive("decode.max_aspect", self.decode.max_aspect)
        if self.decode.max_aspect < 1:
            raise CurateConfigError(f"decode.max_aspect={self.decode.max_aspect}: expected >= 1 "
                                    "(long side / short side)")
        bg = self.decode.background
        if not (isinstance(bg, (list, tuple)) and len(bg) == 3
                and all(isinstance(v, int) and 0 <= v <= 255 for v in bg)):
            raise CurateConfigError(f"decode.background={bg!r}: expected three integers in 0..255")
        if self.area.min_area is not None:
            positive("area.min_area", self.area.min_area)
        positive("clarity.side", self.clarity.side, allow_zero=True)
        lum = self.luminance
        if not 0 <= lum.min_score < lum.max_score <= 1:
            raise CurateConfigError(f"luminance bounds [{lum.min_score}, {lum.max_score}]: "
                                    "expected 0 <= min < max <= 1")
        if not 0 < self.dedup.max_cosine <= 1:
            raise CurateConfigError(f"dedup.max_cosine={self.dedup.max_cosine}: expected a cosine in (0, 1]")
        if self.dedup.clusters is not None:
            positive("dedup.clusters", self.dedup.clusters)
        positive("dedup.sample", self.dedup.sample)
        for stage in ("nsfw", "watermark"):
            s = getattr(self, stage)
            if not 0 < s.max_score <= 1:
                raise CurateConfigError(f"{stage}.max_score={s.max_score}: expected a probability in (0, 1]")
        sh = self.shards
        positive("shards.samples_per_shard", sh.samples_per_shard)
        if sh.image_format not in IMAGE_FORMATS:
            raise CurateConfigError(f"shards.image_format={sh.image_format!r}: expected one of {list(IMAGE_FORMATS)}")
        if not (isinstance(sh.quality, int) and 1 <= sh.quality <= 100):
            raise CurateConfigError(f"shards.quality={sh.quality!r}: expected an integer in 1..100")
        ex = self.execution
        if ex.executor not in ("local", "ray"):
            raise CurateConfigError(f"execution.executor={ex.executor!r}: expected local or ray")
        if ex.workers is not None:
            positive("execution.workers", ex.workers)
        positive("execution.unit_size", ex.unit_size)
        positive("embedder.batch_size", self.embedder.batch_size)
        cap = self.caption
        positive("caption.max_tokens", cap.max_tokens)
        positive("caption.image_side", cap.image_side)
        positive("caption.max_concurrency", cap.max_concurrency)
        if cap.image_format not in ("JPEG", "PNG"):
            raise CurateConfigError(f"caption.image_format={cap.image_format!r}: expected JPEG or PNG")
        return self


def _is_head(model: Optional[str]) -> bool:
    """A model folder that holds a head on the CLIP embedding rather than a whole classifier."""
    return bool(model) and os.path.isfile(os.path.join(model, "head.safetensors"))


def default_prompt_file() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "caption_prompt.txt")
