"""Lens world dataset: scenes, rendering, buckets, captions, metadata, held-out split."""
import time

import numpy as np
import pytest

from lens_fast.toy import (BACKGROUNDS, CLASSES, COLORS, PALETTE, RELATIONS, TAGS, Scene,
                           ShapeObject, aspect_buckets, brief_caption, dense_caption,
                           heldout_prompts, is_heldout, make_samples, metadata,
                           render_scene, sample_scene)
from lens_fast.toy.prompts import HELDOUT_COLOR_CLASS, HELDOUT_LAYOUTS
from lens_fast.toy.scene import cell_relation, object_box


def _scenes(n, seed=0, tag=None, exclude=None):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, tag, exclude=exclude) for _ in range(n)]


# ---------------------------------------------------------------- buckets
def test_aspect_buckets_default_demo_sizes():
    assert aspect_buckets(48) == [(32, 64), (40, 56), (48, 48), (56, 40), (64, 32)]


@pytest.mark.parametrize("base,multiple", [(48, 8), (256, 16), (1024, 16), (100, 4)])
def test_aspect_buckets_follow_ratio_area_and_multiple(base, multiple):
    ratios = ((1, 2), (9, 16), (1, 1), (4, 3), (2, 1))
    for (a, b), (w, h) in zip(ratios, aspect_buckets(base, ratios, multiple)):
        assert w % multiple == 0 and h % multiple == 0
        assert abs(w / h - a / b) / (a / b) < 0.1 + 2 * multiple / base
        assert abs(w * h / base ** 2 - 1) < 0.2


def test_aspect_buckets_reject_bad_input():
    with pytest.raises(ValueError, match="base"):
        aspect_buckets(0)
    with pytest.raises(ValueError, match=r"\(1, 0\)"):
        aspect_buckets(48, ratios=((1, 0),))


# ---------------------------------------------------------------- scenes
def test_scene_dict_round_trip_and_validation():
    for scene in _scenes(60, seed=1):
        assert Scene.from_dict(scene.to_dict()) == scene
    with pytest.raises(ValueError, match="'pink'"):
        ShapeObject("circle", "pink", "small", 0, 0)
    with pytest.raises(ValueError, match="distinct cells"):
        Scene("two_object", (ShapeObject("circle", "red", "small", 1, 1),
                             ShapeObject("square", "blue", "small", 1, 1)))
    with pytest.raises(ValueError, match="'left of' does not hold"):
        Scene("position", (ShapeObject("circle", "red", "small", 1, 0),
                           ShapeObject("square", "blue", "small", 1, 2)), relation="left of")


def test_sample_scene_structure_per_tag():
    for tag in TAGS:
        for s in _scenes(80, seed=2, tag=tag):
            n = len(s.objects)
            shapes = [o.shape for o in s.objects]
            assert s.tag == tag
            if tag in ("single_object", "colors"):
                assert n == 1
            elif tag == "counting":
                assert 2 <= n <= 4 and len(set(shapes)) == 1
            else:
                assert n == 2 and shapes[0] != shapes[1]
            if tag == "color_attr":
                assert s.objects[0].color != s.objects[1].color
            if tag == "position":
                assert s.relation in RELATIONS
                assert cell_relation(s.objects[1], s.objects[0]) == s.relation
            else:
                assert s.relation is None


def test_sample_scene_exclude_and_bad_tag():
    assert all(s.objects[0].color != "red" for s in
               _scenes(50, seed=3, tag="colors", exclude=lambda s: s.objects[0].color == "red"))
    with pytest.raises(ValueError, match="'triangles'"):
        sample_scene(np.random.default_rng(0), "triangles")
    with pytest.raises(RuntimeError, match="exclude"):
        sample_scene(np.random.default_rng(0), "colors", exclude=lambda s: True, max_tries=5)


# ---------------------------------------------------------------- rendering
@pytest.mark.parametrize("size", [(48, 48), (32, 64), (64, 32), (200, 120)])
def test_render_places_each_object_at_its_cell_in_its_colour(size):
    w, h = size
    for scene in _scenes(30, seed=4):
        flat = Scene.from_dict({**scene.to_dict(), "texture": "flat"})
        img = render_scene(flat, w, h)
        assert img.size == (w, h) and img.mode == "RGB"
        arr = np.asarray(img).astype(int)
        for o in flat.objects:
            cx, cy, _ = object_box(o, w, h)
            # below the centre: inside a triangle as well as a circle or square
            assert np.abs(arr[int(cy + 1), int(cx)] - PALETTE[o.color]).max() <= 2
        assert np.abs(arr[0, 0] - BACKGROUNDS[flat.background]).max() <= 2 or \
            any(o.cell == (0, 0) for o in flat.objects)


def test_render_background_override_textures_and_jitter():
    obj = ShapeObject("square", "green", "large", 1, 1)
    plain = np.asarray(render_scene(Scene("colors", (obj,), "white"), 48, 48, background="black"))
    assert tuple(plain[0, 0]) == BACKGROUNDS["black"]
    grad = np.asarray(render_scene(Scene("colors", (obj,), "light grey", "gradient"), 48, 48)).astype(int)
    assert grad[0, 0, 0] - grad[-1, 0, 0] >= 20            # graded top to bottom
    assert tuple(grad[24, 24]) == PALETTE["green"]          # the shape itself is not graded
    noise = np.asarray(render_scene(Scene("colors", (obj,), "beige", "noise", 7), 48, 48)).astype(int)
    corner = noise[:8, :8].reshape(-1, 3) - BACKGROUNDS["beige"]
    assert corner.std() > 1 and np.abs(corner).max() <= 6
    rng = np.random.default_rng(0)
    shifts = {tuple(np.asarray(render_scene(Scene("colors", (obj,)), 48, 48, color_jitter=25,
                                            rng=rng))[24, 24].astype(int) - PALETTE["green"])
              for _ in range(20)}
    assert len(shifts) > 10 and max(abs(v) for s in shifts for v in s) <= 25


def test_render_is_deterministic_and_rescales():
    scene = _scenes(1, seed=5, tag="counting")[0]
    a = np.asarray(render_scene(scene, 48, 48))
    assert np.array_equal(a, np.asarray(render_scene(scene.to_dict(), 48, 48)))
    big = np.asarray(render_scene(scene, 192, 192, supersample=1)).astype(float)
    small = big.reshape(48, 4, 48, 4, 3).mean((1, 3))
    assert np.abs(small - a).mean() < 6                     # same scene at another size


def test_render_speed_48px():
    scenes = _scenes(300, seed=6)
    start = time.perf_counter()
    for s in scenes:
        render_scene(s, 48, 48)
    per_sample_ms = (time.perf_counter() - start) / len(scenes) * 1e3
    assert per_sample_ms < 5.0, f"{per_sample_ms:.2f} ms per 48x48 render (measured ~0.1-0.2)"


# ---------------------------------------------------------------- captions and metadata
def test_dense_captions_are_40_to_100_words_and_name_every_object():
    for s in _scenes(600, seed=7):
        text = dense_caption(s)
        assert 40 <= len(text.split()) <= 100, (len(text.split()), text)
        for o in s.objects:
            assert o.color in text and o.shape in text and o.size in text
        assert s.background in text
        if s.relation is not None:
            phrase = {"left of": "to the left of", "right of": "to the right of"}.get(s.relation, s.relation)
            assert phrase in text


def test_brief_captions_follow_geneval_wording():
    r, b = ShapeObject("circle", "red", "small", 1, 0), ShapeObject("square", "blue", "large", 1, 2)
    assert brief_caption(Scene("single_object", (r,))) == "a circle"
    assert brief_caption(Scene("colors", (r,))) == "a red circle"
    assert brief_caption(Scene("two_object", (r, b))) == "a circle and a square"
    assert brief_caption(Scene("color_attr", (r, b))) == "a red circle and a blue square"
    assert brief_caption(Scene("position", (b, r), relation="left of")) == \
        "a circle to the left of a square"
    assert brief_caption(Scene("position", (b, r), relation="left of"), colors=True) == \
        "a red circle to the left of a blue square"
    three = Scene("counting", (r, ShapeObject("circle", "red", "large", 0, 0),
                               ShapeObject("circle", "green", "small", 2, 2)))
    assert brief_caption(three) == "three circles"
    assert brief_caption(three, colors=True) == "three circles: two red and one green"
    for s in _scenes(300, seed=8):
        assert len(brief_caption(s, colors=True).split()) <= 12


def test_metadata_per_tag():
    for s in _scenes(300, seed=9):
        m = metadata(s)
        assert m["tag"] == s.tag and m["prompt"] == brief_caption(s)
        inc = m["include"]
        has_color = s.tag in ("colors", "color_attr")
        assert all(("color" in e) == has_color for e in inc)
        if s.tag == "counting":
            assert inc == [{"class": s.objects[0].shape, "count": len(s.objects)}]
            assert m["exclude"] == [{"class": s.objects[0].shape, "count": len(s.objects) + 1}]
        else:
            assert [e["class"] for e in inc] == [o.shape for o in s.objects]
            assert all(e["count"] == 1 for e in inc) and "exclude" not in m
        if has_color:
            assert [e["color"] for e in inc] == [o.color for o in s.objects]
        if s.tag == "position":
            assert inc[1]["position"] == [s.relation, 0] and "position" not in inc[0]


# ---------------------------------------------------------------- held-out split
def test_training_samples_are_never_held_out_and_cover_the_vocabulary():
    samples = make_samples(1200, seed=10)
    scenes = [Scene.from_dict(s["scene"]) for s in samples]
    assert not any(is_heldout(s) for s in scenes)
    pairs = {(o.color, o.shape) for s in scenes for o in s.objects}
    assert not pairs & HELDOUT_COLOR_CLASS
    assert {c for c, _ in pairs} == set(COLORS) and {k for _, k in pairs} == set(CLASSES)
    for color, shape in HELDOUT_COLOR_CLASS:   # each part of a held-out pair is still taught
        assert sum(c == color for c, _ in pairs) >= 2 and sum(k == shape for _, k in pairs) >= 4
    layouts = {(s.objects[1].shape, s.relation, s.objects[0].shape) for s in scenes if s.relation}
    assert not layouts & HELDOUT_LAYOUTS
    for a, rel, b in HELDOUT_LAYOUTS:          # the pair appears in other relations
        assert any((a, r, b) in layouts for r in RELATIONS if r != rel)
    assert {s["metadata"]["tag"] for s in samples} == set(TAGS)
    for s in samples[:50]:
        assert s["image"].size == s["size"] and s["size"] in aspect_buckets(48)
        assert s["brief"] == brief_caption(s["scene"]) and s["dense"] == dense_caption(s["scene"])


def test_heldout_prompts_are_held_out_novel_and_fixed_by_seed():
    prompts = heldout_prompts(20, seed=0)
    assert len(prompts) == 20 * len(TAGS)
    assert all(is_heldout(p["scene"]) for p in prompts)
    for p in prompts:
        s = Scene.from_dict(p["scene"])
        assert p["prompt"] == brief_caption(s) and p["metadata"] == metadata(s)
        if s.tag in ("colors", "color_attr"):   # the prompt names a held-out pair
            assert any((o.color, o.shape) in HELDOUT_COLOR_CLASS for o in s.objects)
        if s.tag == "position":
            assert (s.objects[1].shape, s.relation, s.objects[0].shape) in HELDOUT_LAYOUTS
    assert heldout_prompts(20, seed=0) == prompts
    assert heldout_prompts(20, seed=1) != prompts
    train_prompts = {s["brief"] for s in make_samples(600, seed=11, tags=("colors", "color_attr",
                                                                         "position"))}
    novel = [p["prompt"] for p in prompts if p["metadata"]["tag"] in ("colors", "color_attr", "position")]
    assert novel and not set(novel) & train_prompts


def test_make_samples_validates_arguments():
    with pytest.raises(ValueError, match="'circles'"):
        make_samples(2, seed=0, tags=("circles",))
    with pytest.raises(ValueError, match="buckets"):
        make_samples(2, seed=0, buckets=[])
    assert [s["size"] for s in make_samples(3, seed=0, buckets=[(40, 24)])] == [(40, 24)] * 3


def test_toy_modules_import_only_numpy_and_pil():
    import ast
    import pathlib

    import lens_fast.toy as toy
    root = pathlib.Path(toy.__file__).parent
    for name in ("__init__", "scene", "captions", "prompts", "shapeeval"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] in {"numpy", "PIL", "math", "dataclasses", "__future__"}, \
                    f"lens_fast/toy/{name}.py imports {mod}; the toy world must stay numpy + PIL"


def test_make_samples_can_restrict_background_textures():
    from lens_fast.toy import make_samples as _make

    flat = _make(24, seed=3, buckets=[(32, 32)], textures=("flat",))
    assert all(s["scene"]["texture"] == "flat" for s in flat)
    every = _make(24, seed=3, buckets=[(32, 32)])
    assert {s["scene"]["texture"] for s in every} != {"flat"}  # the default draws textured ones too
    with pytest.raises(ValueError, match="textures"):
        _make(2, seed=0, textures=("marble",))


def test_make_samples_bucket_weights_set_each_canvas_share():
    from lens_fast.toy import make_samples as _make

    buckets = [(24, 40), (32, 32), (40, 24)]
    sizes = [s["size"] for s in _make(400, seed=5, buckets=buckets, bucket_weights=(1, 2, 1))]
    share = sizes.count((32, 32)) / len(sizes)
    assert 0.42 < share < 0.58, share  # 0.5 expected; binomial sd 0.025
    assert 0.17 < sizes.count((24, 40)) / len(sizes) < 0.33
    only = {s["size"] for s in _make(30, seed=5, buckets=buckets, bucket_weights=(0, 1, 0))}
    assert only == {(32, 32)}
    # without weights the draw is unchanged (uniform, same generator calls)
    plain = [s["size"] for s in _make(40, seed=6, buckets=buckets)]
    assert len(set(plain)) == 3
    for bad in [(1, 1), (1, -1, 1), (0, 0, 0)]:
        with pytest.raises(ValueError, match="bucket_weights"):
            _make(2, seed=0, buckets=buckets, bucket_weights=bad)

