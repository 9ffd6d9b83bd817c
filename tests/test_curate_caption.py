"""The dense captioner against a real local chat-completions server process: success,
429 then success, a timeout, a malformed (too short) answer, the cache, a server that is
down, and the toy world's captioner behind the server."""
import socket

import numpy as np
import pytest
from PIL import Image

from lens_fast.chat_api import ChatError, image_sha256
from lens_fast.chat_server import LocalChatServer
from lens_fast.curate.caption import Captioner, CaptionServerDown
from lens_fast.curate.config import CaptionConfig
from lens_fast.toy import dense_caption, render_scene, sample_scene

LONG = "a red circle sits in the centre of a plain white square canvas"


@pytest.fixture(scope="module")
def server():
    with LocalChatServer("echo", model="toy-vlm") as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()


def captioner(tmp_path, url, **kw):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Describe the image in detail please.")
    kw = dict(dict(timeout_s=5.0, max_retries=2, backoff_s=0.01, backoff_max_s=0.05), **kw)
    cfg = CaptionConfig(base_url=url, model="toy-vlm", prompt_file=str(prompt), image_format="PNG", **kw)
    return Captioner(cfg, str(tmp_path / "cache"))


def images(n=2):
    return [Image.new("RGB", (40, 30), (10 * i, 100, 200)) for i in range(n)]


def test_success_sends_prompt_and_image_then_caches(tmp_path, server):
    c = captioner(tmp_path, server.url)
    ims = images()
    hashes = [image_sha256(i) for i in ims]
    assert c.caption_many(ims, hashes) == ["Describe the image in detail please."] * 2
    body = server.stats()["bodies"][0]
    parts = body["messages"][0]["content"]
    assert parts[0]["text"].startswith("Describe") and parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert body["model"] == "toy-vlm" and body["temperature"] == 0.0
    assert c.caption_many(ims, hashes) == ["Describe the image in detail please."] * 2
    assert server.stats()["requests"] == 2  # the second call was answered from the cache


def test_429_then_success_and_timeout_then_success(tmp_path, server):
    server.add_faults({"status": 429, "retry_after": 0.01})
    c = captioner(tmp_path, server.url)
    assert c.caption_many(images(1), ["h1"])[0].startswith("Describe")
    server.reset()
    server.add_faults({"delay_s": 1.0})
    c = captioner(tmp_path, server.url, timeout_s=0.3)
    assert c.caption_many(images(1), ["h2"])[0].startswith("Describe")
    assert server.stats()["requests"] == 2


def test_malformed_answer_is_retried_then_reported(tmp_path, server):
    server.add_faults({"content": "ok"}, {"body": "not json"})
    c = captioner(tmp_path, server.url)
    assert c.caption_many(images(1), ["h3"])[0].startswith("Describe")  # third try
    server.reset()
    server.add_faults(*[{"content": "too short"}] * 3)
    out = captioner(tmp_path, server.url).caption_many(images(1), ["h4"])
    assert isinstance(out[0], ChatError) and "a caption of 2 words; expected at least 5" in str(out[0])


def test_server_down_is_one_clear_error(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    c = captioner(tmp_path, f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(CaptionServerDown, match=f"127.0.0.1:{port}/v1/chat/completions gave no answer"):
        c.caption_many(images(2), ["h5", "h6"])


def test_no_endpoint_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LENS_FAST_CAPTION_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="caption.base_url is not set: pass --caption-url"):
        Captioner(CaptionConfig(model="m"), str(tmp_path))


def test_toy_captioner_behind_the_server(tmp_path):
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng) for _ in range(4)]
    scenes = [s for s in scenes if s.background != "white"][:2]
    with LocalChatServer("lens_fast.curate.toy_models:caption_handler", model="toy-vlm") as s:
        c = captioner(tmp_path, s.url)
        ims = [render_scene(sc, 48, 48) for sc in scenes]
        got = c.caption_many(ims, [image_sha256(i) for i in ims])
    from dataclasses import replace

    want = [dense_caption(replace(sc, relation=None, objects=tuple(sorted(sc.objects, key=lambda o: (o.row, o.col)))))
            for sc in scenes]
    assert got == want
