"""Captions and GenEval-style metadata for Lens world scenes.

Three texts per scene, all derived from the scene alone (never from a canvas size):
  * `dense_caption`: 40-100 words naming every object's size, colour, class and cell,
    the class counts, pairwise relations (while the word budget lasts) and the background.
  * `brief_caption`: the scene's GenEval-style prompt. It states exactly what its tag
    scores, in GenEval's wording: single_object "a circle", two_object "a circle and a
    square", counting "three circles", colors "a red circle", position "a triangle to
    the left of a circle", color_attr "a red circle and a blue square". With
    `colors=True` every object's colour is named as well ("a red triangle to the left of
    a blue circle"), a fully specified caption for training.
  * `metadata`: {"tag", "include", "prompt"} (+ "exclude" for counting), as GenEval
    writes it: "color" only where the prompt scores colour (colors, color_attr) and
    "position": [relation, 0] on the second entry of a position prompt.
"""
from __future__ import annotations

from .scene import GRID, Scene, ShapeObject, as_scene, cell_relation

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight", 9: "nine"}
_RELATION_PHRASE = {"left of": "to the left of", "right of": "to the right of",
                    "above": "above", "below": "below"}
_ROW_NAMES = ("top", "middle", "bottom")
_COL_NAMES = ("left", "centre", "right")
_TEXTURE_PHRASE = {"flat": "a plain {bg} background",
                   "gradient": "a {bg} background with a soft vertical gradient",
                   "noise": "a {bg} background with a fine grain"}


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def cell_phrase(row: int, col: int) -> str:
    """Where a grid cell lies, in words: "in the top left corner", "in the centre"..."""
    if (row, col) == (GRID // 2, GRID // 2):
        return "in the centre"
    if row != GRID // 2 and col != GRID // 2:
        return f"in the {_ROW_NAMES[row]} left corner" if col == 0 else \
            f"in the {_ROW_NAMES[row]} right corner"
    if row == GRID // 2:
        return f"at the middle of the {_COL_NAMES[col]} edge"
    return f"at the {_ROW_NAMES[row]} centre"


def _describe(obj: ShapeObject, with_size: bool = True) -> str:
    return f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _names(scene: Scene) -> list[str]:
    """The shortest unambiguous noun phrase per object: colour + class, adding the size
    and then the place only when needed to tell two objects apart."""
    objs = scene.objects
    names = []
    for o in objs:
        if sum(_describe(p, False) == _describe(o, False) for p in objs) == 1:
            names.append(_describe(o, False))
        elif sum(_describe(p) == _describe(o) for p in objs) == 1:
            names.append(_describe(o))
        else:
            names.append(f"{_describe(o)} {cell_phrase(o.row, o.col)}")
    return names


def _word_count(sentences: list[str]) -> int:
    return sum(len(s.split()) for s in sentences)


def dense_caption(scene: Scene | dict, max_words: int = 100) -> str:
    """A 40-100 word description of every object, their counts, places and relations,
    and the background (for 1-4 objects, as sampled; more objects may run longer).
    Optional sentences are added only while within `max_words`."""
    scene = as_scene(scene)
    objs = scene.objects
    n = len(objs)
    bg = _TEXTURE_PHRASE[scene.texture].format(bg=scene.background)
    shapes = sorted({o.shape for o in objs})
    if len(shapes) == 1 and n > 1:
        kinds: dict[str, int] = {}
        for o in objs:
            kinds[f"{o.size} {o.color}"] = kinds.get(f"{o.size} {o.color}", 0) + 1
        listing = f"{NUMBER_WORDS[n]} {shapes[0]}s: " + _join(
            [_with_article(f"{k} one") if c == 1 else f"{NUMBER_WORDS[c]} {k} ones"
             for k, c in kinds.items()])
    else:
        listing = _join([_with_article(_describe(o)) for o in objs])
    names = _names(scene)
    mandatory = [
        f"A simple flat picture on {bg} showing {NUMBER_WORDS[n]} "
        f"{_plural('shape', n)}.",
        f"It contains {listing}.",
    ]
    for o, name in zip(objs, names):
        where = cell_phrase(o.row, o.col)
        if name.endswith(where):
            mandatory.append(f"One {_describe(o)} sits {where}.")
        else:
            mandatory.append(f"The {name} sits {where}.")
    counts = [f"{NUMBER_WORDS[sum(o.shape == s for o in objs)]} "
              f"{_plural(s, sum(o.shape == s for o in objs))}" for s in shapes]
    mandatory.append(f"In total the image holds {_join(counts)}"
                     + (" and nothing else." if n == 1 else "."))
    optional = []
    if scene.relation is not None:
        optional.append(f"The {names[1]} is {_RELATION_PHRASE[scene.relation]} the {names[0]}.")
    for i in range(n):
        for j in range(i + 1, n):
            rel = cell_relation(objs[j], objs[i])
            if rel is not None and not (scene.relation is not None and (i, j) == (0, 1)):
                optional.append(f"The {names[j]} is {_RELATION_PHRASE[rel]} the {names[i]}.")
    optional.append("Every shape is a flat solid colour with crisp edges, no outline, "
                    "no shadow and no texture.")
    optional.append(f"The rest of the canvas is empty {scene.background} background.")
    optional.append("The shapes do not touch or overlap each other.")
    text = list(mandatory)
    for sentence in optional:
        if _word_count(text) + len(sentence.split()) <= max_words:
            text.append(sentence)
    return " ".join(text)


_PLACE_NAMES = {(r, c): (f"{_ROW_NAMES[r]} {_COL_NAMES[c]}" if (r, c) != (1, 1) else "centre")
                for r in range(GRID) for c in range(GRID)}


def layout_caption(scene: Scene | dict) -> str:
    """A compact, fully specified caption: every object's place, size, colour and class
    (in scene order), then the background, in one fixed template, e.g. "top left small
    red circle, centre large blue square, on plain white". As dense as the dense caption
    in content (count, colours, places and so every pairwise relation follow from it),
    at about a fifth of its length."""
    scene = as_scene(scene)
    parts = [f"{_PLACE_NAMES[(o.row, o.col)]} {o.size} {o.color} {o.shape}" for o in scene.objects]
    texture = {"flat": "plain", "gradient": "graded", "noise": "grainy"}[scene.texture]
    return ", ".join(parts) + f", on {texture} {scene.background}"


def brief_caption(scene: Scene | dict, colors: bool | None = None) -> str:
    """The scene's GenEval-style prompt (see the module docstring). `colors=True` names
    every object's colour, `False` none; None follows the tag (colors, color_attr)."""
    scene = as_scene(scene)
    if colors is None:
        colors = scene.tag in ("colors", "color_attr")
    objs = scene.objects

    def noun(o: ShapeObject) -> str:
        return f"{o.color} {o.shape}" if colors else o.shape

    if scene.tag == "counting":
        n = len(objs)
        shape = objs[0].shape
        groups = {}
        for o in objs:
            groups[o.color] = groups.get(o.color, 0) + 1
        if colors and len(groups) == 1:
            return f"{NUMBER_WORDS[n]} {objs[0].color} {shape}s"
        if colors:
            return f"{NUMBER_WORDS[n]} {shape}s: " + _join([f"{NUMBER_WORDS[k]} {c}"
                                                          for c, k in groups.items()])
        return f"{NUMBER_WORDS[n]} {shape}s"
    if scene.tag == "position":
        return f"{_with_article(noun(objs[1]))} {_RELATION_PHRASE[scene.relation]} " \
               f"{_with_article(noun(objs[0]))}"
    return _join([_with_article(noun(o)) for o in objs])


def metadata(scene: Scene | dict) -> dict:
    """GenEval-style metadata: {"tag", "include": [{"class", "count", ["color"],
    ["position"]}], "prompt"} plus "exclude" (count + 1 of the class) for counting."""
    scene = as_scene(scene)
    objs = scene.objects
    tag = scene.tag
    with_color = tag in ("colors", "color_attr")
    if tag == "counting":
        include = [{"class": objs[0].shape, "count": len(objs)}]
    else:
        include = [{"class": o.shape, "count": 1} for o in objs]
        if with_color:
            for entry, o in zip(include, objs):
                entry["color"] = o.color
    if tag == "position":
        include[1]["position"] = [scene.relation, 0]
    meta = {"tag": tag, "include": include, "prompt": brief_caption(scene)}
    if tag == "counting":
        meta["exclude"] = [{"class": objs[0].shape, "count": len(objs) + 1}]
    return meta
