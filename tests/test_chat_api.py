"""The chat-completions client against a real local server process (loopback): success,
429 / 5xx then success, timeouts, malformed answers, refused requests, keys, bounded
concurrency, rate limits, and the answer cache."""
import json
import math
import os
import socket
import time

import pytest

from lens_fast.chat_api import ChatClient, ChatEndpoint, ChatError, JsonCache, image_sha256, user_message
from lens_fast.chat_server import LocalChatServer


@pytest.fixture(scope="module")
def server():
    with LocalChatServer("echo", model="toy-vlm") as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()


def client(server, **kw):
    kw = {"backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, **kw}
    return ChatClient(ChatEndpoint(server.url, "toy-vlm", **kw), seed=0)


def ask(c, text="hello there", **kw):
    return c.complete([user_message(text)], **kw)


def test_success_is_one_request(server):
    reply = ask(client(server))
    assert reply.text == "hello there" and reply.attempts == 1 and reply.finish_reason == "stop"
    assert reply.usage["total_tokens"] > 0 and reply.model == "toy-vlm"
    assert server.stats()["requests"] == 1


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_retryable_status_then_success(server, status):
    server.add_faults({"status": status, "retry_after": 0.02}, {"status": status})
    reply = ask(client(server))
    assert reply.text == "hello there" and reply.attempts == 3
    assert server.stats()["requests"] == 3


def test_retry_after_is_honoured(server):
    server.add_faults({"status": 429, "retry_after": 0.4})
    t0 = time.monotonic()
    reply = ask(client(server, backoff_max_s=1.0))
    assert reply.attempts == 2 and time.monotonic() - t0 >= 0.4


def test_gives_up_after_max_retries_naming_the_endpoint(server):
    server.add_faults(*[{"status": 503}] * 3)
    with pytest.raises(ChatError, match=r"failed after 3 attempts \(last: HTTP 503") as e:
        ask(client(server, max_retries=2))
    assert e.value.status == 503 and e.value.attempts == 3 and server.url in str(e.value)


def test_client_error_is_not_retried(server):
    server.add_faults({"status": 400})
    with pytest.raises(ChatError, match="refused the request") as e:
        ask(client(server))
    assert e.value.attempts == 1 and server.stats()["requests"] == 1


def test_timeout_then_success(server):
    server.add_faults({"delay_s": 1.5})
    reply = ask(client(server, timeout_s=0.3))
    assert reply.attempts == 2


def test_timeouts_until_the_end_are_a_clear_error(server):
    server.add_faults({"delay_s": 1.0}, {"delay_s": 1.0})
    t0 = time.monotonic()
    with pytest.raises(ChatError, match="timed out after 0.2 s"):
        ask(client(server, timeout_s=0.2, max_retries=1))
    assert time.monotonic() - t0 < 5


def test_dropped_connection_is_retried(server):
    server.add_faults({"drop": True})
    assert ask(client(server)).attempts == 2


@pytest.mark.parametrize("body", ["not json at all", json.dumps({"choices": []}),
                                  json.dumps({"choices": [{"message": {"role": "assistant"}}]})])
def test_malformed_reply_retried_then_error(server, body):
    server.add_faults({"body": body})
    assert ask(client(server)).attempts == 2
    server.add_faults(*[{"body": body}] * 2)
    with pytest.raises(ChatError, match="unusable answer"):
        ask(client(server, max_retries=1))


def test_unparsable_answer_is_retried_through_parse(server):
    server.add_faults({"content": "I think the score is high"})
    reply = ask(client(server), text="7", parse=int)
    assert reply.parsed == 7 and reply.attempts == 2


def test_unreachable_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    c = ChatClient(ChatEndpoint(f"http://127.0.0.1:{port}/v1", "m", backoff_s=0.01, max_retries=2))
    with pytest.raises(ChatError, match="failed after 3 attempts") as e:
        ask(c)
    assert e.value.status is None


def test_api_key_sent_from_environment_and_required(monkeypatch):
    with LocalChatServer("echo", api_key="sekret") as s:
        monkeypatch.delenv("TEST_CHAT_KEY", raising=False)
        with pytest.raises(ChatError, match="set the environment variable TEST_CHAT_KEY"):
            ask(client(s, api_key_env="TEST_CHAT_KEY", require_key=True))
        assert s.stats()["requests"] == 0  # refused before any request
        with pytest.raises(ChatError, match="HTTP 401"):
            ask(client(s, api_key_env="TEST_CHAT_KEY"))
        monkeypatch.setenv("TEST_CHAT_KEY", "sekret")
        assert ask(client(s, api_key_env="TEST_CHAT_KEY", require_key=True)).text == "hello there"


def test_probe_names_an_unreachable_endpoint_and_a_missing_or_wrong_key(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = ChatClient(ChatEndpoint(f"http://127.0.0.1:{port}/v1", "m", timeout_s=2))
    with pytest.raises(ChatError, match=rf"cannot reach the chat endpoint http://127.0.0.1:{port}/v1 \(") as e:
        dead.probe()
    assert e.value.attempts == 1
    with LocalChatServer("echo", api_key="sekret") as server:
        monkeypatch.delenv("TEST_PROBE_KEY", raising=False)
        c = client(server, api_key_env="TEST_PROBE_KEY")
        with pytest.raises(ChatError, match=r"valid API key \(HTTP 401\): set TEST_PROBE_KEY"):
            c.probe()
        monkeypatch.setenv("TEST_PROBE_KEY", "wrong")
        with pytest.raises(ChatError, match="check the key in TEST_PROBE_KEY"):
            c.probe()
        monkeypatch.setenv("TEST_PROBE_KEY", "sekret")
        c.probe()
        assert server.stats()["requests"] == 0  # probing asks no chat completion


def test_concurrency_is_bounded_and_order_kept(server):
    server.add_faults(*[{"delay_s": 0.2}] * 6)
    c = client(server, max_concurrency=2)
    replies = c.complete_many([{"messages": [user_message(f"n{i}")]} for i in range(6)])
    assert [r.text for r in replies] == [f"n{i}" for i in range(6)]
    assert 1 <= server.stats()["max_in_flight"] <= 2


def test_requests_left_running_before_a_reset_do_not_count_after_it(server):
    """A handler still sleeping from an earlier test (its client gave up) must not inflate
    the next test's in-flight count: reset starts a fresh count."""
    import threading
    server.add_faults({"delay_s": 1.5})
    slow = threading.Thread(target=lambda: pytest.raises(ChatError, ask, client(server, timeout_s=0.2, max_retries=0)))
    slow.start()
    slow.join()
    assert server.stats()["requests"] == 1  # the server is still sleeping on it
    server.reset()
    server.add_faults(*[{"delay_s": 0.2}] * 4)
    client(server, max_concurrency=1).complete_many([{"messages": [user_message(f"n{i}")]} for i in range(4)])
    assert server.stats()["max_in_flight"] == 1
    time.sleep(1.5)  # let the abandoned request finish before the next test


def test_request_rate_limit_holds_a_lower_bound(server):
    c = client(server, requests_per_minute=60, max_concurrency=4)  # a burst of 60, then 1 per second
    t0 = time.monotonic()
    c.complete_many([{"messages": [user_message("x")]}] * 61)
    assert time.monotonic() - t0 >= 0.9


def test_complete_many_can_return_exceptions(server):
    server.add_faults({"status": 400})
    out = client(server, max_concurrency=1).complete_many(
        [{"messages": [user_message("a")]}, {"messages": [user_message("b")]}], return_exceptions=True)
    assert isinstance(out[0], ChatError) and out[1].text == "b"


@pytest.mark.parametrize("kw, match", [({"base_url": "ftp://x"}, "base_url"), ({"timeout_s": math.nan}, "timeout_s"),
                                       ({"max_concurrency": 0}, "max_concurrency"), ({"max_retries": -1}, "max_retries"),
                                       ({"model": " "}, "model"), ({"requests_per_minute": math.inf}, "requests_per_minute")])
def test_bad_endpoint_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        ChatEndpoint(**{"base_url": "http://127.0.0.1:1/v1", "model": "m", **kw})


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.delenv("LF_TEST_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="set LF_TEST_BASE_URL"):
        ChatEndpoint.from_env("LF_TEST")
    monkeypatch.setenv("LF_TEST_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LF_TEST_MODEL", "judge")
    monkeypatch.setenv("LF_TEST_API_KEY", "k")
    ep = ChatEndpoint.from_env("LF_TEST", timeout_s=3)
    assert (ep.model, ep.api_key_env, ep.api_key(), ep.timeout_s) == ("judge", "LF_TEST_API_KEY", "k", 3)
    monkeypatch.delenv("LF_TEST_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "o")
    assert ChatEndpoint.from_env("LF_TEST").api_key_env == "OPENAI_API_KEY"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert ChatEndpoint.from_env("LF_TEST").api_key_env == "LF_TEST_API_KEY"  # what an error tells the user to set


def test_image_message_round_trips_through_the_server(server):
    from PIL import Image

    from lens_fast.chat_api import decode_image_part

    image = Image.new("RGB", (5, 3), (200, 10, 30))
    ask(client(server), text="describe")  # warm
    msg = user_message("describe", images=[image])
    client(server).complete([msg])
    body = server.stats()["bodies"][-1]
    part = body["messages"][0]["content"][1]
    assert image_sha256(decode_image_part(part).convert("RGB")) == image_sha256(image)


def test_json_cache(tmp_path):
    cache = JsonCache(str(tmp_path / "c"))
    key = JsonCache.key("img", "prompt", "model")
    assert key == JsonCache.key("img", "prompt", "model") != JsonCache.key("img", "prompt", "other")
    calls = []
    assert cache.get_or_compute(key, lambda: calls.append(1) or {"caption": "x"}) == {"caption": "x"}
    assert cache.get_or_compute(key, lambda: calls.append(1) or {"caption": "y"}) == {"caption": "x"}
    assert calls == [1] and len(cache) == 1
    path = os.path.join(str(tmp_path / "c"), key[:2], key + ".json")
    with open(path, "w") as f:
        f.write("{torn")
    assert cache.get_or_compute(key, lambda: {"caption": "z"}) == {"caption": "z"}
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp-" in f]
