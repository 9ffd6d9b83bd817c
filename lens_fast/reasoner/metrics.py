"""Generation metrics the system-prompt search optimises: the interface (ShapeEval on the toy
world is ``lens_fast.toy.prompt_metric.ShapeEvalMetric``, loaded as ``toy:RUN_DIR``).

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

import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Protocol, Sequence, runtime_checkable

from ..cli_checks import load_named
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


def load_metric(spec: str, **kwargs) -> PromptMetric:
    """``toy:RUN_DIR`` (ShapeEval on a demo run) or ``package.module:factory`` (``factory(**kwargs)``
    returns a PromptMetric)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise InvalidValue(f"--metric {spec!r}: expected 'toy:RUN_DIR' or 'package.module:factory'")
    if kind == "toy":  # the toy world's metric lives with the toy world (a floor above the reasoner)
        return importlib.import_module("lens_fast.toy.prompt_metric").ShapeEvalMetric(rest, **kwargs)
    metric = load_named(spec, f"--metric {spec!r}")(**kwargs)
    if not isinstance(metric, PromptMetric):
        raise TypeError(f"--metric {spec!r} built {type(metric).__name__}; expected an object with name, "
                        "fingerprint(), requests(split) and score(requests, prompts, seed)")
    return metric
