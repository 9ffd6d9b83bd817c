"""``lens-fast generate --reason local|api`` end to end (a real local chat server for api),
the record in the saved images, and bad input: one line, exit 2, before any model loads."""
import socket

import pytest

from lens_fast.chat_server import LocalChatServer
from lens_fast.cli import main
from lens_fast.image_metadata import read_image_metadata
from lens_fast.tiny import make_tiny_checkpoint

ENV = "LENS_FAST_REASONER"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("cli") / "Lens-Turbo"), seed=2)


@pytest.fixture(scope="module")
def server():
    with LocalChatServer("lens_fast.toy.reasoner_llm:answer", model="toy-llm", api_key="k3y") as s:
        yield s


@pytest.fixture()
def endpoint(server, monkeypatch):
    monkeypatch.setenv(f"{ENV}_BASE_URL", server.url)
    monkeypatch.setenv(f"{ENV}_MODEL", "toy-llm")
    monkeypatch.setenv(f"{ENV}_API_KEY", "k3y")
    return server


def generate(ckpt, out, *extra):
    return main(["generate", "--model", ckpt, "--prompt", "a red circle", "--height", "32", "--width", "32",
                 "--steps", "1", "--dtype", "float32", "--quiet", "--template-date", "2026-01-01", "--seed", "5",
                 "--out", str(out), *extra])


def test_generate_reason_api_records_everything_in_the_png(ckpt, endpoint, tmp_path):
    rules = tmp_path / "rules.txt"
    rules.write_text("Rules:\n- Say where each object is.\n- Give each object a size.\n")
    out = tmp_path / "img.png"
    assert generate(ckpt, out, "--reason", "api", "--system-prompt", str(rules),
                    "--reason-cache", str(tmp_path / "cache")) == 0
    meta = read_image_metadata(str(out))
    assert meta["prompt"] == "a red circle" and meta["seed"] == 5
    assert meta["rewritten_prompt"] != "a red circle" and "red circle" in meta["rewritten_prompt"]
    assert meta["rewritten_prompt"].split()[0] in ("top", "middle", "bottom", "centre")  # the toy LLM placed it
    settings = meta["settings"]
    assert (settings["steps"], settings["guidance"], settings["width"], settings["height"]) == (1, 1.0, 32, 32)
    assert settings["model"] == ckpt and settings["template_date"] == "2026-01-01"
    assert settings["reasoner"]["backend"] == "api" and settings["reasoner"]["model"] == "toy-llm"
    assert endpoint.stats()["bodies"][-1]["messages"][0]["content"] == rules.read_text().strip()
    before = endpoint.stats()["requests"]
    assert generate(ckpt, tmp_path / "again.png", "--reason", "api", "--system-prompt", str(rules),
                    "--reason-cache", str(tmp_path / "cache")) == 0
    assert endpoint.stats()["requests"] == before  # the rewrite came from the cache
    assert read_image_metadata(str(tmp_path / "again.png"))["rewritten_prompt"] == meta["rewritten_prompt"]


def test_generate_reason_local_falls_back_and_says_so(ckpt, tmp_path):
    out = tmp_path / "img.png"
    assert generate(ckpt, out, "--reason", "local", "--reason-max-tokens", "16") == 0  # random weights: no answer
    meta = read_image_metadata(str(out))
    assert "rewritten_prompt" not in meta and "final channel" in meta["reasoner_note"]
    assert meta["settings"]["reasoner"]["backend"] == "local"
    assert meta["settings"]["reasoner"]["settings"]["max_new_tokens"] == 16
    assert generate(ckpt, tmp_path / "plain.png") == 0
    assert "reasoner" not in read_image_metadata(str(tmp_path / "plain.png"))["settings"]


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case, message", [
    ("unreachable", "cannot reach the chat endpoint http://127.0.0.1:"),
    ("no key", f"lack of a valid API key (HTTP 401): set {ENV}_API_KEY"),
    ("no url", f"set {ENV}_BASE_URL"),
    ("missing file", "does not exist; expected a text file"),
    ("empty file", "is empty; expected the reasoner's instructions"),
    ("prompt without reason", "--system-prompt is used only with --reason"),
])
def test_bad_reasoner_input_is_one_line_before_loading(server, tmp_path, monkeypatch, capsys, case, message):
    monkeypatch.setenv(f"{ENV}_BASE_URL", server.url)
    monkeypatch.setenv(f"{ENV}_MODEL", "toy-llm")
    monkeypatch.delenv(f"{ENV}_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    extra = ["--reason", "api"]
    if case == "unreachable":
        monkeypatch.setenv(f"{ENV}_BASE_URL", f"http://127.0.0.1:{_closed_port()}/v1")
    elif case == "no url":
        monkeypatch.delenv(f"{ENV}_BASE_URL")
    elif case == "missing file":
        extra = ["--reason", "local", "--system-prompt", str(tmp_path / "none.txt")]
    elif case == "empty file":
        (tmp_path / "empty.txt").write_text("\n")
        extra = ["--reason", "local", "--system-prompt", str(tmp_path / "empty.txt")]
    elif case == "prompt without reason":
        extra = ["--system-prompt", str(tmp_path / "none.txt")]
    # the model folder does not exist: the reasoner's check must fail first
    rc = main(["generate", "--model", str(tmp_path / "no-model"), "--prompt", "x", "--out", str(tmp_path / "o.png"),
               *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
