"""Training samples and held-out evaluation prompts for the Lens world.

The split is a fixed rule on compositions (`is_heldout`), never on random ids:
  * four (colour, class) pairs never appear anywhere in training images: a red triangle,
    a green square, a blue circle, an orange square;
  * three spatial layouts of two classes never appear (in either phrasing): a triangle
    left of a circle, a square above a triangle, a circle above a square.
Every colour still appears with at least two classes and every class with four or more
colours; every class pair still appears in the other relations, so the held-out set is
learnable compositionally. `make_samples` never emits a held-out scene; `heldout_prompts`
emits only held-out scenes, and for colors / color_attr / position it also makes the
prompt text itself novel (the held-out pair or layout is what the prompt names).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .captions import brief_caption, dense_caption, metadata
from .scene import (INVERSE_RELATION, TAGS, TEXTURES, Scene, as_scene, aspect_buckets,
                    cell_relation, render_scene, sample_scene)

HELDOUT_COLOR_CLASS = frozenset({("red", "triangle"), ("green", "square"),
                                 ("blue", "circle"), ("orange", "square")})
_LAYOUTS = (("triangle", "left of", "circle"), ("square", "above", "triangle"),
            ("circle", "above", "square"))
# (class a, relation of a to b, class b), both phrasings of each layout.
HELDOUT_LAYOUTS = frozenset(_LAYOUTS) | frozenset((b, INVERSE_RELATION[r], a) for a, r, b in _LAYOUTS)
DEFAULT_BUCKETS = tuple(aspect_buckets(48))


def _heldout_pair(scene: Scene) -> bool:
    return any((o.color, o.shape) in HELDOUT_COLOR_CLASS for o in scene.objects)


def _heldout_layout(scene: Scene) -> bool:
    objs = scene.objects
    for a in objs:
        for b in objs:
            if a is not b and a.shape != b.shape:
                if (a.shape, cell_relation(a, b), b.shape) in HELDOUT_LAYOUTS:
                    return True
    return False


def is_heldout(scene: Scene | dict) -> bool:
    """True when the scene holds a held-out (colour, class) pair or spatial layout."""
    scene = as_scene(scene)
    return _heldout_pair(scene) or _heldout_layout(scene)


def _prompt_is_novel(scene: Scene) -> bool:
    """Held out, and for tags whose prompt names colour or relation, held out in what
    the prompt says."""
    if scene.tag in ("colors", "color_attr"):
        return _heldout_pair(scene)
    if scene.tag == "position":
        a, b = scene.objects[1], scene.objects[0]
        return (a.shape, scene.relation, b.shape) in HELDOUT_LAYOUTS
    return is_heldout(scene)


def heldout_prompts(n_per_tag: int, seed: int, tags=TAGS) -> list[dict]:
    """`n_per_tag` held-out prompts per tag, fixed by `seed`: a list of
    {"prompt": brief caption, "metadata": GenEval-style dict, "scene": scene dict}."""
    if n_per_tag < 0:
        raise ValueError(f"n_per_tag={n_per_tag}: expected >= 0")
    out = []
    for k, tag in enumerate(tags):
        if tag not in TAGS:
            raise ValueError(f"tag={tag!r} is not valid; expected one of {list(TAGS)}")
        rng = np.random.default_rng([seed, k, 0x5EED])
        for _ in range(n_per_tag):
            scene = sample_scene(rng, tag, exclude=lambda s: not _prompt_is_novel(s))
            out.append({"prompt": brief_caption(scene), "metadata": metadata(scene),
                        "scene": scene.to_dict()})
    return out


def make_samples(n: int, seed: int, buckets=DEFAULT_BUCKETS, tags=TAGS,
                 color_jitter: int = 0, supersample: int = 4, textures=None,
                 bucket_weights=None) -> list[dict]:
    """`n` training samples, never held out: a list of {"image": PIL RGB, "dense",
    "brief", "metadata", "scene": scene dict, "size": (width, height)}. Each sample's
    canvas is drawn from `buckets` ((width, height) pairs), uniformly or in proportion
    to `bucket_weights` (one non-negative number per bucket), and its tag uniformly from
    `tags`; `color_jitter` shifts object colours by up to +-that per channel;
    `textures` (a subset of TEXTURES) restricts the background textures drawn."""
    if n < 0:
        raise ValueError(f"n={n}: expected >= 0")
    buckets = [tuple(int(v) for v in b) for b in buckets]
    if not buckets or any(len(b) != 2 for b in buckets):
        raise ValueError(f"buckets={buckets!r}: expected a non-empty list of (width, height)")
    share = None
    if bucket_weights is not None:
        w = [float(v) for v in bucket_weights]
        if len(w) != len(buckets) or any(not v >= 0 for v in w) or sum(w) <= 0:
            raise ValueError(f"bucket_weights={list(bucket_weights)!r}: expected {len(buckets)} non-negative "
                             "numbers (one per bucket) with a positive sum")
        share = np.array(w) / sum(w)
    tags = tuple(tags)
    for tag in tags:
        if tag not in TAGS:
            raise ValueError(f"tag={tag!r} is not valid; expected one of {list(TAGS)}")
    if textures is not None:
        textures = tuple(textures)
        bad = [t for t in textures if t not in TEXTURES]
        if not textures or bad:
            raise ValueError(f"textures={textures!r}: expected a non-empty subset of {list(TEXTURES)}")
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        tag = tags[int(rng.integers(len(tags)))]
        scene = sample_scene(rng, tag, exclude=is_heldout)
        if textures is not None and scene.texture not in textures:
            scene = replace(scene, texture=textures[int(rng.integers(len(textures)))])
        if share is None:
            width, height = buckets[int(rng.integers(len(buckets)))]
        else:
            width, height = buckets[int(rng.choice(len(buckets), p=share))]
        image = render_scene(scene, width, height, supersample=supersample,
                             color_jitter=color_jitter, rng=rng)
        samples.append({"image": image, "dense": dense_caption(scene),
                        "brief": brief_caption(scene), "metadata": metadata(scene),
                        "scene": scene.to_dict(), "size": (width, height)})
    return samples
