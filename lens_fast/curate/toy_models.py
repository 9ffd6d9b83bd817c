"""The toy world's own "VLM" and "CLIP", for the curation demo and tests.

Real runs caption with a VLM behind an OpenAI-compatible endpoint and embed with CLIP.
On the toy world both can be replaced by what the world itself knows: ShapeEval
(``lens_fast.toy.shapeeval``) reads every shape's class, colour and place from the pixels,
and from those this module rebuilds the scene, so

- ``caption_handler`` (a ``lens_fast.chat_server`` handler: ``--handler
  lens_fast.curate.toy_models:caption_handler``) answers a captioning request with the
  toy world's dense caption of the image it was sent, through the same HTTP protocol a
  vLLM server speaks;
- ``scene_embedding`` is a "semantic" embedding (one unit per object's class x colour x
  size x cell, one for the background): two renders of the same scene have cosine 1,
  scenes that differ in any object have cosine <= 0.8. The dedup stage uses it through
  ``embedder: toy`` exactly as it uses CLIP's.
"""
from __future__ import annotations

import numpy as np

from ..errors import InvalidValue
from ..toy.captions import dense_caption
from ..toy.scene import BACKGROUNDS, CLASSES, COLORS, GRID, SIZES, Scene, ShapeObject
from ..toy.shapeeval import detect_objects, estimate_background

SIZE_SPLIT = 0.24  # bbox side / short side: small shapes are 0.19-0.21, large ones 0.27-0.30
_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float64)
EMBED_DIM = len(CLASSES) * len(COLORS) * len(SIZES) * GRID * GRID + len(_BG_NAMES)


def _texture(arr: np.ndarray, bg: np.ndarray) -> str:
    """flat / gradient / noise from the background pixels (within 30 of its median): the
    renderer's ramp runs +-12 per channel from top to bottom, its grain is +-6 a pixel."""
    gray = arr.mean(axis=2)
    mask = np.linalg.norm(arr - bg, axis=2) <= 30.0
    rows = np.nonzero(mask.sum(axis=1) >= 3)[0]
    if rows.size < 3:
        return "flat"
    means = np.array([gray[r][mask[r]].mean() for r in rows])
    slope = np.polyfit(rows.astype(np.float64), means, 1)[0]
    if abs(slope) * arr.shape[0] > 12.0:
        return "gradient"
    residual = np.concatenate([gray[r][mask[r]] - m for r, m in zip(rows, means)])
    return "noise" if residual.std() > 1.5 else "flat"


def read_scene(image):
    """The scene ShapeEval sees in a PIL image, or None when it finds no shape."""
    image = image.convert("RGB")
    objects, info = detect_objects(image)
    if not objects:
        return None
    w, h = image.size
    short = min(w, h)
    by_cell = {}
    for o in objects:  # one shape per cell (the larger wins), listed in reading order
        x0, y0, x1, y1 = o["bbox_px"]
        side = max(x1 - x0, y1 - y0) / short
        cell = (min(GRID - 1, int(o["centroid"][1] * GRID)), min(GRID - 1, int(o["centroid"][0] * GRID)))
        if cell not in by_cell or side > by_cell[cell][0]:
            size = "large" if side > SIZE_SPLIT else "small"
            by_cell[cell] = (side, ShapeObject(o["class"], o["color"], size, *cell))
    shapes = [by_cell[c][1] for c in sorted(by_cell)]
    arr = np.asarray(image, dtype=np.float64)
    bg = np.asarray(info["background"], dtype=np.float64)
    background = _BG_NAMES[int(np.linalg.norm(_BG_RGB - bg, axis=1).argmin())]
    classes = {s.shape for s in shapes}
    tag = "single_object" if len(shapes) == 1 else ("counting" if len(classes) == 1 else "two_object")
    return Scene(tag=tag, objects=tuple(shapes[:GRID * GRID]), background=background, texture=_texture(arr, bg))


def toy_caption(image) -> str:
    scene = read_scene(image)
    if scene is None:
        _, frac, _ = estimate_background(np.asarray(image.convert("RGB"), dtype=np.float32))
        return "An image with no recognisable shape." if frac >= 0.5 else "An image of noise with no clear content."
    return dense_caption(scene)


def caption_handler(request: dict) -> str:
    """Chat-server handler: the dense caption of the (last) image in the request."""
    from ..chat_api import decode_image_part

    for message in reversed(request.get("messages", [])):
        content = message.get("content")
        if isinstance(content, list):
            for part in reversed(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    return toy_caption(decode_image_part(part))
    raise InvalidValue("the request holds no image_url part to caption")


def scene_embedding(image) -> np.ndarray:
    """A unit vector over (class, colour, size, cell) per object plus the background."""
    vec = np.zeros(EMBED_DIM, dtype=np.float32)
    scene = read_scene(image)
    if scene is not None:
        for o in scene.objects:
            index = (((CLASSES.index(o.shape) * len(COLORS) + COLORS.index(o.color)) * len(SIZES)
                      + list(SIZES).index(o.size)) * GRID + o.row) * GRID + o.col
            vec[index] += 1.0
        vec[EMBED_DIM - len(_BG_NAMES) + _BG_NAMES.index(scene.background)] = 1.0
    else:  # no shape: only the background unit, from the border's median colour
        bg, _, _ = estimate_background(np.asarray(image.convert("RGB"), dtype=np.float32))
        vec[EMBED_DIM - len(_BG_NAMES) + int(np.linalg.norm(_BG_RGB - bg, axis=1).argmin())] = 1.0
    return vec / np.linalg.norm(vec)
