"""The rubric judge: a vision-language model behind an OpenAI-compatible chat-completions
endpoint scores each image against its prompt's rubric items plus one global
naturalness rule, as Lens's RL rewards do.

One request per image (through ``lens_fast.chat_api.ChatClient``: bounded concurrency,
timeouts, retries with backoff on 429/5xx, strict parsing with retries of unusable
answers). The judge answers JSON::

    {"items": [1, 0, 1], "global": 1}      # one value in [0, 1] per rubric item, in order

Score = (sum of the item values + global_weight x the global value) / (number of items +
global_weight). Answers are cached on disk by (image hash, prompt, rubric, global rule,
judge model), so a resumed run pays nothing twice and sees the same rewards.

    judge = RubricJudge(ChatEndpoint.from_env("LENS_JUDGE"), cache_dir="runs/rl/judge_cache")
    results = judge.score(images, prompts, records)
"""
from __future__ import annotations

import json
import re
from typing import List, Optional, Sequence

from lens_fast.chat_api import ChatClient, ChatEndpoint, ChatError, JsonCache, image_sha256, system_message, \
    user_message

from .rewards import RewardError, RewardResult

INSTRUCTIONS = ("You are a strict image judge for a text-to-image model. You are given a prompt, numbered rubric "
                "items and one global rule. Look at the image and decide for each rubric item whether the image "
                "satisfies it (1) or not (0); use a value in between only when it is partly satisfied. Then judge "
                "the global rule the same way. Answer with JSON only, no other text: "
                '{"items": [<one value per rubric item, in order>], "global": <value>}')


def judge_request_text(prompt: str, rubric: Sequence[str], global_rule: str) -> str:
    """The user text of one judge request (the toy judge handler reads this format)."""
    items = "\n".join(f"{i}. {item}" for i, item in enumerate(rubric, 1))
    return f"Prompt: {prompt}\nRubric items:\n{items}\nGlobal rule: {global_rule}"


def parse_judgement(text: str, n_items: int) -> dict:
    """{"items": [n floats in [0, 1]], "global": float in [0, 1]} from the judge's answer
    (JSON, possibly inside a code fence); ValueError naming what is wrong otherwise."""
    body = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", body, re.S)
    if fence:
        body = fence.group(1).strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        raise ValueError(f"the judge's answer is not JSON: {text[:120]!r}") from None
    items = data.get("items") if isinstance(data, dict) else None
    value = data.get("global") if isinstance(data, dict) else None

    def unit(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) <= 1.0

    if not isinstance(items, list) or len(items) != n_items or not all(unit(v) for v in items) or not unit(value):
        raise ValueError(f"the judge's answer must be {{\"items\": [{n_items} values in [0, 1]], \"global\": "
                         f"value in [0, 1]}}; got {text[:160]!r}")
    return {"items": [float(v) for v in items], "global": float(value)}


class RubricJudge:
    """Reward: a VLM judge on an OpenAI-compatible endpoint (module docstring)."""

    name = "judge"

    def __init__(self, endpoint: ChatEndpoint, cache_dir: Optional[str] = None, global_weight: float = 1.0,
                 max_tokens: int = 256, temperature: float = 0.0, seed: Optional[int] = 0):
        if not global_weight >= 0:
            raise ValueError(f"global_weight={global_weight!r}: expected a number >= 0")
        self.endpoint = endpoint
        self.client = ChatClient(endpoint, seed=seed)
        self.cache = JsonCache(cache_dir) if cache_dir else None
        self.global_weight = float(global_weight)
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed

    def _key(self, image, prompt: str, rubric: Sequence[str], rule: str) -> str:
        return JsonCache.key(image_sha256(image), prompt, list(rubric), rule, self.endpoint.model)

    def score(self, images, prompts: Sequence[str], metadata: Sequence[dict]) -> List[RewardResult]:
        images, prompts, metadata = list(images), list(prompts), list(metadata)
        answers, todo = [None] * len(images), []
        for i, (image, prompt, record) in enumerate(zip(images, prompts, metadata)):
            rubric, rule = record.get("rubric") or [], record.get("global_rule") or ""
            if not rubric:
                raise ValueError(f"prompt {prompt!r} has no rubric items; the judge needs at least one")
            cached = self.cache.get(self._key(image, prompt, rubric, rule)) if self.cache is not None else None
            if cached is not None:
                answers[i] = cached
            else:
                todo.append(i)
        requests = [{"messages": [system_message(INSTRUCTIONS),
                                  user_message(judge_request_text(prompts[i], metadata[i]["rubric"],
                                                                  metadata[i].get("global_rule") or ""), [images[i]])],
                     "max_tokens": self.max_tokens, "temperature": self.temperature, "seed": self.seed,
                     "parse": (lambda text, n=len(metadata[i]["rubric"]): parse_judgement(text, n))} for i in todo]
        replies = self.client.complete_many(requests, return_exceptions=True)
        for i, reply in zip(todo, replies):
            if isinstance(reply, ChatError):
                raise RewardError(f"judge {self.endpoint.model} at {self.endpoint.base_url} gave no usable answer for "
                                  f"prompt {prompts[i]!r} (image {i}) after {reply.attempts} attempts: {reply}") \
                    from reply
            answers[i] = reply.parsed
            if self.cache is not None:
                record = metadata[i]
                self.cache.put(self._key(images[i], prompts[i], record["rubric"], record.get("global_rule") or ""),
                               reply.parsed)
        out = []
        for answer, record in zip(answers, metadata):
            items = dict(zip(record["rubric"], answer["items"]))
            items["global rule"] = answer["global"]
            total = sum(answer["items"]) + self.global_weight * answer["global"]
            out.append(RewardResult(total / (len(answer["items"]) + self.global_weight), items))
        return out
