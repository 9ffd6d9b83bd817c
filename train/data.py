"""Batches and data sources of the trainer (the protocol is documented in
``lens_fast.train``): in-memory / precomputed-cache tokens, the synthetic source of
tiny-cpu and the benchmarks, the pixel-space stand-in for a VAE, and the wrapper that
runs frozen encoders over a raw image + caption source."""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lens_fast.errors import CorruptFile, InvalidValue, MissingFile, OutputExists, one_line
from lens_fast.models.config import read_json
from lens_fast.models.loading import check_safetensors
from lens_fast.vae import from_tokens, patchify, to_tokens, unpatchify

from .buckets import BucketTable, step_rng

Grid = Tuple[int, int]


@dataclass
class Batch:
    """One micro-batch in the denoiser's token space (one bucket: one shape)."""

    latents: torch.Tensor  # [B, N, C] clean (normalised) image tokens
    text: List[torch.Tensor]  # K x [B, S, E] text-encoder features
    text_mask: torch.Tensor  # [B, S] bool, True = real token
    grid: Grid  # (h, w) token grid, h * w = N
    skipped: int = 0  # samples skipped (corrupt, truncated, too small) while building it
    captions: Optional[List[str]] = None
    images: Optional[torch.Tensor] = None  # [B, 3, H, W] in [-1, 1] where the source has pixels

    @property
    def img_shapes(self) -> List[Tuple[int, int, int]]:
        return [(1, self.grid[0], self.grid[1])]

    @property
    def size(self) -> int:
        return self.latents.shape[0]

    def to(self, device, dtype=None) -> "Batch":
        cast = (lambda t: t.to(device=device, dtype=dtype)) if dtype is not None else (lambda t: t.to(device))
        return Batch(cast(self.latents), [cast(t) for t in self.text], self.text_mask.to(device), self.grid,
                     self.skipped, self.captions, self.images)


def trim_text(text: List[torch.Tensor], mask: torch.Tensor):
    """Drop trailing columns padded in every row (as a text encoder pads a batch)."""
    real = mask.any(0).nonzero()
    s = int(real[-1]) + 1 if len(real) else 1
    return [t[:, :s] for t in text], mask[:, :s]


class PixelSpace:
    """The VAE stand-in for pixel-space models: RGB in [-1, 1] patchified p x p into
    3 p^2-channel tokens (``b c (h p1) (w p2) -> b (h w) (c p1 p2)``), and back."""

    def __init__(self, patch: int):
        if not isinstance(patch, int) or patch <= 0:
            raise InvalidValue(f"pixel patch={patch!r}: expected a positive integer")
        self.patch = self.spatial_factor = patch
        self.token_channels = 3 * patch * patch

    def latent_grid(self, height: int, width: int) -> Grid:
        if height % self.patch or width % self.patch:
            raise InvalidValue(f"image {height}x{width} is not divisible by the pixel patch {self.patch}")
        return height // self.patch, width // self.patch

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise InvalidValue(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        self.latent_grid(images.shape[2], images.shape[3])
        return to_tokens(patchify(images.float(), self.patch))

    def decode(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        h, w = self.latent_grid(height, width)
        return unpatchify(from_tokens(tokens.float(), h, w), self.patch)


# -- in-memory / precomputed cache ------------------------------------------------------
@dataclass
class BucketData:
    """All samples of one bucket: tokens, per-layer text features (padded) and mask."""

    latents: torch.Tensor  # [M, N, C]
    text: List[torch.Tensor]  # K x [M, S, E]
    text_mask: torch.Tensor  # [M, S] bool
    captions: Optional[List[str]] = None

    def __post_init__(self):
        m = self.latents.shape[0]
        if self.latents.dim() != 3 or m == 0:
            raise InvalidValue(f"latents must be a non-empty [M, N, C] tensor, got {tuple(self.latents.shape)}")
        for i, t in enumerate(self.text):
            if t.dim() != 3 or t.shape[:2] != self.text_mask.shape:
                raise InvalidValue(f"text[{i}] has shape {tuple(t.shape)}; expected [M, S, E] with [M, S] = "
                                 f"{tuple(self.text_mask.shape)} (the mask's shape)")
        if self.text_mask.shape[0] != m:
            raise InvalidValue(f"text_mask has {self.text_mask.shape[0]} rows for {m} latents")
        if self.captions is not None and len(self.captions) != m:
            raise InvalidValue(f"{len(self.captions)} captions for {m} latents")
        self.text_mask = self.text_mask.bool()


class InMemorySource:
    """Precomputed tokens + text features per bucket, held in memory (or loaded from a
    cache folder written by :func:`save_cache`).

    ``buckets`` maps a token grid (h, w) to its :class:`BucketData`. Each step every
    data rank draws a bucket (weights: ``bucket_weights``, default proportional to the
    bucket's size) from a generator fixed by (seed, step, data rank), then its next
    ``batch_size`` samples from a per-(bucket, epoch) permutation strided over the data
    ranks. The position is one (epoch, cursor) per data rank and bucket."""

    def __init__(self, buckets: Dict[Grid, BucketData], batch_size: Union[int, Dict[Grid, int]], seed: int = 0,
                 bucket_weights: Optional[Dict[Grid, float]] = None):
        if not buckets:
            raise InvalidValue("InMemorySource needs at least one bucket")
        self.grids = sorted(buckets)
        for g in self.grids:
            n = buckets[g].latents.shape[1]
            if len(g) != 2 or g[0] * g[1] != n:
                raise InvalidValue(f"bucket {g} holds {n} tokens per sample; expected h * w = {g[0] * g[1]}")
        self.buckets = buckets
        if isinstance(batch_size, int):
            batch_size = {g: batch_size for g in self.grids}
        missing = [g for g in self.grids if g not in batch_size]
        if missing or any(int(v) <= 0 for v in batch_size.values()):
            raise InvalidValue(f"batch_size {batch_size} must give a positive size for every bucket {self.grids}")
        self.batch_size = {g: int(batch_size[g]) for g in self.grids}
        w = np.array([float((bucket_weights or {}).get(g, buckets[g].latents.shape[0] if bucket_weights is None
                                                      else 0.0)) for g in self.grids])
        if w.min() < 0 or w.sum() <= 0:
            raise InvalidValue(f"bucket_weights {bucket_weights} must be non-negative with a positive sum")
        self.weights = w / w.sum()
        self.seed = int(seed)
        self.data_world: Optional[int] = None
        self.pos: Dict[str, Dict[str, List[int]]] = {}

    def _indices(self, g: Grid, data_rank: int, data_world: int, n: int) -> List[int]:
        m = self.buckets[g].latents.shape[0]
        if m < data_world:
            raise InvalidValue(f"bucket {g} has {m} samples, fewer than the {data_world} data ranks")
        key = f"{g[0]}x{g[1]}"
        epoch, cursor = self.pos.setdefault(str(data_rank), {}).get(key, [0, 0])
        out = []
        while len(out) < n:
            perm = _permutation(self.seed, epoch, g, m)[data_rank::data_world]
            take = perm[cursor:cursor + n - len(out)]
            out += take.tolist()
            cursor += len(take)
            if cursor >= len(perm):
                epoch, cursor = epoch + 1, 0
        self.pos[str(data_rank)][key] = [epoch, cursor]
        return out

    def batch(self, step: int, data_rank: int, data_world: int) -> Batch:
        if self.data_world not in (None, data_world):
            raise InvalidValue(f"this source's position was made with {self.data_world} data ranks, not {data_world}")
        self.data_world = data_world
        g = self.grids[int(step_rng(self.seed, step, data_rank, 1).choice(len(self.grids), p=self.weights))]
        idx = self._indices(g, data_rank, data_world, self.batch_size[g])
        return self._gather(g, idx)

    def _gather(self, g: Grid, idx: Sequence[int]) -> Batch:
        b = self.buckets[g]
        index = torch.as_tensor(list(idx), dtype=torch.long)
        text, mask = trim_text([t[index] for t in b.text], b.text_mask[index])
        caps = [b.captions[i] for i in idx] if b.captions is not None else None
        return Batch(b.latents[index], text, mask, g, captions=caps)

    def preview(self, n: int) -> Batch:
        g = max(self.grids, key=lambda k: self.buckets[k].latents.shape[0])
        return self._gather(g, range(min(n, self.buckets[g].latents.shape[0])))

    def state_dict(self) -> dict:
        return {"data_world": self.data_world, "pos": json.loads(json.dumps(self.pos))}

    def load_state_dict(self, state: dict) -> None:
        self.data_world = state.get("data_world")
        self.pos = {r: {k: list(v) for k, v in p.items()} for r, p in state.get("pos", {}).items()}


@functools.lru_cache(maxsize=32)
def _permutation(seed: int, epoch: int, grid: Grid, m: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, grid[0], grid[1]]).permutation(m)


def save_cache(folder: str, buckets: Dict[Grid, BucketData]) -> None:
    """Write buckets as ``<h>x<w>.safetensors`` (+ captions in ``index.json``) into a
    new folder (refused if it exists), atomically."""
    if os.path.exists(folder):
        raise OutputExists(f"cache folder {folder} already exists; choose a new path")
    tmp = folder.rstrip("/") + f".tmp-{os.getpid()}"
    os.makedirs(tmp)
    index = {}
    for (h, w), b in buckets.items():
        tensors = {"latents": b.latents.contiguous(), "text_mask": b.text_mask.contiguous()}
        tensors.update({f"text.{k}": t.contiguous() for k, t in enumerate(b.text)})
        save_file(tensors, os.path.join(tmp, f"{h}x{w}.safetensors"))
        index[f"{h}x{w}"] = {"layers": len(b.text), "captions": b.captions}
    with open(os.path.join(tmp, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f)
    os.rename(tmp, folder)


def check_cache(folder: str) -> Dict[str, dict]:
    """A token cache's index (checked: every bucket named ``HxW`` with its safetensors
    file readable), or a one-line error naming the bad file."""
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        raise MissingFile(f"{folder} is not a token cache: index.json is missing (write one with save_cache)")
    index = read_json(path)
    if not isinstance(index, dict) or not index:
        raise CorruptFile(f"{path} must map bucket names (HxW) to their entries; it holds no bucket")
    for key, meta in index.items():
        if not re.fullmatch(r"\d+x\d+", str(key)) or not isinstance(meta, dict) or \
                not isinstance(meta.get("layers"), int):
            raise CorruptFile(f"{path}: entry {key!r} is not 'HxW': {{layers: N, captions: [...]}}")
        file = os.path.join(folder, f"{key}.safetensors")
        if not os.path.isfile(file):
            raise MissingFile(f"{path} names bucket {key}, but {file} is missing")
        check_safetensors(file)
    return index


def load_cache(folder: str) -> Dict[Grid, BucketData]:
    index = check_cache(folder)
    out = {}
    for key, meta in index.items():
        h, w = (int(v) for v in key.split("x"))
        file = os.path.join(folder, f"{key}.safetensors")
        try:
            t = load_file(file)
            layers = [t[f"text.{k}"] for k in range(meta["layers"])]
            out[(h, w)] = BucketData(t["latents"], layers, t["text_mask"], meta.get("captions"))
        except (SafetensorError, KeyError, ValueError) as e:
            raise CorruptFile(f"token cache file {file} cannot be used: {one_line(e)}") from None
    return out


# -- synthetic ----------------------------------------------------------------------------
COLOURS = np.array([[220, 40, 40], [40, 170, 60], [40, 80, 220], [245, 220, 40], [150, 60, 190],
                    [245, 135, 25]], dtype=np.float32) / 127.5 - 1.0


class SyntheticSource:
    """Generated data for smoke tests, CI and benchmarks (no captions, no encoders): a
    coloured square in one of 3 x 3 cells on a light or dark ground, in pixel space,
    with "text features" that are fixed random embeddings of (colour, cell, ground)
    words padded to ``text_len``. Everything is a function of (seed, step, data rank)."""

    def __init__(self, table: BucketTable, pixel: PixelSpace, num_text_layers: int, enc_dim: int,
                 text_len: int = 8, seed: int = 0):
        if text_len < 3:
            raise InvalidValue(f"text_len={text_len}: the synthetic source needs at least 3 text tokens")
        for b in table.all():
            pixel.latent_grid(b.height, b.width)
        self.table, self.pixel, self.text_len, self.seed = table, pixel, text_len, int(seed)
        g = np.random.default_rng([self.seed, 7])
        vocab = len(COLOURS) + 9 + 2 + 1  # colours, cells, grounds, filler
        self.embed = [torch.from_numpy(g.standard_normal((vocab, enc_dim)).astype(np.float32))
                      for _ in range(num_text_layers)]

    def _sample(self, rng, height, width):
        colour, cell, dark = int(rng.integers(len(COLOURS))), int(rng.integers(9)), int(rng.integers(2))
        img = np.full((3, height, width), -0.8 if dark else 0.9, dtype=np.float32)
        side = max(2, int(min(height, width) * rng.uniform(0.2, 0.33)))
        cy = int((cell // 3 + 0.5) * height / 3)
        cx = int((cell % 3 + 0.5) * width / 3)
        img[:, max(0, cy - side // 2):cy + side // 2, max(0, cx - side // 2):cx + side // 2] = \
            COLOURS[colour][:, None, None]
        n = int(rng.integers(3, self.text_len + 1))
        words = [colour, len(COLOURS) + cell, len(COLOURS) + 9 + dark] + [len(COLOURS) + 11] * (n - 3)
        return img, words

    def _make(self, rng, bucket, count) -> Batch:
        imgs, words = zip(*[self._sample(rng, bucket.height, bucket.width) for _ in range(count)])
        images = torch.from_numpy(np.stack(imgs))
        mask = torch.zeros(count, self.text_len, dtype=torch.bool)
        ids = torch.zeros(count, self.text_len, dtype=torch.long)
        for i, w in enumerate(words):
            mask[i, :len(w)] = True
            ids[i, :len(w)] = torch.as_tensor(w)
        text = [e[ids] * mask[..., None] for e in self.embed]
        text, mask = trim_text(text, mask)
        grid = self.pixel.latent_grid(bucket.height, bucket.width)
        return Batch(self.pixel.encode(images), text, mask, grid, images=images)

    def batch(self, step: int, data_rank: int, data_world: int) -> Batch:
        rng = step_rng(self.seed, step, data_rank, 2)
        area = self.table.draw_area(rng)
        ratio = self.table.ratios[int(rng.integers(len(self.table.ratios)))]
        bucket = self.table.get(area, ratio)
        return self._make(rng, bucket, bucket.batch)

    def preview(self, n: int) -> Batch:
        bucket = self.table.get(self.table.areas[0], self.table.ratios[0])
        return self._make(np.random.default_rng([self.seed, 99]), bucket, n)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# -- frozen encoders over a raw source ---------------------------------------------------
@dataclass
class RawBatch:
    """Decoded images of one bucket and their captions."""

    images: torch.Tensor  # [B, 3, H, W] uint8
    captions: List[str]
    skipped: int = 0
    skip_reasons: Dict[str, int] = field(default_factory=dict)


class EncodedSource:
    """A DataSource from a raw (images + captions) source and frozen encoders:
    ``image_encoder.encode([-1, 1] images) -> tokens`` (LensVAE or PixelSpace) and
    ``text_encoder.encode(captions, max_sequence_length=, device=) -> (features, mask)``
    (LensTextEncoder). Both run without gradients on ``device``."""

    def __init__(self, raw, image_encoder, text_encoder, device="cpu", max_text_tokens: int = 512):
        self.raw, self.image_encoder, self.text_encoder = raw, image_encoder, text_encoder
        self.device, self.max_text_tokens = torch.device(device), max_text_tokens

    @torch.no_grad()
    def _encode(self, raw: RawBatch) -> Batch:
        images = raw.images.to(self.device, non_blocking=True).float() / 127.5 - 1.0
        latents = self.image_encoder.encode(images)
        grid = self.image_encoder.latent_grid(images.shape[2], images.shape[3])
        text, mask = self.text_encoder.encode(list(raw.captions), max_sequence_length=self.max_text_tokens,
                                              device=self.device)
        return Batch(latents, list(text), mask.bool(), tuple(grid), raw.skipped, list(raw.captions), images)

    def batch(self, step: int, data_rank: int, data_world: int) -> Batch:
        return self._encode(self.raw.batch(step, data_rank, data_world))

    def preview(self, n: int) -> Batch:
        return self._encode(self.raw.preview(n))

    def state_dict(self) -> dict:
        return self.raw.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.raw.load_state_dict(state)

    def close(self) -> None:
        if hasattr(self.raw, "close"):
            self.raw.close()
