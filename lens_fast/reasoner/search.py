"""Training-free search for the reasoner's system prompt: an LLM proposes rule sets by
mutation and crossover, a generation metric scores each on a dev prompt set, the best is
kept. The algorithm and its sources are in SEARCH.md beside this file.

A system prompt is a ``RuleSet``: a preamble, a list of rules (lines starting with "- ")
and a closing line. Only the rules evolve; preamble and closing stay as in the seed.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import InvalidValue
from ..chat_api import JsonCache
from .base import ChatBackend, Reasoner, backend_settings, system_prompt_id
from .metrics import PromptMetric

OPERATOR_MARKER = "You improve the rules given to an assistant"
OPERATOR_SYSTEM = (OPERATOR_MARKER + " that rewrites short image requests into detailed prompts for a "
                   "text-to-image model. Each rule set was scored by generating images from the rewritten prompts "
                   "and measuring how well they show what was requested (higher is better). Answer with the new "
                   "rule set only: one rule per line, each line starting with \"- \", nothing else.")
# Mutation instructions, one drawn per proposal (PromptBreeder's mutation prompts): they give
# greedy decoding different edits to make, reproducibly from the search seed.
MUTATIONS = (
    "Add one new rule that would make the rewritten prompts more useful to the image model.",
    "Remove the rule that helps least, and make one other rule more specific.",
    "Rewrite the least clear rule so that it is concrete and checkable.",
    "Merge two rules that overlap into one, then add one new rule.",
    "Add one rule that says exactly how to describe where each object is and how large it is.",
    "Put the most important rule first and make it more precise.",
)
_RULE_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+(.*\S)\s*$")


@dataclass(frozen=True)
class RuleSet:
    preamble: str
    rules: Tuple[str, ...]
    closing: str = ""

    @classmethod
    def parse(cls, text: str) -> "RuleSet":
        """Preamble (before the first rule line), rules, closing (after the last one)."""
        lines = text.strip().splitlines()
        idx = [i for i, line in enumerate(lines) if _RULE_LINE.match(line)]
        if not idx:
            raise InvalidValue("the system prompt has no rules; expected lines starting with '- ' "
                             f"(got {text.strip()[:80]!r})")
        rules = tuple(_RULE_LINE.match(lines[i]).group(1) for i in idx)
        return cls("\n".join(lines[:idx[0]]).strip(), rules, "\n".join(lines[idx[-1] + 1:]).strip())

    def with_rules(self, rules: Sequence[str]) -> "RuleSet":
        return RuleSet(self.preamble, tuple(rules), self.closing)

    def render(self) -> str:
        rules = "\n".join(f"- {r}" for r in self.rules)
        head = self.preamble + ("\n" if self.preamble.endswith(":") else "\n\n") + rules if self.preamble else rules
        return head + ("\n\n" + self.closing if self.closing else "")


def parse_rules(text: str, max_rules: int = 16) -> Tuple[str, ...]:
    """The rules of an operator's answer (raises ValueError when there are none or too many)."""
    rules = []
    for line in text.splitlines():
        m = _RULE_LINE.match(line)
        rule = m.group(1).strip().strip('"\u201c\u201d').strip() if m else ""
        if rule and rule not in rules:
            rules.append(rule)
    if not rules or len(rules) > max_rules:
        raise InvalidValue(f"expected 1 to {max_rules} rules, one per line starting with '- '; got {len(rules)}")
    return tuple(rules)


def _rule_block(rules: Sequence[str]) -> str:
    return "\n".join(f"- {r}" for r in rules)


@dataclass
class Candidate:
    id: int
    rules: Tuple[str, ...]
    operator: str  # seed | mutation | crossover
    parents: Tuple[int, ...] = ()
    instruction: Optional[str] = None
    score: Optional[float] = None
    fallbacks: int = 0
    details: Dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0
    system_prompt_id: str = ""


@dataclass
class SearchConfig:
    budget: int = 12  # candidates scored on the dev set, the seed included
    max_seconds: Optional[float] = None  # stop proposing after this long (the budget still caps)
    seed: int = 0  # parent selection, operator choice
    metric_seed: int = 0  # generation seed the metric uses for every candidate
    crossover_rate: float = 0.3
    tournament: int = 2
    trajectory: int = 4  # best rule sets shown to the mutation operator (OPRO's meta-prompt)
    max_rules: int = 16
    proposal_attempts: int = 3  # operator calls per candidate before giving up on a duplicate or bad answer

    def __post_init__(self):
        if not isinstance(self.budget, int) or self.budget < 1:
            raise InvalidValue(f"budget={self.budget!r}: expected the number of candidates to score, >= 1")
        if not 0 <= self.crossover_rate <= 1:
            raise InvalidValue(f"crossover_rate={self.crossover_rate!r}: expected a probability in [0, 1]")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise InvalidValue(f"max_seconds={self.max_seconds!r}: expected a positive number or None")


class SystemPromptSearch:
    """``run(seed_prompt)`` -> report dict. ``rewriter``: the backend that rewrites requests
    under each candidate; ``proposer``: the LLM that mutates and crosses rule sets (default:
    the rewriter); ``cache_dir``: rewrites, proposals and scores on disk, so a rerun with
    the same inputs asks no LLM and generates no image again."""

    def __init__(self, rewriter: ChatBackend, metric: PromptMetric, config: Optional[SearchConfig] = None,
                 proposer: Optional[ChatBackend] = None, cache_dir: Optional[str] = None, log=print):
        config = config or SearchConfig()
        self.rewriter, self.proposer = rewriter, proposer or rewriter
        self.metric, self.cfg, self.log = metric, config, log
        self.cache_dir = cache_dir
        self.cache = JsonCache(cache_dir) if cache_dir else None
        self.rng = random.Random(config.seed)
        self.candidates: List[Candidate] = []

    # -- scoring -----------------------------------------------------------------------------
    def _score_key(self, text: str, requests: Sequence[str]) -> str:
        return JsonCache.key("lens_fast.search/score/1", text, self.rewriter.name, self.rewriter.model,
                             backend_settings(self.rewriter), self.metric.fingerprint(), list(requests),
                             self.cfg.metric_seed)

    def evaluate(self, base: RuleSet, cand: Candidate, split: str = "dev") -> Dict[str, Any]:
        """Rewrites the split's requests under the candidate and scores them (cached)."""
        text = base.with_rules(cand.rules).render()
        requests = self.metric.requests(split)
        key = self._score_key(text, requests)
        entry = self.cache.get(key) if self.cache else None
        if entry is not None:
            return {**entry, "cached": True}
        t0 = time.monotonic()
        reasoner = Reasoner(self.rewriter, text, cache_dir=f"{self.cache_dir}/rewrites" if self.cache_dir else None)
        rewrites = reasoner.rewrite(requests)
        result = self.metric.score(requests, [r.prompt for r in rewrites], self.cfg.metric_seed)
        entry = {"score": result.score, "fallbacks": sum(not r.rewritten for r in rewrites),
                 "details": result.details, "seconds": round(time.monotonic() - t0, 2),
                 "examples": [{"request": r.request, "prompt": r.prompt} for r in rewrites[:3]]}
        if self.cache:
            self.cache.put(key, entry)
        return {**entry, "cached": False}

    # -- proposals ---------------------------------------------------------------------------
    def _ask(self, user: str) -> Tuple[str, ...]:
        key = JsonCache.key("lens_fast.search/proposal/1", OPERATOR_SYSTEM, user, self.proposer.name,
                            self.proposer.model, backend_settings(self.proposer))
        hit = self.cache.get(key) if self.cache else None
        if hit is not None:
            return tuple(hit)
        rules = parse_rules(self.proposer.chat(OPERATOR_SYSTEM, user), self.cfg.max_rules)
        if self.cache:
            self.cache.put(key, list(rules))
        return rules

    def _tournament(self, exclude: Tuple[int, ...] = ()) -> Candidate:
        pool = [c for c in self.candidates if c.score is not None and c.id not in exclude]
        picks = [self.rng.choice(pool) for _ in range(min(self.cfg.tournament, len(pool)))]
        return max(picks, key=lambda c: (c.score, -c.id))

    def _mutation_prompt(self, parent: Candidate, instruction: str) -> str:
        scored = sorted((c for c in self.candidates if c.score is not None), key=lambda c: (c.score, -c.id))
        shown = [c for c in scored[-self.cfg.trajectory:] if c.id != parent.id] + [parent]
        history = "\n\n".join(f"Rule set {c.id} (score {c.score:.3f}):\n{_rule_block(c.rules)}" for c in shown)
        return (f"Earlier rule sets and their scores, worst to best, the one to edit last:\n\n{history}\n\n"
                f"Edit rule set {parent.id}. {instruction} Keep every rule that is not part of your edit. "
                "Answer with the complete new rule set.")

    @staticmethod
    def _crossover_prompt(a: Candidate, b: Candidate) -> str:
        return (f"Rule set A (score {a.score:.3f}):\n{_rule_block(a.rules)}\n\n"
                f"Rule set B (score {b.score:.3f}):\n{_rule_block(b.rules)}\n\n"
                "Combine A and B into one rule set: keep the rules that most likely earned each its score, drop "
                "duplicates and contradictions. Answer with the complete new rule set.")

    def propose(self) -> Optional[Candidate]:
        """A new, not yet seen candidate, or None when the operator gave nothing usable."""
        seen = {c.rules for c in self.candidates}
        for _ in range(self.cfg.proposal_attempts):
            if len(self.candidates) >= 2 and self.rng.random() < self.cfg.crossover_rate:
                a = self._tournament()
                b = self._tournament(exclude=(a.id,))
                operator, parents, instruction, user = "crossover", (a.id, b.id), None, self._crossover_prompt(a, b)
            else:
                parent = self._tournament()
                instruction = self.rng.choice(MUTATIONS)
                operator, parents, user = "mutation", (parent.id,), self._mutation_prompt(parent, instruction)
            try:
                rules = self._ask(user)
            except Exception as e:  # an unusable answer costs an attempt, not the search
                self.log(f"  proposal failed ({operator}): {type(e).__name__}: {e}")
                continue
            if rules not in seen:
                return Candidate(len(self.candidates), rules, operator, parents, instruction)
            self.log(f"  proposal repeats an earlier rule set ({operator}); asking again")
        return None

    # -- the loop ----------------------------------------------------------------------------
    def _score(self, base: RuleSet, cand: Candidate) -> None:
        entry = self.evaluate(base, cand)
        cand.score, cand.fallbacks, cand.details = entry["score"], entry["fallbacks"], entry["details"]
        cand.cached, cand.seconds = entry["cached"], entry["seconds"]
        cand.system_prompt_id = system_prompt_id(base.with_rules(cand.rules).render())
        self.candidates.append(cand)
        self.log(f"candidate {cand.id} ({cand.operator}{' of ' + str(list(cand.parents)) if cand.parents else ''}): "
                 f"score {cand.score:.3f}, {cand.fallbacks} fallbacks{' (cached)' if cand.cached else ''}")

    def run(self, seed_prompt: str, test: bool = True) -> Dict[str, Any]:
        base = RuleSet.parse(seed_prompt)
        t0 = time.monotonic()
        self._score(base, Candidate(0, base.rules, "seed"))
        failed = 0
        while len(self.candidates) < self.cfg.budget:
            if self.cfg.max_seconds is not None and time.monotonic() - t0 > self.cfg.max_seconds:
                self.log(f"stopping: max_seconds={self.cfg.max_seconds:g} reached")
                break
            cand = self.propose()
            if cand is None:
                failed += 1
                if failed >= self.cfg.budget:  # bounded: an operator that never answers ends the search
                    self.log("stopping: the proposer gave no usable new rule set")
                    break
                continue
            self._score(base, cand)
        winner = max(self.candidates, key=lambda c: (c.score, -c.id))
        report = {"config": asdict(self.cfg), "metric": self.metric.name, "metric_fingerprint": self.metric.fingerprint(),
                  "rewriter": {"backend": self.rewriter.name, "model": self.rewriter.model,
                               "settings": backend_settings(self.rewriter)},
                  "proposer": {"backend": self.proposer.name, "model": self.proposer.model},
                  "dev_requests": len(self.metric.requests("dev")), "failed_proposals": failed,
                  "seconds": round(time.monotonic() - t0, 1),
                  "candidates": [asdict(c) for c in self.candidates], "winner": winner.id,
                  "seed_score": self.candidates[0].score, "winner_score": winner.score,
                  "winner_system_prompt": base.with_rules(winner.rules).render()}
        if test:
            report["test"] = {name: self.evaluate(base, c, "test") for name, c in
                              (("seed", self.candidates[0]), ("winner", winner))}
            report["test_requests"] = len(self.metric.requests("test"))
        return report


def report_markdown(report: Dict[str, Any]) -> str:
    """The report as a table: every candidate's score, with the winner marked."""
    lines = [f"# System-prompt search: {report['metric']}", "",
             f"Rewriter: {report['rewriter']['backend']} ({report['rewriter']['model']}); proposer: "
             f"{report['proposer']['backend']} ({report['proposer']['model']}); {report['dev_requests']} dev requests; "
             f"{len(report['candidates'])} candidates in {report['seconds']} s.", "",
             "| id | operator | parents | dev score | fallbacks | rules |", "|---|---|---|---|---|---|"]
    for c in report["candidates"]:
        mark = " **(winner)**" if c["id"] == report["winner"] else ""
        rules = "<br>".join(r.replace("|", "\\|") for r in c["rules"])
        lines.append(f"| {c['id']}{mark} | {c['operator']} | {c['parents']} | {c['score']:.3f} | {c['fallbacks']} | "
                     f"{rules} |")
    lines += ["", f"Dev: seed {report['seed_score']:.3f}, winner {report['winner_score']:.3f} "
                  f"({report['winner_score'] - report['seed_score']:+.3f})."]
    if "test" in report:
        s, w = report["test"]["seed"]["score"], report["test"]["winner"]["score"]
        lines.append(f"Test ({report['test_requests']} held-out requests, not searched on): seed {s:.3f}, winner "
                     f"{w:.3f} ({w - s:+.3f}).")
    lines += ["", "Winner:", "", "```", report["winner_system_prompt"], "```"]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, report: Dict[str, Any]) -> None:
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(report_markdown(report))
    with open(os.path.join(out_dir, "best_system_prompt.txt"), "w", encoding="utf-8") as f:
        f.write(report["winner_system_prompt"] + "\n")
