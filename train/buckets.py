"""Aspect-ratio buckets: base areas x W:H ratios, sides multiples of ``multiple``.

Each bucket's size is ``lens_fast.resolutions.bucket_size`` (the official inference
resolutions scaled to the base side for the nine official ratios). Each step a rank draws
one base area (weighted), then the images' own aspect ratios pick the ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from lens_fast.errors import InvalidValue
from lens_fast.resolutions import bucket_size, parse_ratio


@dataclass(frozen=True)
class Bucket:
    area: int
    ratio: str
    height: int
    width: int
    batch: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


class BucketTable:
    """All buckets of a config and the per-step area draw."""

    def __init__(self, areas: Sequence[int], ratios: Sequence[str], batch_per_area: Dict[int, int],
                 area_weights: Optional[Sequence[float]] = None, multiple: int = 16):
        self.areas = [int(a) for a in areas]
        self.ratios = list(ratios)
        self.multiple = multiple
        missing = [a for a in self.areas if a not in batch_per_area]
        if missing:
            raise InvalidValue(f"batch_per_area {dict(batch_per_area)} has no batch size for area(s) {missing}")
        self.buckets: Dict[Tuple[int, str], Bucket] = {}
        for a in self.areas:
            for r in self.ratios:
                h, w = bucket_size(a, r, multiple)
                self.buckets[(a, r)] = Bucket(a, r, h, w, int(batch_per_area[a]))
        weights = np.ones(len(self.areas)) if area_weights is None else np.asarray(area_weights, dtype=np.float64)
        self.weights = weights / weights.sum()
        self._log_ratios = np.log([parse_ratio(r) for r in self.ratios])

    @classmethod
    def from_config(cls, data_cfg) -> "BucketTable":
        return cls(data_cfg.areas, data_cfg.ratios, data_cfg.batch_per_area, data_cfg.area_weights,
                   data_cfg.multiple)

    def __len__(self) -> int:
        return len(self.buckets)

    def all(self) -> List[Bucket]:
        return list(self.buckets.values())

    def draw_area(self, rng: np.random.Generator) -> int:
        return self.areas[int(rng.choice(len(self.areas), p=self.weights))]

    def nearest_ratio(self, width: int, height: int) -> str:
        """The configured ratio closest to W/H in log space."""
        return self.ratios[int(np.argmin(np.abs(self._log_ratios - math.log(width / height))))]

    def get(self, area: int, ratio: str) -> Bucket:
        return self.buckets[(area, ratio)]


def step_rng(seed: int, step: int, data_rank: int, stream: int) -> np.random.Generator:
    """A generator fixed by (seed, step, data rank, stream): the same draws whatever
    the world size, and after a resume."""
    return np.random.default_rng([int(seed), int(step), int(data_rank), int(stream)])
