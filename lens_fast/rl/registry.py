"""Rewards by name, for configs (``rl.rewards: {name: weight}``)."""
from __future__ import annotations

import importlib
from typing import Dict, Optional

from ..chat_api import ChatEndpoint
from ..cli_checks import load_named
from ..errors import InvalidValue
from .judge import RubricJudge
from .rewards import WeightedReward


def build_reward(weights: Dict[str, float], judge_env: str = "LENS_JUDGE", cache_dir: Optional[str] = None,
                 judge_options: Optional[dict] = None):
    """The reward of a config's ``rl.rewards`` ({name: weight}): ``shapeeval`` and / or
    ``judge`` (``RubricJudge`` on the endpoint in {judge_env}_BASE_URL / _MODEL / _API_KEY
    with the ``ChatEndpoint`` settings ``judge_options``, answers cached in ``cache_dir``)
    or ``package.module:factory`` (``factory()`` returns a reward: ``name`` and ``score``)."""
    parts = []
    for name, w in weights.items():
        if name == "shapeeval":  # the toy world's reward lives with the toy world (a floor above this one)
            parts.append((importlib.import_module("lens_fast.toy.reward").ShapeEvalReward(), float(w)))
        elif name == "judge":
            endpoint = ChatEndpoint.from_env(judge_env, **(judge_options or {}))
            parts.append((RubricJudge(endpoint, cache_dir=cache_dir), float(w)))
        elif ":" in name:
            parts.append((load_named(name, f"rl.rewards has {name!r}")(), float(w)))
        else:
            raise InvalidValue(f"rl.rewards has {name!r}; expected 'shapeeval', 'judge' or 'package.module:factory'")
    return parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else WeightedReward(parts)
