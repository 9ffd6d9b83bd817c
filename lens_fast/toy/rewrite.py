"""A prompt rewriter for the Lens world: short GenEval-style prompts in, full captions out.

Lens trains on dense captions and, like most caption-trained text-to-image models, is
prompted at inference through a rewriter that expands a short user prompt into the
caption style it was trained on. This is the toy world's rule-based rewriter: it parses
the prompt (the brief-caption grammar of `captions.brief_caption`), keeps everything
the prompt states (classes, counts, colours, the relation) and draws what it leaves
open (colours not named, sizes, grid cells, the background) from a seeded generator,
then writes the scene's caption in the style the model trained on (dense or layout).
It reads only the prompt text: never a scene, metadata or anything the scorer checks
beyond what the prompt itself says.

    >>> rewrite_prompt("a red circle to the left of a square", seed=0)  # doctest: +SKIP
    'A simple flat picture on a plain black background showing two shapes. ...'
"""
from __future__ import annotations

import re

import numpy as np

from .captions import NUMBER_WORDS, _RELATION_PHRASE, dense_caption, layout_caption
from .scene import (BACKGROUNDS, CLASSES, COLORS, GRID, SIZES, Scene, ShapeObject,
                    _RELATION_PAIRS)

_WORD_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()}
_PHRASE_RELATION = {phrase: rel for rel, phrase in _RELATION_PHRASE.items()}
_COLOR_RE = "|".join(COLORS)
_CLASS_RE = "|".join(CLASSES)
_NOUN = re.compile(rf"^(?:(a|an|{'|'.join(_WORD_NUMBERS)}) )?(?:({_COLOR_RE}) )?({_CLASS_RE})(s?)$")
_RELATION = re.compile(r"^(.+?) (" + "|".join(sorted(map(re.escape, _PHRASE_RELATION), key=len, reverse=True))
                       + r") (.+)$")
_SETTING = re.compile(r"^(.+?),? on an? (" + "|".join(map(re.escape, BACKGROUNDS)) + r") background$")


def _noun(text: str, prompt: str) -> tuple[int, str | None, str]:
    """(count, colour or None, class) of one noun phrase, e.g. "two red squares"."""
    m = _NOUN.match(text.strip())
    if m is None:
        raise ValueError(f"cannot parse {text!r} in prompt {prompt!r}; expected '[a|an|two..] [colour] "
                         f"<{'|'.join(CLASSES)}>[s]' with colours {list(COLORS)}")
    det, color, shape, plural = m.groups()
    count = 1 if det in (None, "a", "an") else _WORD_NUMBERS[det]
    if (count > 1) != bool(plural):
        raise ValueError(f"{text!r} in prompt {prompt!r}: count {count} does not agree with "
                         f"{'plural' if plural else 'singular'} {shape!r}")
    return count, color, shape


def parse_prompt(prompt: str) -> dict:
    """What a brief prompt states: {"objects": [(count, colour or None, class), ...],
    "relation": None or (relation, i, j) meaning objects[i] is `relation` of objects[j]}
    and "background" when it names one. Accepts the grammar of
    `brief_caption`, e.g. "a circle", "three red squares", "a red circle and a blue
    square", "a triangle to the left of a yellow circle", optionally followed by
    ", on a black background" (the RL prompt sets name backgrounds that way)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt={prompt!r}: expected a non-empty string")
    text = " ".join(prompt.lower().replace(".", " ").split())
    setting = _SETTING.match(text)
    if setting is not None:
        spec = parse_prompt(setting.group(1))
        return {**spec, "background": setting.group(2)}
    rel = _RELATION.match(text)
    if rel is not None:
        a, phrase, b = rel.groups()
        first, second = _noun(a, prompt), _noun(b, prompt)
        if first[0] != 1 or second[0] != 1:
            raise ValueError(f"prompt {prompt!r}: a relation needs one object on each side")
        # "A is left of B": B is objects[0] and A objects[1], as GenEval's metadata orders them.
        return {"objects": [second, first], "relation": (_PHRASE_RELATION[phrase], 1, 0)}
    if ":" in text:  # "three circles: two red and one blue"
        head, tail = text.split(":", 1)
        count, color, shape = _noun(head, prompt)
        parts = [p.strip() for p in re.split(r",| and ", tail) if p.strip()]
        objects = []
        for p in parts:
            m = re.match(rf"^({'|'.join(_WORD_NUMBERS)}) ({_COLOR_RE})$", p)
            if m is None:
                raise ValueError(f"cannot parse {p!r} in prompt {prompt!r}; expected '<number> <colour>'")
            objects.append((_WORD_NUMBERS[m.group(1)], m.group(2), shape))
        if sum(o[0] for o in objects) != count:
            raise ValueError(f"prompt {prompt!r}: the colour counts do not add up to {count}")
        return {"objects": objects, "relation": None}
    parts = [p.strip() for p in re.split(r",| and ", text) if p.strip()]
    return {"objects": [_noun(p, prompt) for p in parts], "relation": None}


def rewrite_scene(prompt: str, seed: int | np.random.Generator = 0, backgrounds=tuple(BACKGROUNDS),
                  sizes=tuple(SIZES)) -> Scene:
    """One scene that satisfies `prompt`, everything the prompt leaves open drawn from
    `seed` (an int or a numpy Generator): unnamed colours, grid cells, sizes (from
    `sizes`) and the background (from `backgrounds`, plain) unless the prompt names it.
    Raises ValueError for a prompt outside the toy grammar or one that needs more than the grid's 9 cells."""
    bad = [v for v in sizes if v not in SIZES] + [v for v in backgrounds if v not in BACKGROUNDS]
    if bad or not sizes or not backgrounds:
        raise ValueError(f"sizes={tuple(sizes)!r}, backgrounds={tuple(backgrounds)!r}: expected non-empty "
                         f"subsets of {list(SIZES)} and {list(BACKGROUNDS)}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    spec = parse_prompt(prompt)
    wanted = [(color, shape) for count, color, shape in spec["objects"] for _ in range(count)]
    if len(wanted) > GRID * GRID:
        raise ValueError(f"prompt {prompt!r} asks for {len(wanted)} objects; the grid holds {GRID * GRID}")
    relation = None
    if spec["relation"] is not None:
        relation, _, _ = spec["relation"]
        pairs = _RELATION_PAIRS[relation]
        cells = list(pairs[int(rng.integers(len(pairs)))])
    else:
        flat = rng.choice(GRID * GRID, size=len(wanted), replace=False)
        cells = [(int(i) // GRID, int(i) % GRID) for i in flat]
    objects = []
    for (color, shape), (row, col) in zip(wanted, cells):
        color = color or COLORS[int(rng.integers(len(COLORS)))]
        size = tuple(sizes)[int(rng.integers(len(sizes)))]
        objects.append(ShapeObject(shape, color, size, row, col))
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    background = spec.get("background", background)
    tag = "position" if relation else "single_object"
    return Scene(tag=tag, objects=tuple(objects), background=background, texture="flat", relation=relation)


def rewrite_prompt(prompt: str, seed: int | np.random.Generator = 0, max_words: int = 100,
                   backgrounds=tuple(BACKGROUNDS), style: str = "dense", sizes=tuple(SIZES)) -> str:
    """The caption of `rewrite_scene(prompt, seed)` in the style the model was trained on:
    "dense" (`dense_caption`, `max_words` budget) or "layout" (`layout_caption`)."""
    if style not in ("dense", "layout"):
        raise ValueError(f"style={style!r}; expected 'dense' or 'layout'")
    scene = rewrite_scene(prompt, seed, backgrounds, sizes)
    return dense_caption(scene, max_words=max_words) if style == "dense" else layout_caption(scene)


def layout_rewrite(prompt: str, rng: np.random.Generator) -> str:
    """The toy world's rewriter for RL rollouts (``rl.rewrite: toy``): the prompt as a layout caption."""
    return rewrite_prompt(prompt, rng, style="layout")
