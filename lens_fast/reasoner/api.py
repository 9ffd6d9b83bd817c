"""The ``api`` reasoner backend: any OpenAI-compatible chat-completions endpoint (vLLM or
SGLang serving GPT-OSS, a hosted API), through ``lens_fast.chat_api.ChatClient`` (timeouts,
bounded retries with backoff, rate limits, strict parsing).

The endpoint comes from the environment: ``LENS_FAST_REASONER_BASE_URL`` (e.g.
``http://127.0.0.1:8000/v1``), ``LENS_FAST_REASONER_MODEL`` and the key in
``LENS_FAST_REASONER_API_KEY`` (``OPENAI_API_KEY`` when unset). Reasoning models served
this way return their analysis apart from the answer (``reasoning_content``), so the
message content is the final answer; a ``<think>...</think>`` block some servers leave in
the content is dropped.
"""
from __future__ import annotations

import re
from typing import Optional

from ..errors import InvalidValue
from ..chat_api import ChatClient, ChatEndpoint, system_message, user_message
from .base import RewriteError

ENV_PREFIX = "LENS_FAST_REASONER"
_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def _answer(text: str) -> str:
    answer = _THINK.sub("", text).strip()
    if not answer:
        raise InvalidValue("empty answer")
    return answer


class ApiBackend:
    """``chat(system, user)`` through one ``ChatClient``. ``temperature``/``seed`` are sent
    only when set (some hosted reasoning models reject them); an answer cut at
    ``max_tokens`` is an error, never a half prompt."""

    name = "api"

    def __init__(self, endpoint: ChatEndpoint, max_tokens: int = 1024, temperature: Optional[float] = None,
                 seed: Optional[int] = None):
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidValue(f"max_tokens={max_tokens!r}: expected an int >= 1")
        self.endpoint = endpoint
        self.client = ChatClient(endpoint, seed=seed)
        self.model = endpoint.model
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed

    @classmethod
    def from_env(cls, prefix: str = ENV_PREFIX, max_tokens: int = 1024, temperature: Optional[float] = None,
                 seed: Optional[int] = None, **endpoint_overrides) -> "ApiBackend":
        return cls(ChatEndpoint.from_env(prefix, **endpoint_overrides), max_tokens, temperature, seed)

    def settings(self) -> dict:
        return {"base_url": self.endpoint.base_url, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "seed": self.seed}

    def check(self) -> None:
        """Fails fast (``ChatError`` naming the URL and what to set) when the endpoint cannot
        be reached or refuses the key: call it before any expensive work."""
        self.client.probe()

    def chat(self, system: str, user: str) -> str:
        reply = self.client.complete([system_message(system), user_message(user)], max_tokens=self.max_tokens,
                                     temperature=self.temperature, seed=self.seed, parse=_answer)
        if reply.finish_reason == "length":
            raise RewriteError(f"the answer was cut at max_tokens={self.max_tokens}")
        return reply.parsed
