"""Lens world scenes: the vocabulary, the scene record, sampling and rendering.

A scene is canvas-independent: each object has a class, a palette colour, a size (a
fraction of the canvas short side) and a cell of a 3x3 grid laid over the whole canvas,
so one scene re-renders at any width x height. Rendering trades exactness for speed:
PIL draws the shapes at `supersample` times the size and a box filter (`Image.reduce`)
gives the anti-aliased image: about 0.1 ms of CPU time for a 48x48 sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
CLASSES = ("circle", "square", "triangle")
# Well separated in RGB: every pair is >= 86 apart, and a per-object shift of +-25 per
# channel moves a colour along any pair's joining line by less than half that pair's
# distance (worst case yellow/orange: 29 of 43), so it never flips the nearest colour.
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 220, 40),
    "purple": (150, 60, 190),
    "orange": (245, 135, 25),
}
COLORS = tuple(PALETTE)
# Colours the world can draw and ShapeEval can see but that sampling never draws: the demo
# model never meets them, so teaching one is a new concept (lens_fast.toy.lora_stage).
# Cyan is >= 122 from every palette colour and >= 175 from every background.
UNSEEN_PALETTE = {"cyan": (30, 200, 200)}
ALL_PALETTE = {**PALETTE, **UNSEEN_PALETTE}
# Every background is >= 110 away from every object colour in RGB.
BACKGROUNDS = {
    "white": (255, 255, 255),
    "light grey": (205, 205, 205),
    "beige": (238, 228, 205),
    "dark grey": (60, 60, 60),
    "black": (18, 18, 22),
}
TEXTURES = ("flat", "gradient", "noise")
# Side of the object's bounding square as a fraction of the canvas short side. A grid
# cell is 1/3 of a side, so two large objects in neighbouring cells keep a gap of
# 0.033 of the short side (1.2 px at 36 px); at the demo's 36 px a small object is 7.6 px
# wide and a large one 10.8 px (0.19 / 0.28 until 2026-11-27: the demo's model then drew
# circles and squares alike, README "The demo").
SIZES = {"small": 0.21, "large": 0.30}
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below",
                    "below": "above"}
GRID = 3
_SQUARE_SIDE = 0.9      # a square is drawn a little inside its box, closer in area to the circle
_GRADIENT_DELTA = 12.0  # +- per channel, top to bottom
_NOISE_AMPLITUDE = 6.0  # +- per channel, uniform grain


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {list(allowed)}")


@dataclass(frozen=True)
class ShapeObject:
    """One shape: class, palette colour name, size name and grid cell (row 0 = top)."""
    shape: str
    color: str
    size: str
    row: int
    col: int

    def __post_init__(self):
        _check_choice("shape", self.shape, CLASSES)
        _check_choice("color", self.color, ALL_PALETTE)
        _check_choice("size", self.size, SIZES)
        _check_choice("row", self.row, range(GRID))
        _check_choice("col", self.col, range(GRID))

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    def to_dict(self) -> dict:
        return {"class": self.shape, "color": self.color, "size": self.size,
                "cell": [self.row, self.col]}

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeObject":
        row, col = d["cell"]
        return cls(shape=d["class"], color=d["color"], size=d["size"], row=int(row), col=int(col))


@dataclass(frozen=True)
class Scene:
    """A full scene: 1 to 9 objects in distinct cells (sample_scene draws 1 to 4).
    `relation` is set for the position tag only: how objects[1] sits relative to
    objects[0] (GenEval's "position": [relation, 0])."""
    tag: str
    objects: tuple[ShapeObject, ...]
    background: str = "white"
    texture: str = "flat"
    texture_seed: int = 0
    relation: str | None = field(default=None)

    def __post_init__(self):
        _check_choice("tag", self.tag, TAGS)
        _check_choice("background", self.background, BACKGROUNDS)
        _check_choice("texture", self.texture, TEXTURES)
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= GRID * GRID:
            raise ValueError(f"a scene holds 1 to {GRID * GRID} objects, got {len(self.objects)}")
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must sit in distinct cells, got cells {cells}")
        if self.relation is not None:
            _check_choice("relation", self.relation, RELATIONS)
            got = cell_relation(self.objects[1], self.objects[0]) if len(self.objects) > 1 else None
            if got != self.relation:
                raise ValueError(f"relation={self.relation!r} does not hold between cells "
                                 f"{cells[:2]} (they give {got!r})")

    def to_dict(self) -> dict:
        return {"tag": self.tag, "objects": [o.to_dict() for o in self.objects],
                "background": self.background, "texture": self.texture,
                "texture_seed": self.texture_seed, "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tag=d["tag"], objects=tuple(ShapeObject.from_dict(o) for o in d["objects"]),
                   background=d.get("background", "white"), texture=d.get("texture", "flat"),
                   texture_seed=int(d.get("texture_seed", 0)), relation=d.get("relation"))


def as_scene(scene: Scene | dict) -> Scene:
    if isinstance(scene, Scene):
        return scene
    if isinstance(scene, dict):
        return Scene.from_dict(scene)
    raise TypeError(f"expected a Scene or its dict, got {type(scene).__name__}")


def cell_relation(a: ShapeObject, b: ShapeObject) -> str | None:
    """Where `a` sits relative to `b` on the grid, by the dominant axis; None when the
    offset is exactly diagonal (ambiguous) or zero."""
    dc, dr = a.col - b.col, a.row - b.row
    if abs(dc) > abs(dr):
        return "left of" if dc < 0 else "right of"
    if abs(dr) > abs(dc):
        return "above" if dr < 0 else "below"
    return None


def aspect_buckets(base: int, ratios=((1, 2), (2, 3), (1, 1), (3, 2), (2, 1)),
                   multiple: int = 8) -> list[tuple[int, int]]:
    """(width, height) canvases of about base*base pixels, one per width:height ratio,
    each side rounded to the nearest multiple of `multiple` (and at least `multiple`)."""
    if base <= 0 or multiple <= 0:
        raise ValueError(f"base and multiple must be positive, got base={base}, multiple={multiple}")
    out = []
    for ratio in ratios:
        a, b = ratio
        if a <= 0 or b <= 0:
            raise ValueError(f"ratio {ratio!r} must be two positive numbers (width, height)")
        w = base * math.sqrt(a / b)
        h = base * math.sqrt(b / a)
        out.append((max(multiple, multiple * round(w / multiple)),
                    max(multiple, multiple * round(h / multiple))))
    return out


# ---------------------------------------------------------------- sampling
def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _random_cells(rng: np.random.Generator, k: int) -> list[tuple[int, int]]:
    flat = rng.choice(GRID * GRID, size=k, replace=False)
    return [(int(i) // GRID, int(i) % GRID) for i in flat]


_ALL_CELLS = [(r, c) for r in range(GRID) for c in range(GRID)]


def _relation_cell_pairs(relation: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(cell of objects[0], cell of objects[1]) pairs where objects[1] is `relation` of [0]."""
    pairs = []
    for c0 in _ALL_CELLS:
        for c1 in _ALL_CELLS:
            if c0 != c1 and cell_relation(ShapeObject("circle", "red", "small", *c1),
                                          ShapeObject("circle", "red", "small", *c0)) == relation:
                pairs.append((c0, c1))
    return pairs


_RELATION_PAIRS = {rel: _relation_cell_pairs(rel) for rel in RELATIONS}


def _draw_scene(rng: np.random.Generator, tag: str) -> Scene:
    def size() -> str:
        return _pick(rng, tuple(SIZES))

    def color() -> str:
        return _pick(rng, COLORS)

    relation = None
    if tag in ("single_object", "colors"):
        (cell,) = _random_cells(rng, 1)
        objs = [ShapeObject(_pick(rng, CLASSES), color(), size(), *cell)]
    elif tag in ("two_object", "color_attr", "position"):
        classes = [CLASSES[int(i)] for i in rng.choice(len(CLASSES), size=2, replace=False)]
        if tag == "color_attr":
            colors = [COLORS[int(i)] for i in rng.choice(len(COLORS), size=2, replace=False)]
        else:
            colors = [color(), color()]
        if tag == "position":
            relation = _pick(rng, RELATIONS)
            cells = list(_pick(rng, _RELATION_PAIRS[relation]))
        else:
            cells = _random_cells(rng, 2)
        objs = [ShapeObject(classes[i], colors[i], size(), *cells[i]) for i in range(2)]
    elif tag == "counting":
        n = int(rng.integers(2, 5))
        shape = _pick(rng, CLASSES)
        objs = [ShapeObject(shape, color(), size(), *cell) for cell in _random_cells(rng, n)]
    else:
        raise ValueError(f"tag={tag!r} is not valid; expected one of {list(TAGS)}")
    return Scene(tag=tag, objects=tuple(objs), background=_pick(rng, tuple(BACKGROUNDS)),
                 texture=_pick(rng, ("flat", "flat", "gradient", "noise")),
                 texture_seed=int(rng.integers(2**31)), relation=relation)


def sample_scene(rng: np.random.Generator, tag: str | None = None, exclude=None,
                 max_tries: int = 1000) -> Scene:
    """A random scene for `tag` (uniform over TAGS when None). `exclude(scene) -> bool`
    rejects scenes (e.g. `is_heldout`); sampling retries up to `max_tries` times."""
    if tag is not None:
        _check_choice("tag", tag, TAGS)
    for _ in range(max_tries):
        scene = _draw_scene(rng, tag if tag is not None else _pick(rng, TAGS))
        if exclude is None or not exclude(scene):
            return scene
    raise RuntimeError(f"no scene for tag={tag!r} passed exclude={exclude!r} in {max_tries} tries")


# ---------------------------------------------------------------- rendering
def object_box(obj: ShapeObject, width: int, height: int) -> tuple[float, float, float]:
    """(centre x, centre y, side) of the object's bounding square, in output pixels."""
    side = SIZES[obj.size] * min(width, height)
    return ((obj.col + 0.5) * width / GRID, (obj.row + 0.5) * height / GRID, side)


def _shape_outline(shape: str, cx: float, cy: float, side: float):
    h = side / 2
    if shape == "circle":
        return "ellipse", [cx - h, cy - h, cx + h, cy + h]
    if shape == "square":
        q = h * _SQUARE_SIDE
        return "rectangle", [cx - q, cy - q, cx + q, cy + q]
    return "polygon", [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]


def _resolve_background(background) -> tuple[int, int, int]:
    if isinstance(background, str):
        _check_choice("background", background, BACKGROUNDS)
        return BACKGROUNDS[background]
    rgb = tuple(int(v) for v in background)
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"background={background!r}: expected a name or an RGB triple in 0..255")
    return rgb


def render_scene(scene: Scene | dict, width: int, height: int, background=None,
                 supersample: int = 4, color_jitter: int = 0,
                 rng: np.random.Generator | None = None) -> Image.Image:
    """Render `scene` to an RGB image of width x height. `background` (a name from
    BACKGROUNDS or an RGB triple) overrides the scene's; `color_jitter` shifts each
    object's colour by up to +-that much per channel (drawn from `rng`, by default one
    seeded by the scene's texture_seed)."""
    scene = as_scene(scene)
    if width < 8 or height < 8:
        raise ValueError(f"canvas {width}x{height} is too small; expected both sides >= 8")
    if supersample < 1:
        raise ValueError(f"supersample={supersample}: expected an integer >= 1")
    bg = _resolve_background(scene.background if background is None else background)
    ss = int(supersample)
    big = Image.new("RGB", (width * ss, height * ss), bg)
    draw = ImageDraw.Draw(big)
    textured = scene.texture != "flat"
    if textured:
        mask = Image.new("L", big.size, 0)
        mdraw = ImageDraw.Draw(mask)
    if color_jitter and rng is None:
        rng = np.random.default_rng(scene.texture_seed)
    for obj in scene.objects:
        rgb = ALL_PALETTE[obj.color]
        if color_jitter:
            shift = rng.integers(-color_jitter, color_jitter + 1, size=3)
            rgb = tuple(int(np.clip(v + s, 0, 255)) for v, s in zip(rgb, shift))
        cx, cy, side = object_box(obj, width, height)
        kind, geom = _shape_outline(obj.shape, cx * ss, cy * ss, side * ss)
        getattr(draw, kind)(geom, fill=rgb)
        if textured:
            getattr(mdraw, kind)(geom, fill=255)
    img = big.reduce(ss) if ss > 1 else big
    if not textured:
        return img
    cover = np.asarray(mask.reduce(ss) if ss > 1 else mask, dtype=np.float32) / 255.0
    if scene.texture == "gradient":
        ramp = np.linspace(_GRADIENT_DELTA, -_GRADIENT_DELTA, height, dtype=np.float32)
        tex = np.broadcast_to(ramp[:, None, None], (height, width, 3))
    else:
        trng = np.random.default_rng(scene.texture_seed)
        grain = trng.uniform(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE, size=(height, width, 1))
        tex = np.broadcast_to(grain.astype(np.float32), (height, width, 3))
    arr = np.asarray(img, dtype=np.float32) + tex * (1.0 - cover)[..., None]
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")
