"""Sharding into the trainer's resolution buckets.

Every kept image goes to one bucket of the trainer's table (``lens_fast.train.buckets``,
read from a train config: the paper's 27 = base sides 512/768/1024 x 9 ratios for
``stage2``): its aspect ratio picks the nearest ratio (the rule the trainer's reader uses),
then the largest base side whose bucket the image covers without upscaling (the smallest
when it covers none). With ``resize`` the image is stored at that bucket's size (scaled to
cover, centre-cropped, as the trainer crops), so the trainer reads it without resampling at
that size. Shards hold one bucket each, ``<side>-<W>x<H>-<nnnnnn>.tar``, samples in a
seeded pseudo-random order (the trainer has no shuffle buffer), each sample an image and a
JSON with the caption and the image-size metadata. A shard is written to a temporary name
and renamed when complete, so a shard that exists is whole.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from lens_fast.train.buckets import BucketTable
from lens_fast.train.webdata import resize_center_crop

EXTENSIONS = {"jpg": "jpg", "png": "png", "webp": "webp"}


def bucket_table(name_or_file: str) -> BucketTable:
    """The bucket table of a train config (registered name or YAML)."""
    from lens_fast.train.presets import load_config

    return BucketTable.from_config(load_config(name_or_file).data)


def smallest_bucket_area(table: BucketTable) -> int:
    return min(b.height * b.width for b in table.all())


def assign_bucket(width: int, height: int, table: BucketTable) -> Tuple[int, str, int, int, bool]:
    """(base side, ratio, bucket height, bucket width, upscaled) for an image."""
    ratio = table.nearest_ratio(width, height)
    fitting = [a for a in sorted(table.areas) if max(table.get(a, ratio).height / height,
                                                     table.get(a, ratio).width / width) <= 1.0]
    area = fitting[-1] if fitting else min(table.areas)
    b = table.get(area, ratio)
    return area, ratio, b.height, b.width, not fitting


def bucket_name(area: int, ratio: str) -> str:
    return f"{area}-{ratio.replace(':', 'x')}"


def sample_key(item_id: str) -> str:
    return hashlib.sha256(item_id.encode()).hexdigest()[:20]


def plan_shards(rows: List[dict], samples_per_shard: int, seed: int) -> List[dict]:
    """rows: {"id", "bucket"} -> [{"name", "bucket", "ids"}], deterministic."""
    by_bucket: Dict[str, List[str]] = {}
    for r in rows:
        by_bucket.setdefault(r["bucket"], []).append(r["id"])
    plan = []
    for bucket in sorted(by_bucket):
        ids = sorted(by_bucket[bucket], key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        for n, start in enumerate(range(0, len(ids), samples_per_shard)):
            plan.append({"name": f"{bucket}-{n:06d}.tar", "bucket": bucket,
                         "ids": ids[start:start + samples_per_shard]})
    return plan


def fit_image(image: Image.Image, height: int, width: int, resize: bool) -> Image.Image:
    if not resize:
        return image
    return Image.fromarray(np.ascontiguousarray(resize_center_crop(image, height, width).transpose(1, 2, 0)))


def write_tar(path: str, samples: List[Tuple[str, str, bytes, dict]]) -> None:
    """Atomically write (key, image extension, image bytes, json) samples to ``path``."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ext, data, meta in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.json", json.dumps(meta, sort_keys=True).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, path)
