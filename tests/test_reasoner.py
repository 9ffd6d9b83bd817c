"""The reasoner: checks, fallback and cache; the local GPT-OSS backend on the tiny fixture
(the real generation path); the api backend against a real local server process; fitting
rewrites to the encoder; the pipeline with reason=True; image metadata round trips."""
import logging
import os

import pytest
import torch
from PIL import Image

from lens_fast.chat_api import ChatEndpoint
from lens_fast.chat_server import LocalChatServer
from lens_fast.image_metadata import read_image_metadata, save_image
from lens_fast.reasoner import (CallableBackend, Reasoner, RewriteError, build_reasoner, fit_to_encoder,
                                language_of, load_system_prompt, rejection_reason, rewrite_for_encoder)
from lens_fast.reasoner.api import ApiBackend
from lens_fast.reasoner.local import LocalGptOssBackend, parse_final_channel
from lens_fast.testing import make_tiny_text_encoder_checkpoint
from lens_fast.text_encoder import LensTextEncoder

DATE = "2026-01-01"


class Counting:
    """A backend that records its calls and answers with ``fn(system, user)``."""
    name, model = "counting", "m1"

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def chat(self, system, user):
        self.calls.append((system, user))
        return self.fn(system, user)


# -- checks ---------------------------------------------------------------------------------
def test_language_and_refusal_checks():
    assert language_of("a red fox") is None  # too short to tell: never refused on language
    assert language_of("Ein roter Fuchs steht mit dem Kopf im Schnee unter einem Baum") == "de"
    assert language_of("A red fox stands in the snow under a tree with its tail") == "en"
    assert language_of("雪の中の赤いキツネ") == "kana" and language_of("雪中的红狐狸") == "han"
    assert rejection_reason("a red fox", "A red fox in deep snow.") is None
    assert "empty" in rejection_reason("a red fox", "  ")
    assert "refused" in rejection_reason("a red fox", "I'm sorry, but I can't help with that.")
    assert "another language" in rejection_reason(
        "A red fox stands in the snow under a tree", "Ein roter Fuchs steht mit dem Kopf im Schnee unter einem Baum")
    assert "writing system" in rejection_reason("a red fox", "雪の中の赤いキツネ")
    assert rejection_reason("雪の中の赤いキツネ", "雪の中に赤いキツネが立っている、冬の朝の写真") is None
    # text to render, quoted in another script, does not change the answer's language
    assert rejection_reason("a shop sign", 'A shop sign reading "東京" above a door in the rain') is None


def test_system_prompt_file(tmp_path):
    text = load_system_prompt()
    for rule in ("one coherent scene", "Keep everything the user asked for", "several subjects",
                 "whole scene", "inferences explicit", "language of the user's request", "one paragraph",
                 "double quotes exactly"):
        assert rule in text, rule
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        load_system_prompt(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_system_prompt(str(tmp_path / "empty.txt"))


# -- Reasoner: fallback and cache -------------------------------------------------------------
@pytest.mark.parametrize("answer, reason", [
    (RewriteError("generation timed out after 1 s"), "timed out"), ("", "empty"),
    ("I cannot help with that request.", "refused"), ("雪の中の赤いキツネ", "writing system"), (None, "returned NoneType")])
def test_failures_fall_back_to_the_request_with_a_warning(answer, reason, caplog):
    def fn(system, user):
        if isinstance(answer, Exception):
            raise answer
        return answer

    backend = Counting(fn)
    reasoner = Reasoner(backend, "Rewrite.")
    with caplog.at_level(logging.WARNING, logger="lens_fast.reasoner.base"):
        out = reasoner.rewrite(["a red fox"])[0]
    assert (out.prompt, out.rewritten) == ("a red fox", False) and reason in out.reason
    assert "using the prompt as written" in caplog.text and reason in caplog.text
    reasoner.rewrite(["a red fox"])
    assert len(backend.calls) == 2  # a failure is never cached


def test_cache_keys_and_disk_cache(tmp_path):
    backend = Counting(lambda s, u: f"{u}, detailed ({s})")
    r1 = Reasoner(backend, "Rule A.", cache_dir=str(tmp_path / "c"))
    first = r1.rewrite(["a cat", "a dog", "a cat"])
    assert [w.prompt for w in first] == ["a cat, detailed (Rule A.)", "a dog, detailed (Rule A.)"] * 1 + \
        ["a cat, detailed (Rule A.)"]
    assert len(backend.calls) == 2 and not first[0].cached
    assert r1.rewrite(["a cat"])[0].cached and len(backend.calls) == 2  # memory
    r2 = Reasoner(backend, "Rule A.", cache_dir=str(tmp_path / "c"))  # a new process: the disk cache
    assert r2.rewrite(["a dog"])[0].cached and len(backend.calls) == 2
    Reasoner(backend, "Rule B.", cache_dir=str(tmp_path / "c")).rewrite(["a dog"])  # other system prompt
    other = Counting(backend.fn)
    other.model = "m2"
    Reasoner(other, "Rule A.", cache_dir=str(tmp_path / "c")).rewrite(["a dog"])  # other model
    assert len(backend.calls) == 3 and len(other.calls) == 1
    with pytest.raises(TypeError, match="chat"):
        Reasoner(object())


# -- local backend: the tiny GPT-OSS fixture ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_te(tmp_path_factory):
    folder = tmp_path_factory.mktemp("te")
    make_tiny_text_encoder_checkpoint(str(folder))
    return str(folder), LensTextEncoder.from_pretrained(str(folder), [0, 2, 4], template_date=DATE)


def test_local_generation_equals_transformers_generate(tiny_te):
    folder, enc = tiny_te
    backend = LocalGptOssBackend(enc, max_new_tokens=12)
    text = backend.render("Rewrite the request.", "a red cat")
    assert text.endswith("<|start|>user<|message|>a red cat<|end|><|start|>assistant")
    assert "Reasoning: low" in text and f"Current date: {DATE}" in text and "# Instructions" in text
    ids = enc.tokenizer(text, add_special_tokens=False)["input_ids"]
    ours = backend.generate_ids(ids)
    ref = enc.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             eos_token_id=sorted(backend._stop), pad_token_id=1)[0, len(ids):].tolist()
    assert ours == ref[:len(ours)] and len(ours) >= 1
    assert backend._lm_head is enc.model.lm_head.weight  # shared, nothing loaded


def test_local_bare_decoder_loads_only_the_lm_head(tiny_te):
    from transformers import AutoModel

    folder, enc = tiny_te
    decoder = AutoModel.from_pretrained(os.path.join(folder, "text_encoder"))
    bare = LensTextEncoder(decoder, enc.tokenizer, [0, 2, 4], template_date=DATE)
    backend = LocalGptOssBackend(bare, max_new_tokens=6)
    assert not hasattr(decoder, "lm_head")
    ids = enc.tokenizer(backend.render("s", "a cat"), add_special_tokens=False)["input_ids"]
    full = LocalGptOssBackend(enc, max_new_tokens=6).generate_ids(ids)
    assert backend.generate_ids(ids) == full
    torch.testing.assert_close(backend.lm_head(), enc.model.lm_head.weight, rtol=0, atol=0)
    assert backend.lm_head().data_ptr() != enc.model.lm_head.weight.data_ptr()


def test_local_sampling_is_seeded_and_garbage_falls_back(tiny_te, caplog):
    _, enc = tiny_te
    ids = enc.tokenizer(LocalGptOssBackend(enc).render("s", "a cat"), add_special_tokens=False)["input_ids"]
    a = LocalGptOssBackend(enc, max_new_tokens=10, temperature=1.0, seed=3).generate_ids(ids)
    b = LocalGptOssBackend(enc, max_new_tokens=10, temperature=1.0, seed=3).generate_ids(ids)
    c = LocalGptOssBackend(enc, max_new_tokens=10, temperature=1.0, seed=4).generate_ids(ids)
    assert a == b != c
    reasoner = build_reasoner("local", enc, system_prompt="Rewrite.", max_new_tokens=10)
    with caplog.at_level(logging.WARNING):
        out = reasoner.rewrite(["a red cat"])[0]  # random weights: no harmony final channel
    assert not out.rewritten and out.prompt == "a red cat" and "final channel" in out.reason
    slow = Reasoner(LocalGptOssBackend(enc, max_new_tokens=50, timeout_s=1e-6), "Rewrite.")
    assert "timed out" in slow.rewrite(["a cat"])[0].reason


def test_parse_final_channel():
    done = ("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>"
            "A red fox in snow.<|return|>")
    assert parse_final_channel(done) == "A red fox in snow."
    assert parse_final_channel("<|channel|>final <|constrain|>text<|message|>x y<|end|>") == "x y"
    with pytest.raises(RewriteError, match="no final channel"):
        parse_final_channel("<|channel|>analysis<|message|>only thinking<|end|>")
    with pytest.raises(RewriteError, match="cut before it ended"):
        parse_final_channel("<|channel|>final<|message|>A red fox in")


def test_fit_to_encoder_cuts_long_rewrites_with_a_warning(tiny_te, caplog):
    _, enc = tiny_te
    short = "a red cat"
    assert fit_to_encoder(enc, short, 512) == (short, None)
    long = " ".join(["a red cat on a blue table"] * 40)
    full = len(enc.tokenizer(enc.render(long))["input_ids"])
    cut, total = fit_to_encoder(enc, long, 160)
    assert total == full > 160 and long.startswith(cut) and len(cut) < len(long)
    assert len(enc.tokenizer(enc.render(cut))["input_ids"]) <= 160
    reasoner = Reasoner(CallableBackend(lambda s, u: long), "Rewrite.")
    with caplog.at_level(logging.WARNING, logger="lens_fast.reasoner.integration"):
        prompts, rewrites = rewrite_for_encoder(reasoner, enc, "a cat", 160)
    assert prompts == [cut] and rewrites[0].rewritten and "cut to fit max_sequence_length=160" in rewrites[0].reason
    assert f"is {full} tokens" in caplog.text and "takes 160" in caplog.text


# -- api backend: a real server process on loopback ---------------------------------------------
@pytest.fixture(scope="module")
def toy_server():
    with LocalChatServer("lens_fast.toy.reasoner_llm:answer", model="toy-llm") as s:
        yield s


def api(server, **kw):
    return ApiBackend(ChatEndpoint(server.url, "toy-llm", timeout_s=kw.pop("timeout_s", 5.0), max_retries=0,
                                   backoff_s=0.01), **kw)


def test_api_backend_rewrites_and_sends_the_system_prompt(toy_server):
    toy_server.reset()
    system = "Rules:\n- Say where each object is.\n- Give each a size and a colour.\n- End with the background."
    out = Reasoner(api(toy_server, max_tokens=300), system).rewrite(["a red circle"])[0]
    assert out.rewritten and "red circle" in out.prompt and out.prompt.endswith(("white", "black", "beige", "grey",
                                                                                  "blue"))
    body = toy_server.stats()["bodies"][-1]
    assert body["messages"] == [{"role": "system", "content": system}, {"role": "user", "content": "a red circle"}]
    assert body["max_tokens"] == 300 and "temperature" not in body  # only sent when set


@pytest.mark.parametrize("fault, reason", [({"delay_s": 1.0}, "timed out"), ({"content": ""}, "unusable answer"),
                                           ({"content": "Sorry, I can't do that."}, "refused"),
                                           ({"status": 503}, "HTTP 503")])
def test_api_failures_fall_back(toy_server, fault, reason):
    toy_server.reset()
    toy_server.add_faults(fault)
    out = Reasoner(api(toy_server, timeout_s=0.3), "- Say where.").rewrite(["a circle"])[0]
    assert not out.rewritten and out.prompt == "a circle" and reason in out.reason


def test_api_think_block_is_dropped(toy_server):
    toy_server.reset()
    toy_server.add_faults({"content": "<think>plan it</think>\nA circle at the top left, on plain white."})
    assert api(toy_server).chat("s", "a circle") == "A circle at the top left, on plain white."


# -- pipeline -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from lens_fast import LensPipeline
    from lens_fast.tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(str(tmp_path_factory.mktemp("pipe") / "Lens"), seed=1)
    pipe = LensPipeline.from_pretrained(folder, torch_dtype=torch.float32, template_date=DATE, reasoner="local")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_reason_rewrites_the_prompt_only(tiny_pipe):
    assert isinstance(tiny_pipe.reasoner.backend, LocalGptOssBackend)
    backend = Counting(lambda s, u: "a blue square on a red table")
    pipe = tiny_pipe
    saved, pipe.reasoner = pipe.reasoner, Reasoner(backend, "Rewrite.")
    try:
        kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0, output_type="np")
        out = pipe("a cat", negative_prompt="blurry", reason=True, generator=torch.Generator().manual_seed(0), **kw)
        assert backend.calls == [("Rewrite.", "a cat")]  # the negative prompt is never rewritten
        assert out.prompts == ["a blue square on a red table"] and out.rewrites[0].request == "a cat"
        direct = pipe("a blue square on a red table", negative_prompt="blurry",
                      generator=torch.Generator().manual_seed(0), **kw)
        assert direct.rewrites is None and direct.prompts == ["a blue square on a red table"]
        assert (out.images == direct.images).all()  # the rewrite is what was encoded
        pe, pm, _, _ = pipe.encode_prompt("a cat")
        pipe(prompt_embeds=pe, prompt_mask=pm, reason=True, **kw)  # embeddings skip the reasoner
        assert len(backend.calls) == 1
        pipe.reasoner = None
        with pytest.raises(ValueError, match="reason=True needs a reasoner"):
            pipe("a cat", reason=True, **kw)
    finally:
        pipe.reasoner = saved


# -- image metadata -------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp"])
def test_image_metadata_round_trip(tmp_path, ext):
    image = Image.new("RGB", (16, 8), (10, 200, 30))
    meta = {"prompt": "雪の中の赤いキツネ", "rewritten_prompt": "A red fox \"FOX\" in deep snow.", "seed": 7,
            "settings": {"steps": 4, "guidance": 1.0, "reasoner": {"backend": "api"}}, "negative_prompt": None}
    path = str(tmp_path / f"img{ext}")
    save_image(image, path, meta)
    assert read_image_metadata(path) == {k: v for k, v in meta.items() if v is not None}
    assert os.listdir(tmp_path) == [f"img{ext}"] and Image.open(path).size == (16, 8)
    if ext == ".png":
        assert Image.open(path).text["prompt"] == meta["prompt"] and Image.open(path).text["seed"] == "7"
    with pytest.raises(ValueError, match="cannot record metadata"):
        save_image(image, str(tmp_path / "x.bmp"), meta)
