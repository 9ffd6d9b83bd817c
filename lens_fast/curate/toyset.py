"""A Lens-world image set with planted defects: the curation pipeline's toy proof.

``make_toy_set(folder, ...)`` writes clean toy-world scenes and, for each kind of defect
the pipeline must remove, images that carry exactly that defect, plus ``truth.jsonl``
beside the folder saying which is which (and which clean image each near-duplicate
copies). The stage each defect is planted for:

====================  =========  ========================================================
kind                  stage      how it is made
====================  =========  ========================================================
``corrupt``           decode     a truncated PNG, random bytes, an empty file, text
``too_small``         area       a clean scene rendered at 16-24 px a side
``blurred``           clarity    a clean scene, Gaussian blur of 7% of the short side
``flat``              entropy    one solid colour (value 0.3-0.8)
``near_black``        luminance  a scene scaled to 6% brightness, sensor noise sigma 1.5
``near_white``        luminance  a scene washed out to 4% contrast under white, noise 1.5
``near_duplicate``    dedup      a clean image moved by 1-2 px, noise sigma 1.5, JPEG q90
====================  =========  ========================================================

Clean scenes are the toy world less two corners that no grayscale measure can tell from
a defect (measured, see STAGES.md): the ``white`` background (a white canvas with a few
shapes has a mean V of 0.99-0.999, as bright as a washed-out image) and yellow shapes on
``light grey`` (2 gray levels apart of 255: flat to clarity and entropy). ``restrict=False``
draws from the whole world, to measure what those corners cost. Every clean scene is
distinct (no accidental duplicates among the clean images).
"""
from __future__ import annotations

import io
import json
import os
from typing import List, Optional

import numpy as np
from PIL import Image, ImageFilter

from ..errors import OutputExists
from ..toy.scene import render_scene, sample_scene

KINDS = ("clean", "corrupt", "too_small", "blurred", "flat", "near_black", "near_white", "near_duplicate")
EXPECTED_STAGE = {"corrupt": "decode", "too_small": "area", "blurred": "clarity", "flat": "entropy",
                  "near_black": "luminance", "near_white": "luminance", "near_duplicate": "dedup"}
CANVASES = ((72, 72), (72, 108), (108, 72))  # (width, height): 1:1, 2:3, 3:2
BLUR_FRACTION = 0.07
NOISE_SIGMA = 1.5


def usable_scene(scene) -> bool:
    """Outside the two corners of the world that grayscale measures cannot judge."""
    if scene.background == "white":
        return False
    return not (scene.background == "light grey" and any(o.color == "yellow" for o in scene.objects))


def _scene_key(scene) -> tuple:
    return (scene.background, tuple(sorted((o.shape, o.color, o.size, o.row, o.col) for o in scene.objects)))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _noisy(arr: np.ndarray, rng: np.random.Generator, sigma: float = NOISE_SIGMA) -> np.ndarray:
    return np.clip(arr.astype(np.float64) + rng.normal(0.0, sigma, arr.shape) + 0.5, 0, 255).astype(np.uint8)


def _corrupt(i: int, rng: np.random.Generator, good: bytes) -> bytes:
    kind = i % 4
    if kind == 0:
        return good[: len(good) // 2]  # truncated: the header parses, the pixels do not
    if kind == 1:
        return rng.integers(0, 256, 600, dtype=np.uint8).tobytes()
    if kind == 2:
        return b""
    return b"this is not an image\n" * 8


class _SceneDraw:
    def __init__(self, seed: int, restrict: bool):
        self.rng = np.random.default_rng([seed, 0xC0A7E])
        self.restrict = restrict
        self.seen = set()

    def __call__(self):
        while True:
            scene = sample_scene(self.rng)
            key = _scene_key(scene)
            if key in self.seen or (self.restrict and not usable_scene(scene)):
                continue
            self.seen.add(key)
            return scene


def make_toy_set(folder: str, n_clean: int = 300, n_defect: int = 30, seed: int = 0, restrict: bool = True,
                 truth_path: Optional[str] = None) -> List[dict]:
    """Write the set into ``folder`` (created; refused if it holds files) and its truth to
    ``truth_path`` (default ``folder + '.truth.jsonl'``). Returns the truth rows:
    {"file", "kind", "scene" (dict or None), "duplicate_of" (file or None)}."""
    if os.path.isdir(folder) and os.listdir(folder):
        raise OutputExists(f"{folder} already holds files; expected a new or empty folder")
    os.makedirs(folder, exist_ok=True)
    draw = _SceneDraw(seed, restrict)
    rng = np.random.default_rng([seed, 0xDEFEC7])
    rows: List[dict] = []

    def put(name: str, data: bytes, kind: str, scene=None, duplicate_of=None):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        rows.append({"file": name, "kind": kind, "scene": None if scene is None else scene.to_dict(),
                     "duplicate_of": duplicate_of})

    clean = []
    for i in range(n_clean):
        scene = draw()
        w, h = CANVASES[i % len(CANVASES)]
        arr = np.asarray(render_scene(scene, w, h))
        name = f"clean_{i:05d}.png"
        put(name, _png(arr), "clean", scene)
        clean.append((name, scene, arr))
    for i in range(n_defect):
        scene = draw()
        w, h = CANVASES[i % len(CANVASES)]
        arr = np.asarray(render_scene(scene, w, h))
        put(f"corrupt_{i:05d}.png", _corrupt(i, rng, _png(arr)), "corrupt", scene)
        side = int(rng.integers(16, 25))
        small = np.asarray(render_scene(draw(), side, side + int(rng.integers(0, 4)), supersample=4))
        put(f"too_small_{i:05d}.png", _png(small), "too_small")
        scene = draw()
        img = render_scene(scene, w, h).filter(ImageFilter.GaussianBlur(BLUR_FRACTION * min(w, h)))
        put(f"blurred_{i:05d}.png", _png(np.asarray(img)), "blurred", scene)
        value = rng.uniform(0.3, 0.8)
        rgb = rng.uniform(0.0, 1.0, 3)
        rgb = np.round(rgb / rgb.max() * value * 255).astype(np.uint8)
        put(f"flat_{i:05d}.png", _png(np.broadcast_to(rgb, (h, w, 3)).copy()), "flat")
        scene = draw()
        dark = np.asarray(render_scene(scene, w, h)).astype(np.float64) * 0.06
        put(f"near_black_{i:05d}.png", _png(_noisy(dark, rng)), "near_black", scene)
        scene = draw()
        washed = 255.0 - (255.0 - np.asarray(render_scene(scene, w, h)).astype(np.float64)) * 0.04
        put(f"near_white_{i:05d}.png", _png(_noisy(washed, rng)), "near_white", scene)
        name, scene, arr = clean[int(rng.integers(len(clean)))] if clean else (None, draw(), None)
        if arr is None:
            arr = np.asarray(render_scene(scene, w, h))
        dy, dx = (int(v) * int(rng.choice([-1, 1])) for v in rng.integers(1, 3, 2))
        moved = np.roll(arr, (dy, dx), axis=(0, 1))
        buf = io.BytesIO()
        Image.fromarray(_noisy(moved, rng)).save(buf, "JPEG", quality=90)
        put(f"near_duplicate_{i:05d}.jpg", buf.getvalue(), "near_duplicate", scene, name)
    with open(truth_path or folder.rstrip("/") + ".truth.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows
