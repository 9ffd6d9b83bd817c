"""The reasoner: an LLM rewrites a user's request into the detailed prompt Lens reads.

One interface, any backend: a backend is an object with ``name`` (e.g. "local", "api"),
``model`` (what answers) and ``chat(system, user) -> str`` (the assistant's final text;
any exception means "no usable answer"); ``settings()`` may add what else determines an
answer (sampling temperature, seed, token limit) to the cache key. ``CallableBackend``
wraps a plain function. ``Reasoner`` adds what every backend needs:

- checks (``checks.rejection_reason``): an empty answer, a refusal or an answer in another
  language than the request is not used; neither is an exception from the backend
  (timeout, unreachable server, no final channel). In every such case the request is used
  as written, with a warning naming the reason, and never a crash;
- a cache keyed by (request, system prompt, backend, model, settings): in memory (LRU)
  and, with ``cache_dir``, on disk (``chat_api.JsonCache``), so a rerun pays nothing twice.
  Only accepted rewrites are cached: a timeout is retried next time.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Union, runtime_checkable

from ..errors import InvalidValue, MissingFile
from ..chat_api import JsonCache
from .checks import rejection_reason

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_system_prompt.txt")


class RewriteError(RuntimeError):
    """A backend produced no usable answer (the reason is the message)."""


@runtime_checkable
class ChatBackend(Protocol):
    name: str
    model: str

    def chat(self, system: str, user: str) -> str:
        ...


def backend_settings(backend) -> Dict[str, Any]:
    settings = getattr(backend, "settings", None)
    return dict(settings()) if callable(settings) else {}


class CallableBackend:
    """A backend from a function ``fn(system, user) -> str``."""

    def __init__(self, fn: Callable[[str, str], str], name: str = "custom", model: str = "custom"):
        if not callable(fn):
            raise TypeError(f"fn={fn!r}: expected a function (system, user) -> str")
        self.fn, self.name, self.model = fn, name, model

    def chat(self, system: str, user: str) -> str:
        return self.fn(system, user)


def load_system_prompt(path: Optional[str] = None) -> str:
    """The text of a system-prompt file (default: the packaged Lens system prompt)."""
    path = os.fspath(path) if path is not None else DEFAULT_SYSTEM_PROMPT_FILE
    if not os.path.isfile(path):
        raise MissingFile(f"system prompt file {path} does not exist; expected a text file with the "
                                "reasoner's instructions")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise InvalidValue(f"system prompt file {path} is empty; expected the reasoner's instructions")
    return text.strip()


def system_prompt_id(text: str) -> str:
    """A short digest naming a system prompt in reports and image metadata."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


@dataclass
class Rewrite:
    """One request's outcome. ``prompt`` is what goes to the text encoder: the rewrite
    when ``rewritten``, else the request itself, with ``reason`` saying why."""
    request: str
    prompt: str
    rewritten: bool
    reason: Optional[str] = None
    cached: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class Reasoner:
    """Rewrites requests with ``backend`` under ``system_prompt`` (text; default: the
    packaged Lens system prompt), with checks, fallback and caching (module docstring)."""

    def __init__(self, backend: ChatBackend, system_prompt: Optional[str] = None, cache_dir: Optional[str] = None,
                 memory_cache: int = 4096):
        if not isinstance(backend, ChatBackend):
            raise TypeError(f"backend={backend!r}: expected an object with name, model and chat(system, user) -> str "
                            "(or wrap a function in CallableBackend)")
        if system_prompt is None:
            system_prompt = load_system_prompt()
        if not isinstance(system_prompt, str) or not system_prompt.strip():
            raise InvalidValue(f"system_prompt={system_prompt!r}: expected the reasoner's instructions as text")
        if not isinstance(memory_cache, int) or memory_cache < 0:
            raise InvalidValue(f"memory_cache={memory_cache!r}: expected an int >= 0")
        self.backend = backend
        self.system_prompt = system_prompt.strip()
        self.disk_cache = JsonCache(cache_dir) if cache_dir else None
        self.memory_cache = memory_cache
        self._memory: "OrderedDict[str, str]" = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "fallbacks": 0}

    def describe(self) -> dict:
        """What produced the rewrites: backend, model, settings and the system prompt's id."""
        return {"backend": self.backend.name, "model": self.backend.model, "settings": backend_settings(self.backend),
                "system_prompt_id": system_prompt_id(self.system_prompt)}

    def cache_key(self, request: str) -> str:
        return JsonCache.key("lens_fast.reasoner/1", request, self.system_prompt, self.backend.name,
                             self.backend.model, backend_settings(self.backend))

    def _cached(self, key: str) -> Optional[str]:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        if self.disk_cache is not None:
            entry = self.disk_cache.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
                self._remember(key, entry["prompt"])
                return entry["prompt"]
        return None

    def _remember(self, key: str, prompt: str) -> None:
        if self.memory_cache == 0:
            return
        with self._lock:
            self._memory[key] = prompt
            self._memory.move_to_end(key)
            while len(self._memory) > self.memory_cache:
                self._memory.popitem(last=False)

    def rewrite_one(self, request: str) -> Rewrite:
        if not isinstance(request, str):
            raise TypeError(f"request must be a str, got {type(request).__name__}: {request!r}")
        key = self.cache_key(request)
        hit = self._cached(key)
        if hit is not None:
            self.stats["hits"] += 1
            return Rewrite(request, hit, True, cached=True)
        self.stats["misses"] += 1
        try:
            answer = self.backend.chat(self.system_prompt, request)
            if not isinstance(answer, str):
                raise RewriteError(f"the backend returned {type(answer).__name__}, expected str")
            answer = " ".join(answer.split())  # one paragraph, as the system prompt asks
            reason = rejection_reason(request, answer)
        except Exception as e:  # any backend failure falls back to the request: never a crash
            reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            self.stats["fallbacks"] += 1
            logger.warning("reasoner (%s, %s): using the prompt as written (%s): %.80r", self.backend.name,
                           self.backend.model, reason, request)
            return Rewrite(request, request, False, reason=reason)
        self._remember(key, answer)
        if self.disk_cache is not None:
            self.disk_cache.put(key, {"request": request, "prompt": answer, **self.describe()})
        return Rewrite(request, answer, True)

    def rewrite(self, requests: Union[str, Sequence[str]]) -> List[Rewrite]:
        """One ``Rewrite`` per request, in order (a request repeated in the batch is asked once)."""
        requests = [requests] if isinstance(requests, str) else list(requests)
        done: Dict[str, Rewrite] = {}
        out = []
        for r in requests:
            if r not in done:
                done[r] = self.rewrite_one(r)
            out.append(done[r])
        return out

    __call__ = rewrite
