"""Generation metrics the system-prompt search optimises: the interface, and ShapeEval on
the toy world.

A metric owns its prompt sets and scores what the rewrites make the image model draw:

    class MyMetric:
        name = "rubric-judge"
        def fingerprint(self) -> str: ...          # what determines its scores (model, judge, sets)
        def requests(self, split: str) -> list: ... # the user requests of "dev" (searched on) or "test"
        def score(self, requests, prompts, seed) -> MetricResult: ...  # prompts: what was encoded

Higher is better; ``MetricResult.score`` is what the search ranks by, ``per_request`` and
``details`` go to the report. A VLM rubric judge (images generated from ``prompts``, judged
against ``requests``) plugs in the same way; ``load_metric("package.module:factory", **kw)``
builds one from the command line.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Protocol, Sequence, runtime_checkable

from ..errors import InvalidValue

SPLITS = ("dev", "test")


@dataclass
class MetricResult:
    score: float
    per_request: List[float]
    details: Dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class PromptMetric(Protocol):
    name: str

    def fingerprint(self) -> str:
        ...

    def requests(self, split: str) -> List[str]:
        ...

    def score(self, requests: Sequence[str], prompts: Sequence[str], seed: int) -> MetricResult:
        ...


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InvalidValue(f"split={split!r}; expected one of {list(SPLITS)}")


class ShapeEvalMetric:
    """The toy world: a trained ``lens-fast demo`` model (its run folder) samples each
    prompt with LensPipeline exactly as the demo does (MiniLM text path, its CFG, steps
    and canvas), and ShapeEval scores the image against the request's GenEval metadata.
    Dev and test are held-out prompt sets (compositions the model never saw) drawn with
    different seeds; ``per_tag`` prompts of each of the six GenEval tags."""

    name = "toy-shapeeval"

    def __init__(self, run_dir: str, per_tag: int = 8, dev_seed: int = 1234, test_seed: int = 5678):
        from ..toy import heldout_prompts
        from ..toy.demo import load_demo_model
        from ..toy.text import MiniLMTextEncoder

        if not isinstance(per_tag, int) or per_tag < 1:
            raise InvalidValue(f"per_tag={per_tag!r}: expected an int >= 1")
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.model, self.cfg = load_demo_model(self.run_dir)
        self.text_encoder = MiniLMTextEncoder()
        self.per_tag = per_tag
        self._sets = {"dev": heldout_prompts(per_tag, seed=dev_seed), "test": heldout_prompts(per_tag, seed=test_seed)}
        self._seeds = {"dev": dev_seed, "test": test_seed}
        digest = hashlib.sha256()
        folder = os.path.join(self.run_dir, "transformer")
        for name in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(f.read())
        self._weights = digest.hexdigest()[:16]

    def fingerprint(self) -> str:
        return json.dumps({"metric": self.name, "weights": self._weights, "per_tag": self.per_tag,
                           "seeds": self._seeds, "steps": self.cfg.sample_steps, "guidance": self.cfg.guidance,
                           "sizes": self.cfg.eval_sizes}, sort_keys=True)

    def requests(self, split: str) -> List[str]:
        _check_split(split)
        return [p["prompt"] for p in self._sets[split]]

    def _items(self, requests: Sequence[str]) -> List[dict]:
        for split in SPLITS:
            if list(requests) == self.requests(split):
                return self._sets[split]
        known = {p["prompt"]: p for split in SPLITS for p in self._sets[split]}
        missing = [r for r in requests if r not in known]
        if missing:
            raise InvalidValue(f"request {missing[0]!r} is in neither prompt set of this metric; ShapeEval needs "
                             "each request's GenEval metadata")
        return [known[r] for r in requests]

    def score(self, requests: Sequence[str], prompts: Sequence[str], seed: int) -> MetricResult:
        from dataclasses import replace

        from tqdm.auto import tqdm

        from ..toy.demo import sample_and_score

        if len(requests) != len(prompts):
            raise InvalidValue(f"{len(requests)} requests but {len(prompts)} prompts; expected one prompt per request")
        items = self._items(requests)
        cfg = replace(self.cfg, seed=int(seed))
        with tqdm(disable=True) as bar:
            scores, _ = sample_and_score(self.model, self.text_encoder, items, cfg.eval_sizes, cfg, bar,
                                         texts=list(prompts))
        per = [float(r["correct"]) for r in scores["results"]]
        return MetricResult(score=float(scores["overall"]), per_request=per,
                            details={"per_tag": scores["per_tag"], "n": scores["n"]})


def load_metric(spec: str, **kwargs) -> PromptMetric:
    """``toy:RUN_DIR`` (ShapeEval on a demo run) or ``package.module:factory`` (``factory(**kwargs)``
    returns a PromptMetric)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise InvalidValue(f"--metric {spec!r}: expected 'toy:RUN_DIR' or 'package.module:factory'")
    if kind == "toy":
        return ShapeEvalMetric(rest, **kwargs)
    try:
        factory = getattr(importlib.import_module(kind), rest)
    except (ImportError, AttributeError) as e:
        raise InvalidValue(f"--metric {spec!r}: cannot load {rest!r} from {kind!r} ({e})") from None
    metric = factory(**kwargs)
    if not isinstance(metric, PromptMetric):
        raise TypeError(f"--metric {spec!r} built {type(metric).__name__}; expected an object with name, "
                        "fingerprint(), requests(split) and score(requests, prompts, seed)")
    return metric
