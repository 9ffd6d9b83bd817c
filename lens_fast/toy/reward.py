"""The toy world's RL reward (``rl.rewards: {shapeeval: 1}``): ShapeEval's detections
checked against each prompt's metadata, behind the reward interface of ``lens_fast.rl.rewards``."""
from __future__ import annotations

from typing import List, Sequence

from ..rl.rewards import RewardResult
from .shapeeval import clean_image, detect_objects, rubric_checks


class ShapeEvalReward:
    """The toy world's reward: ShapeEval's detections checked against each prompt's
    GenEval-style metadata item by item (objects with class, colour and count; exact
    counts; positions; the background when named) plus the toy's global rule
    (``shapeeval.clean_image``: no rejected regions, an even background).
    Score: the fraction of items met, or with ``strict`` 1 when all are (GenEval's)."""

    name = "shapeeval"

    def __init__(self, strict: bool = False, clean_rule: bool = True):
        self.strict, self.clean_rule = strict, clean_rule

    def score(self, images, prompts: Sequence[str], metadata: Sequence[dict]) -> List[RewardResult]:
        out = []
        for image, prompt, record in zip(images, prompts, metadata):
            meta = record.get("metadata", record)
            objects, info = detect_objects(image)
            checks = rubric_checks(objects, meta, info["background"])
            if self.clean_rule:
                checks.append(("clean", *clean_image(info)))
            items = {name: float(ok) for name, ok, _ in checks}
            values = list(items.values())
            score = float(all(values)) if self.strict else sum(values) / len(values)
            out.append(RewardResult(score, items, "; ".join(w for _, ok, w in checks if not ok) or None))
        return out
