"""The toy prompt rewriter: brief GenEval-style prompt -> a scene that satisfies it -> dense caption."""
import numpy as np
import pytest

from lens_fast.toy import heldout_prompts, make_samples, render_scene, score_set
from lens_fast.toy.captions import dense_caption
from lens_fast.toy.rewrite import parse_prompt, rewrite_prompt, rewrite_scene


def test_parse_prompt_keeps_what_the_prompt_states():
    assert parse_prompt("a circle") == {"objects": [(1, None, "circle")], "relation": None}
    assert parse_prompt("three red squares") == {"objects": [(3, "red", "square")], "relation": None}
    assert parse_prompt("a red circle and a blue square")["objects"] == [(1, "red", "circle"), (1, "blue", "square")]
    # "A left of B": B is objects[0], A objects[1] (GenEval's order), the relation is A's to B.
    got = parse_prompt("a yellow triangle to the left of a circle")
    assert got == {"objects": [(1, None, "circle"), (1, "yellow", "triangle")], "relation": ("left of", 1, 0)}
    assert parse_prompt("four circles: three red and one blue")["objects"] == [(3, "red", "circle"),
                                                                             (1, "blue", "circle")]


@pytest.mark.parametrize("bad", ["", "a dog", "a circle to the left of two squares", "two circle", "a squares",
                                 "three circles: one red and one blue", "nine circles and a square"])
def test_rewriter_rejects_prompts_outside_the_grammar_by_name(bad):
    with pytest.raises(ValueError, match="prompt|expected"):
        rewrite_prompt(bad, 0)


def test_every_training_brief_caption_parses():
    for s in make_samples(300, seed=4, buckets=[(32, 32)]):
        spec = parse_prompt(s["brief"])
        assert sum(c for c, _, _ in spec["objects"]) == len(s["scene"]["objects"]), s["brief"]


def test_rewritten_scenes_satisfy_their_prompts_as_shapeeval_reads_them():
    """Render the rewriter's scene for each held-out prompt and score it against that
    prompt's metadata: a rewrite that dropped or changed anything the prompt states
    (class, count, colour, relation) would fail here."""
    prompts = heldout_prompts(12, seed=3)
    images = [render_scene(rewrite_scene(p["prompt"], i), 48, 48) for i, p in enumerate(prompts)]
    scores = score_set(images, [p["metadata"] for p in prompts])
    assert scores["overall"] == 1.0, scores["per_tag"]


def test_rewrite_fills_what_is_open_at_random_but_reproducibly():
    a = [rewrite_prompt("a circle", i) for i in range(12)]
    assert a == [rewrite_prompt("a circle", i) for i in range(12)]  # fixed by the seed
    assert len(set(a)) > 6  # places, colours, sizes and backgrounds vary
    assert all("circle" in t for t in a)
    scene = rewrite_scene("a red square above a blue triangle", np.random.default_rng(0))
    objs = {o.shape: o for o in scene.objects}
    assert objs["square"].color == "red" and objs["triangle"].color == "blue"
    assert objs["square"].row < objs["triangle"].row  # above, on the grid
    text = rewrite_prompt("a red square above a blue triangle", 0, max_words=40)
    assert text == dense_caption(rewrite_scene("a red square above a blue triangle", 0), max_words=40)
    assert 30 <= len(text.split()) <= 60


def test_layout_caption_states_every_object_and_the_background_compactly():
    from lens_fast.toy import Scene, ShapeObject, layout_caption

    scene = Scene("two_object", (ShapeObject("circle", "red", "small", 0, 0),
                                 ShapeObject("square", "blue", "large", 1, 1)), background="black", texture="noise")
    assert layout_caption(scene) == "top left small red circle, centre large blue square, on grainy black"
    for s in make_samples(200, seed=2, buckets=[(32, 32)]):
        text = layout_caption(s["scene"])
        assert len(text.split()) < len(s["dense"].split()) / 2
        assert all(f"{o['color']} {o['class']}" in text for o in s["scene"]["objects"])
    # the rewriter writes the same style for a layout-trained model
    assert rewrite_prompt("a red circle", 1, style="layout") == layout_caption(rewrite_scene("a red circle", 1))
    with pytest.raises(ValueError, match="style"):
        rewrite_prompt("a red circle", 1, style="poem")
