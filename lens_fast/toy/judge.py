"""A stand-in for the VLM judge in the toy world: a chat-server handler that reads a
rubric-judge request (``lens_fast.rl.judge``) like a VLM would, looks at the image with
ShapeEval's segmentation and answers the JSON the judge expects.

    python -m lens_fast.chat_server --handler lens_fast.toy.judge:answer
    LocalChatServer("lens_fast.toy.judge:answer")          # in tests and the demo

It understands the rubric grammar of ``lens-fast rl-prompts`` ("there is a red circle",
"there are exactly three squares", "the triangle is to the left of the circle", "the
background is black"); the global rule is judged by ``shapeeval.clean_image`` (no
smudges or broken shapes, an even background). An item it cannot read scores 0, as a judge that cannot verify it would.
"""
from __future__ import annotations

import json
import re

import numpy as np

from .captions import NUMBER_WORDS
from .scene import BACKGROUNDS, CLASSES, COLORS
from .shapeeval import clean_image, detect_objects, relation_holds

_WORDS = {w: n for n, w in NUMBER_WORDS.items()}
_CLASS = "|".join(CLASSES)
_THERE_IS = re.compile(rf"^there is an? (?:({'|'.join(COLORS)}) )?({_CLASS})$")
_EXACTLY = re.compile(rf"^there are exactly ({'|'.join(_WORDS)}) ({_CLASS})s$")
_RELATION = re.compile(rf"^the ({_CLASS}) is (to the left of|to the right of|above|below) the ({_CLASS})$")
_BACKGROUND = re.compile(rf"^the background is ({'|'.join(map(re.escape, BACKGROUNDS))})$")
_PHRASES = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}


def judge_item(item: str, objects: list, background) -> float:
    """1.0 when the detections satisfy the rubric item, else 0.0."""
    text = item.strip().lower().rstrip(".")
    if m := _THERE_IS.match(text):
        color, cls = m.groups()
        return float(any(o["class"] == cls and (color is None or o["color"] == color) for o in objects))
    if m := _EXACTLY.match(text):
        return float(sum(o["class"] == m.group(2) for o in objects) == _WORDS[m.group(1)])
    if m := _RELATION.match(text):
        a, phrase, b = m.groups()
        return float(any(relation_holds(x, y, _PHRASES[phrase]) for x in objects if x["class"] == a
                         for y in objects if y["class"] == b and y is not x))
    if m := _BACKGROUND.match(text):
        nearest = min(BACKGROUNDS, key=lambda k: float(np.linalg.norm(np.subtract(BACKGROUNDS[k], background))))
        return float(nearest == m.group(1))
    return 0.0


def answer(request: dict) -> str:
    """The judge's answer to one chat-completions request (a chat_server handler)."""
    from lens_fast.chat_api import decode_image_part

    message = next(m for m in reversed(request["messages"]) if m.get("role") == "user")
    parts = message["content"] if isinstance(message["content"], list) else [{"type": "text", "text": message["content"]}]
    text = " ".join(p["text"] for p in parts if p.get("type") == "text")
    images = [decode_image_part(p).convert("RGB") for p in parts if p.get("type") == "image_url"]
    if not images:
        raise ValueError("the judge request carries no image")
    items = re.findall(r"^\d+\. (.+)$", text.split("Global rule:")[0], re.M)
    objects, info = detect_objects(images[0])
    return json.dumps({"items": [judge_item(i, objects, info["background"]) for i in items],
                       "global": float(clean_image(info)[0])})
