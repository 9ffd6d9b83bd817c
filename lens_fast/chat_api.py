"""One client for OpenAI-compatible chat-completions endpoints (vLLM, SGLang, hosted APIs).

Everything in lens_fast that talks to a language or vision-language model over HTTP goes
through ``ChatClient``: the dense captioner of the data pipeline, the rubric judge of RL
post-training, the reasoner's ``api`` backend. It keeps the promises a long batch job needs:

- bounded concurrency (``max_concurrency`` requests in flight, whatever the number of
  calling threads), request and token rate limits (token buckets per minute);
- a timeout per attempt and a bounded number of attempts: retries with exponential backoff
  and jitter on 408/409/425/429/5xx, on timeouts and on dropped connections, honouring
  ``Retry-After``; any other 4xx fails at once. After the last attempt a ``ChatError``
  names the endpoint, the status and the attempts, so no call can hang or loop forever;
- strict parsing: a reply that is not a chat completion with a text message, or whose text
  the caller's ``parse`` rejects, is retried, then a ``ChatError`` (never an empty string
  passed on as an answer);
- the API key is read from the environment at call time and never stored or logged.

``JsonCache`` (a folder of JSON files keyed by a hash of what determines the answer) lets a
rerun pay nothing twice. Only the standard library is used. ``lens_fast.chat_server`` is a
real local server speaking the same protocol, for tests and the demo.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from .errors import InvalidValue, UserError

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ChatError(UserError, RuntimeError):
    """A chat request that failed for good (an environment problem, not a bug: the CLI
    prints it as one line). ``status`` is the last HTTP status (None when
    no response came back), ``attempts`` how many requests were made."""

    def __init__(self, message: str, status: Optional[int] = None, attempts: int = 0):
        super().__init__(message)
        self.status = status
        self.attempts = attempts


def _positive(name: str, value, allow_none: bool = False, integer: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive finite number"
        raise InvalidValue(f"{name}={value!r}: expected {kind}{' or None' if allow_none else ''}")


@dataclass(frozen=True)
class ChatEndpoint:
    """Where and how to call: ``base_url`` ends before ``/chat/completions`` (for example
    ``http://127.0.0.1:8000/v1``). The key is read from the environment variable
    ``api_key_env`` when a request is made; ``require_key`` refuses to send without one."""
    base_url: str
    model: str
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    require_key: bool = False
    timeout_s: float = 60.0
    max_retries: int = 4
    backoff_s: float = 0.5
    backoff_max_s: float = 20.0
    max_concurrency: int = 4
    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    extra_body: Dict[str, Any] = field(default_factory=dict)  # sent with every request (e.g. top_p)

    def __post_init__(self):
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise InvalidValue(f"base_url={self.base_url!r}: expected an http:// or https:// URL such as "
                             "http://127.0.0.1:8000/v1")
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidValue(f"model={self.model!r}: expected the model name the endpoint serves")
        _positive("timeout_s", self.timeout_s)
        _positive("backoff_s", self.backoff_s)
        _positive("backoff_max_s", self.backoff_max_s)
        _positive("max_concurrency", self.max_concurrency, integer=True)
        _positive("requests_per_minute", self.requests_per_minute, allow_none=True)
        _positive("tokens_per_minute", self.tokens_per_minute, allow_none=True)
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 0:
            raise InvalidValue(f"max_retries={self.max_retries!r}: expected an integer >= 0")

    @classmethod
    def from_env(cls, prefix: str, **overrides) -> "ChatEndpoint":
        """``{prefix}_BASE_URL``, ``{prefix}_MODEL`` and the key in ``{prefix}_API_KEY``
        (``OPENAI_API_KEY`` when only that is set; with neither, errors about the key name
        ``{prefix}_API_KEY``); keyword arguments override."""
        values = dict(base_url=os.environ.get(f"{prefix}_BASE_URL"), model=os.environ.get(f"{prefix}_MODEL"))
        own = f"{prefix}_API_KEY"
        values["api_key_env"] = "OPENAI_API_KEY" if not os.environ.get(own) and os.environ.get("OPENAI_API_KEY") \
            else own
        values.update(overrides)
        for key, env in (("base_url", "BASE_URL"), ("model", "MODEL")):
            if not values.get(key):
                raise InvalidValue(f"no chat endpoint {key}: set {prefix}_{env} (or pass {key}=...)")
        return cls(**values)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def api_key(self) -> Optional[str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if self.require_key and not key:
            raise ChatError(f"no API key for {self.base_url}: set the environment variable {self.api_key_env}")
        return key


@dataclass
class ChatReply:
    text: str
    finish_reason: Optional[str]
    usage: Dict[str, int]
    model: Optional[str]
    attempts: int
    parsed: Any = None  # what complete(parse=...) made of the text


class _Bucket:
    """A token bucket refilled at ``per_minute`` per minute, holding at most one minute's
    worth; ``take`` blocks until the amount is there (and may leave the bucket negative
    when ``settle`` learns that a request cost more than estimated)."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = per_minute
        self.level = per_minute
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        while True:
            with self.lock:
                self._refill()
                if self.level >= amount:
                    self.level -= amount
                    return
                wait = (amount - self.level) / self.rate
            time.sleep(min(wait, 1.0))

    def settle(self, extra: float) -> None:
        with self.lock:
            self.level -= extra


def _retry_after(headers) -> Optional[float]:
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def parse_reply(body: bytes, url: str) -> ChatReply:
    """A chat completion's text, or ``ChatError`` saying what was wrong with the reply."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ChatError(f"{url} answered with something that is not JSON: {body[:120]!r}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ChatError(f"{url} answered without choices: {str(data)[:200]}")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ChatError(f"{url} answered without a text message: {str(choices[0])[:200]}")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return ChatReply(text=content, finish_reason=choices[0].get("finish_reason"),
                     usage={k: int(v) for k, v in usage.items() if isinstance(v, (int, float))},
                     model=data.get("model"), attempts=0)


def _estimate_tokens(messages: Sequence[dict], max_tokens: Optional[int]) -> int:
    chars, images = 0, 0
    for m in messages:
        content = m.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        for p in parts:
            if p.get("type") == "text":
                chars += len(p.get("text") or "")
            else:
                images += 1
    return chars // 4 + 800 * images + (max_tokens or 256)


class ChatClient:
    """Thread-safe: call ``complete`` from any number of threads, or ``complete_many``."""

    def __init__(self, endpoint: ChatEndpoint, seed: Optional[int] = None):
        self.endpoint = endpoint
        self._slots = threading.BoundedSemaphore(endpoint.max_concurrency)
        self._requests = _Bucket(endpoint.requests_per_minute) if endpoint.requests_per_minute else None
        self._tokens = _Bucket(endpoint.tokens_per_minute) if endpoint.tokens_per_minute else None
        self._jitter = random.Random(seed)
        self._jitter_lock = threading.Lock()

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        ep = self.endpoint
        with self._jitter_lock:
            delay = min(ep.backoff_max_s, ep.backoff_s * 2 ** attempt) * self._jitter.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, ep.backoff_max_s))
        return delay

    def _post(self, payload: bytes) -> bytes:
        ep = self.endpoint
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = ep.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(ep.url, data=payload, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=ep.timeout_s) as response:
            return response.read()

    def probe(self) -> None:
        """One ``GET {base_url}/models`` (no retries): ``ChatError`` when the endpoint cannot
        be reached or refuses the key (401/403), naming the URL and the key's variable.
        Any other answer (a server without that route included) counts as reachable. For a
        command to fail in one line before it starts expensive work."""
        ep = self.endpoint
        url = ep.base_url.rstrip("/") + "/models"
        key = ep.api_key()
        headers = {"Accept": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=ep.timeout_s):
                return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                hint = f"set {ep.api_key_env}" if not key else f"check the key in {ep.api_key_env}"
                raise ChatError(f"{ep.base_url} refused the request for lack of a valid API key (HTTP {e.code}): "
                                f"{hint}", e.code, 1) from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
            cause = getattr(e, "reason", e)
            why = f"no answer within {ep.timeout_s:g} s" if isinstance(cause, (socket.timeout, TimeoutError)) \
                else f"{type(cause).__name__}: {cause}"
            raise ChatError(f"cannot reach the chat endpoint {ep.base_url} ({why}); expected an OpenAI-compatible "
                            "server there", None, 1) from None

    def complete(self, messages: Sequence[dict], max_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, seed: Optional[int] = None,
                 parse: Optional[Callable[[str], Any]] = None, **extra) -> ChatReply:
        """One chat completion. ``messages`` as the API takes them (see ``user_message``).
        ``parse``: turns the answer's text into what the caller needs (``reply.parsed``) or
        raises ``ValueError``; an unparsable answer is retried like a failed request."""
        ep = self.endpoint
        body = {"model": ep.model, "messages": list(messages), **ep.extra_body, **extra}
        for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
            if value is not None:
                body[name] = value
        payload = json.dumps(body).encode()
        estimate = _estimate_tokens(messages, max_tokens)
        status, reason = None, "no attempt made"
        for attempt in range(ep.max_retries + 1):
            if self._requests:
                self._requests.take(1)
            if self._tokens:
                self._tokens.take(estimate)
            retry_after = None
            with self._slots:
                try:
                    raw = self._post(payload)
                except urllib.error.HTTPError as e:
                    status, retry_after = e.code, _retry_after(e.headers)
                    reason = f"HTTP {e.code}: {e.read()[:200]!r}"
                    if e.code not in RETRY_STATUSES:
                        raise ChatError(f"{ep.url} refused the request ({reason})", e.code, attempt + 1) from None
                except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
                    status = None
                    cause = getattr(e, "reason", e)
                    reason = f"timed out after {ep.timeout_s:g} s" if isinstance(cause, (socket.timeout, TimeoutError)) \
                        else f"{type(cause).__name__}: {cause}"
                else:
                    try:
                        reply = parse_reply(raw, ep.url)
                        if parse is not None:
                            reply.parsed = parse(reply.text)
                    except (ChatError, ValueError) as e:
                        reason = f"unusable answer: {e}"
                    else:
                        reply.attempts = attempt + 1
                        if self._tokens and reply.usage.get("total_tokens", 0) > estimate:
                            self._tokens.settle(reply.usage["total_tokens"] - estimate)
                        return reply
            if attempt < ep.max_retries:
                time.sleep(self._backoff(attempt, retry_after))
        raise ChatError(f"{ep.url} failed after {ep.max_retries + 1} attempts (last: {reason})", status,
                        ep.max_retries + 1)

    def complete_many(self, requests: Iterable[dict], return_exceptions: bool = False) -> List[Any]:
        """``complete(**r)`` for each request, ``max_concurrency`` at a time, results in order.
        With ``return_exceptions`` a failed request gives its ``ChatError`` in its place."""
        requests = list(requests)

        def one(r):
            try:
                return self.complete(**r)
            except ChatError as e:
                if return_exceptions:
                    return e
                raise

        with ThreadPoolExecutor(max_workers=self.endpoint.max_concurrency) as pool:
            return list(pool.map(one, requests))


def image_part(image, format: str = "PNG") -> dict:
    """An ``image_url`` content part holding the image inline (a data URL). ``image``: a PIL
    image, or the bytes of an encoded image file."""
    if isinstance(image, (bytes, bytearray)):
        data, mime = bytes(image), "image/" + _sniff(bytes(image))
    else:
        buf = io.BytesIO()
        image.save(buf, format=format)
        data, mime = buf.getvalue(), "image/" + format.lower()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def _sniff(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"


def user_message(text: str, images: Sequence = ()) -> dict:
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}] + [image_part(i) for i in images]}


def system_message(text: str) -> dict:
    return {"role": "system", "content": text}


def decode_image_part(part: dict):
    """The PIL image in an ``image_url`` data-URL part (servers and tests use it)."""
    from PIL import Image

    url = part["image_url"]["url"]
    if not url.startswith("data:") or ";base64," not in url:
        raise InvalidValue(f"expected a base64 data URL, got {url[:40]!r}")
    return Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1])))


def image_sha256(image) -> str:
    """A digest of an image's content: the file bytes for bytes, mode + size + pixels for a
    PIL image (so re-encoding the same pixels keeps the key)."""
    h = hashlib.sha256()
    if isinstance(image, (bytes, bytearray)):
        h.update(bytes(image))
    else:
        h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
        h.update(image.tobytes())
    return h.hexdigest()


class JsonCache:
    """Answers on disk, one JSON file per key (``key(...)`` hashes what determines the answer),
    written atomically so a killed run never leaves a torn entry. Safe across threads and
    processes (last writer wins with an identical value)."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, key[:2], key + ".json")

    def get(self, key: str, default=None):
        try:
            with open(self._path(key), encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return default
        except (json.JSONDecodeError, UnicodeDecodeError):
            return default  # a foreign or damaged file: recompute, the put below replaces it

    def put(self, key: str, value) -> None:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f)
        os.replace(tmp, path)

    def get_or_compute(self, key: str, compute: Callable[[], Any]):
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def __len__(self) -> int:
        return sum(len([f for f in files if f.endswith(".json")]) for _, _, files in os.walk(self.folder))
