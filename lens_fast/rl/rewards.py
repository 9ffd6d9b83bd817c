"""Rewards for RL post-training, behind one interface.

A reward is anything with a ``name`` and::

    score(images: list of PIL images, prompts: list of str, metadata: list of dict)
        -> list of RewardResult(score: float, items: {item: value in [0, 1]}, detail)

where ``metadata[i]`` is image i's prompt record (``lens_fast.rl.prompts``: its
"rubric" items, "global_rule" and GenEval-style "metadata"). ``WeightedReward``
combines rewards with weights (score = sum of weight x score; items prefixed by the
reward's name). ``checked`` refuses NaN / inf scores, naming the prompt. Built in
(``lens_fast.rl.registry.build_reward`` builds them from a config):
``lens_fast.rl.judge.RubricJudge`` (a VLM behind an OpenAI-compatible endpoint scoring the
rubric items and the global rule) and, for the toy world, ``lens_fast.toy.reward.ShapeEvalReward``
(GenEval items checked by ShapeEval's segmentation, plus a clean-image rule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import InvalidValue, UserError


@dataclass
class RewardResult:
    score: float
    items: Dict[str, float] = field(default_factory=dict)  # per rubric item, in [0, 1]
    detail: Optional[str] = None  # why items failed, when the reward says


class RewardError(UserError, RuntimeError):
    """A reward that could not be computed (a judge that stayed unreachable or kept
    answering garbage); the message names the prompt and the cause. Its checkpoints are
    intact: the run continues with ``--resume``."""


class NonFiniteReward(InvalidValue):
    """A reward returned NaN or inf; the message names the reward and the prompt."""


def checked(name: str, results: Sequence[RewardResult], prompts: Sequence[str]) -> List[RewardResult]:
    """``results`` unchanged when every score is a finite number; else NonFiniteReward
    naming the first bad image's prompt."""
    results = list(results)
    if len(results) != len(prompts):
        raise ValueError(f"reward {name} returned {len(results)} results for {len(prompts)} images")
    for i, (r, p) in enumerate(zip(results, prompts)):
        value = r.score if isinstance(r, RewardResult) else r
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise NonFiniteReward(f"reward {name} gave {value!r} for image {i} of prompt {p!r}; expected a finite "
                                  "number (refusing to train on it)")
    return results


class WeightedReward:
    """sum_i w_i reward_i(image) over rewards given as [(reward, weight)]."""

    def __init__(self, parts: Sequence[Tuple[object, float]]):
        if not parts:
            raise ValueError("WeightedReward needs at least one (reward, weight)")
        for reward, w in parts:
            if not hasattr(reward, "score") or not isinstance(w, (int, float)) or not w > 0:
                raise ValueError(f"({reward!r}, {w!r}): expected a reward with .score and a positive weight")
        self.parts = list(parts)
        self.name = "+".join(f"{w:g}*{r.name}" for r, w in self.parts)

    def score(self, images, prompts: Sequence[str], metadata: Sequence[dict]) -> List[RewardResult]:
        total = [RewardResult(0.0) for _ in prompts]
        for reward, w in self.parts:
            for out, r in zip(total, checked(reward.name, reward.score(images, prompts, metadata), prompts)):
                out.score += w * float(r.score)
                out.items.update({f"{reward.name}/{k}": v for k, v in r.items.items()})
                if r.detail:
                    out.detail = f"{out.detail}; {r.detail}" if out.detail else r.detail
        return checked(self.name, total, prompts)
