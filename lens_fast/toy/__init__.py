"""The Lens world: a miniature text-to-image dataset and its GenEval-style scorer.

Pure numpy + PIL (importing it pulls in no torch). One to four coloured shapes
(circle, square, triangle) in six palette colours, two sizes, on a 3x3 grid, over five
backgrounds (plain, graded or grained), rendered anti-aliased at any canvas size.

Scenes (``scene.py``)
    sample_scene(rng, tag=None, exclude=None) -> Scene      # frozen dataclass
    Scene.to_dict() / Scene.from_dict(d)                     # JSON-safe, re-renderable
    render_scene(scene, width, height, background=None, supersample=4,
                 color_jitter=0, rng=None) -> PIL.Image (RGB)
    aspect_buckets(base, ratios=((1,2),(2,3),(1,1),(3,2),(2,1)), multiple=8)
        -> [(width, height)]; ratios are width:height. aspect_buckets(48) ==
        [(32, 64), (40, 56), (48, 48), (56, 40), (64, 32)].
Captions (``captions.py``)
    dense_caption(scene) -> str        # 40-100 words: every object, counts, places, relations
    brief_caption(scene, colors=None) -> str   # the GenEval-style prompt of its tag
    layout_caption(scene) -> str       # compact, complete: "top left small red circle, ..., on plain white"
    metadata(scene) -> {"tag", "include", "prompt"[, "exclude"]}
Data and held-out prompts (``prompts.py``)
    make_samples(n, seed, buckets=aspect_buckets(48), tags=TAGS, color_jitter=0)
        -> [{"image", "dense", "brief", "metadata", "scene", "size"}], never held out
    heldout_prompts(n_per_tag, seed) -> [{"prompt", "metadata", "scene"}], all held out
    is_heldout(scene) -> bool
Prompt rewriting (``rewrite.py``)
    parse_prompt(prompt) -> {"objects": [(count, colour or None, class)], "relation"}
    rewrite_scene(prompt, seed) -> Scene   # satisfies the prompt; what it leaves open is drawn
    rewrite_prompt(prompt, seed, max_words=100, style="dense"|"layout") -> str
Scoring (``shapeeval.py``)
    score_image(image, metadata) -> {"correct", "reason", "objects", "background", ...}
    score_set(images, metadatas) -> {"per_tag", "overall", "n", "n_per_tag", "results"}
    detect_objects(image) -> (objects, info)

Tags follow GenEval: single_object ("a circle"), two_object ("a circle and a square"),
counting ("three circles", exact count), colors ("a red circle"), position ("a triangle
to the left of a circle") and color_attr ("a red circle and a blue square"). Every
object always has a colour in the scene and the dense caption; a brief caption and its
metadata name colours only for colors and color_attr, as GenEval's prompts do
(``brief_caption(scene, colors=True)`` names them all).

Sizes: a shape's box is 0.21 (small) or 0.30 (large) of the canvas short side: 7.6 and
10.8 px at the demo's 36 px. ShapeEval scores renders (with +-25 colour jitter) 1.0 on every tag
from a 24 px short side (5 px shapes) to 512 px in our tests; below 24 px it is
untested, and 32 px is the smallest we would call comfortable.
"""
from .captions import brief_caption, dense_caption, layout_caption, metadata
from .prompts import (HELDOUT_COLOR_CLASS, HELDOUT_LAYOUTS, heldout_prompts, is_heldout,
                      make_samples)
from .scene import (BACKGROUNDS, CLASSES, COLORS, PALETTE, RELATIONS, SIZES, TAGS, Scene,
                    ShapeObject, aspect_buckets, render_scene, sample_scene)
from .rewrite import parse_prompt, rewrite_prompt, rewrite_scene
from .shapeeval import detect_objects, score_image, score_set

__all__ = [
    "BACKGROUNDS", "CLASSES", "COLORS", "HELDOUT_COLOR_CLASS", "HELDOUT_LAYOUTS", "PALETTE",
    "RELATIONS", "SIZES", "TAGS", "Scene", "ShapeObject", "aspect_buckets", "brief_caption",
    "dense_caption", "detect_objects", "heldout_prompts", "is_heldout", "layout_caption", "make_samples",
    "metadata", "parse_prompt", "render_scene", "rewrite_prompt", "rewrite_scene", "sample_scene",
    "score_image", "score_set",
]
