"""Dense captioning through any OpenAI-compatible chat-completions VLM endpoint.

The HTTP side (bounded concurrency, request and token rate limits, retries with backoff on
429/5xx, timeouts, strict parsing) is ``lens_fast.chat_api.ChatClient``. This module adds
what captioning needs: the prompt read from a file, the image resized and attached, an
answer shorter than ``min_words`` treated as malformed (retried), and an on-disk cache keyed
by (image hash, prompt, model, generation settings) so a rerun pays nothing twice.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

from PIL import Image

from ..errors import InvalidValue, MissingFile, UserError
from ..chat_api import ChatClient, ChatEndpoint, ChatError, JsonCache, image_part
from .config import CaptionConfig, default_prompt_file

BASE_URL_ENV, MODEL_ENV = "LENS_FAST_CAPTION_BASE_URL", "LENS_FAST_CAPTION_MODEL"


class CaptionServerDown(UserError, RuntimeError):
    """The endpoint gave no answer at all (refused, unreachable, timed out every time)."""


def read_prompt(cfg: CaptionConfig) -> str:
    path = cfg.prompt_file or default_prompt_file()
    if not os.path.isfile(path):
        raise MissingFile(f"caption prompt file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text:
        raise InvalidValue(f"caption prompt file {path} is empty; expected the instructions sent with every image")
    return text


def resolve_endpoint(cfg: CaptionConfig) -> CaptionConfig:
    """Fill base_url and model from the environment when unset; error naming both ways."""
    base_url = cfg.base_url or os.environ.get(BASE_URL_ENV)
    model = cfg.model or os.environ.get(MODEL_ENV)
    if not base_url or not model:
        missing = [n for n, v in (("base_url", base_url), ("model", model)) if not v]
        raise InvalidValue(f"captioning is on but caption.{' and caption.'.join(missing)} is not set: pass "
                         f"--caption-url URL --caption-model NAME (or set {BASE_URL_ENV} / {MODEL_ENV}), "
                         "or turn captioning off (--no-caption keeps the inputs' own captions)")
    cfg.base_url, cfg.model = base_url, model
    return cfg


class Captioner:
    def __init__(self, cfg: CaptionConfig, cache_dir: str, share: int = 1):
        """``share``: how many processes split the run's rate limits."""
        cfg = resolve_endpoint(cfg)
        per = (lambda v: None if v is None else v / max(1, share))
        self.cfg, self.prompt = cfg, read_prompt(cfg)
        self.endpoint = ChatEndpoint(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s,
                                     max_retries=cfg.max_retries, backoff_s=cfg.backoff_s,
                                     backoff_max_s=cfg.backoff_max_s, max_concurrency=cfg.max_concurrency,
                                     requests_per_minute=per(cfg.requests_per_minute),
                                     tokens_per_minute=per(cfg.tokens_per_minute))
        self.client = ChatClient(self.endpoint)
        self.cache = JsonCache(cache_dir)

    def key(self, image_hash: str) -> str:
        c = self.cfg
        return JsonCache.key("caption", image_hash, self.prompt, c.model, c.max_tokens, c.temperature, c.image_side,
                             c.image_format)

    def cached(self, image_hash: str) -> Optional[str]:
        value = self.cache.get(self.key(image_hash))
        return value.get("caption") if isinstance(value, dict) else None

    def _parse(self, text: str) -> str:
        caption = " ".join(text.split())
        if len(caption.split()) < self.cfg.min_words:
            raise InvalidValue(f"a caption of {len(caption.split())} words; expected at least {self.cfg.min_words}")
        return caption

    def _request(self, image: Image.Image) -> dict:
        side = self.cfg.image_side
        if max(image.size) > side:
            image = image.copy()
            image.thumbnail((side, side), Image.BICUBIC)
        message = {"role": "user", "content": [{"type": "text", "text": self.prompt},
                                               image_part(image, format=self.cfg.image_format)]}
        return dict(messages=[message], max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                    parse=self._parse)

    def caption_many(self, images: Sequence[Image.Image], hashes: Sequence[str]) -> List[Union[str, ChatError]]:
        """A caption (or the ChatError that stopped it) per image; cached answers cost nothing.
        Raises ``CaptionServerDown`` when no request got any answer from the server."""
        out: List[Union[str, ChatError, None]] = [self.cached(h) for h in hashes]
        todo = [i for i, c in enumerate(out) if c is None]
        replies = self.client.complete_many([self._request(images[i]) for i in todo], return_exceptions=True)
        for i, reply in zip(todo, replies):
            if isinstance(reply, ChatError):
                out[i] = reply
            else:
                out[i] = reply.parsed
                self.cache.put(self.key(hashes[i]), {"caption": reply.parsed, "model": reply.model})
        errors = [r for r in replies if isinstance(r, ChatError)]
        unanswered = [e for e in errors if e.status is None and "unusable" not in str(e)]
        if errors and len(unanswered) == len(replies):
            raise CaptionServerDown(f"the captioning endpoint {self.endpoint.url} gave no answer to any of "
                                    f"{len(errors)} requests (last: {errors[-1]})")
        return out

