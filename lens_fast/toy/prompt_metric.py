"""ShapeEval as a metric of the reasoner's system-prompt search (``--metric toy:RUN_DIR``):
a trained toy model draws each rewritten prompt and ShapeEval scores it against the request."""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Sequence

from ..errors import InvalidValue
from ..reasoner.metrics import SPLITS, MetricResult, _check_split


class ShapeEvalMetric:
    """The toy world: a trained ``lens-fast demo`` model (its run folder) samples each
    prompt with LensPipeline exactly as the demo does (MiniLM text path, its CFG, steps
    and canvas), and ShapeEval scores the image against the request's GenEval metadata.
    Dev and test are held-out prompt sets (compositions the model never saw) drawn with
    different seeds; ``per_tag`` prompts of each of the six GenEval tags."""

    name = "toy-shapeeval"

    def __init__(self, run_dir: str, per_tag: int = 8, dev_seed: int = 1234, test_seed: int = 5678):
        from . import heldout_prompts
        from .demo import load_demo_model
        from .text import MiniLMTextEncoder

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

        from .demo import sample_and_score

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
