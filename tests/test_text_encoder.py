"""Tests for lens_fast.text_encoder (Lens prompt rendering, tokenisation, GPT-OSS layer
features, offset, cache, loading) on the tiny offline fixtures of lens_fast.testing."""
import os
from datetime import datetime, timedelta

import pytest
import torch
from safetensors.torch import save_file

from lens_fast.testing import (TINY_HARMONY_CHAT_TEMPLATE, TINY_TEMPLATE_PREFIX_TOKENS, build_tiny_tokenizer,
                               make_tiny_gpt_oss, make_tiny_text_encoder_checkpoint)
from lens_fast.text_encoder import (CHAT_SYSTEM, CHAT_THINKING, DEFAULT_TXT_OFFSET, TEMPLATE_DATE_ENV,
                                    LensTextEncoder, set_template_date, validate_template_date)

DATE = "2025-08-05"
NUM_LAYERS = 6
HIDDEN = 40
LAYERS = [1, 3, 4]
PROMPTS = ["a red cube on the left of a blue sphere", "two cats", "a small green tree next to a tall white house "
           "under the dark sky with one bright yellow star"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lens_te")
    model = make_tiny_text_encoder_checkpoint(folder, num_layers=NUM_LAYERS, hidden=HIDDEN, seed=0)
    return folder, model


@pytest.fixture(scope="module")
def loaded(ckpt):
    return LensTextEncoder.from_pretrained(ckpt[0], LAYERS, torch_dtype=torch.float32, template_date=DATE)


@pytest.fixture()
def enc(loaded, monkeypatch):
    """A fresh encoder per test (tests change its attributes) over the loaded model."""
    monkeypatch.delenv(TEMPLATE_DATE_ENV, raising=False)
    return LensTextEncoder(loaded.model, loaded.tokenizer, LAYERS, template_date=DATE)


def expected_harmony(prompt, date):
    return ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            "Knowledge cutoff: 2024-06\nCurrent date: " + date + "\n\nReasoning: medium\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
            "<|start|>developer<|message|># Instructions\n\n" + CHAT_SYSTEM + "\n\n<|end|>"
            "<|start|>user<|message|>" + prompt + "<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>" + CHAT_THINKING + "<|end|>"
            "<|start|>assistant<|channel|>final<|message|>")


def count_layer_calls(encoder):
    calls = [0] * len(encoder._layers)
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(encoder._layers)]
    return calls, handles


# -- rendering and the fixture tokenizer -------------------------------------------------

def test_render_equals_official_harmony_text(enc):
    prompt = "a red cube on the left of a blue sphere"
    assert enc.render(prompt) == expected_harmony(prompt, DATE)
    assert enc.render(prompt, template_date="2030-01-31") == expected_harmony(prompt, "2030-01-31")


def test_template_prefix_is_97_tokens_for_any_date(enc):
    assert DEFAULT_TXT_OFFSET == TINY_TEMPLATE_PREFIX_TOKENS == 97
    tok = enc.tokenizer
    a, b = (tok(enc.render(p))["input_ids"] for p in ("red cube", "blue dog"))
    assert a[:97] == b[:97]
    assert a[96] == tok.convert_tokens_to_ids("<|message|>")
    assert a[97] == tok.convert_tokens_to_ids("red") and b[97] == tok.convert_tokens_to_ids("blue")
    other = enc.render("red cube", template_date="1999-12-31")
    assert other != enc.render("red cube") and "Current date: 1999-12-31" in other
    ids_other = tok(other)["input_ids"]
    assert len(ids_other) == len(a) and ids_other[97:] == a[97:] and ids_other[:97] != a[:97]
    assert tok.unk_token_id not in a
    assert tok.decode(a) == enc.render("red cube")  # the fixture tokenizer is lossless on the template


def test_date_from_env_explicit_and_invalid(ckpt, monkeypatch):
    folder, _ = ckpt
    monkeypatch.setenv(TEMPLATE_DATE_ENV, "2024-02-29")
    e = LensTextEncoder.from_pretrained(folder, LAYERS)
    assert e.template_date == "2024-02-29" and "Current date: 2024-02-29\n" in e.render("cat")
    e2 = LensTextEncoder(e.model, e.tokenizer, LAYERS, template_date="2020-06-01")
    assert "Current date: 2020-06-01\n" in e2.render("cat")
    for bad in ("2025-13-01", "05/08/2025", "2023-02-29", 20250805):
        with pytest.raises(ValueError, match="template_date=" + repr(bad).replace("/", ".")):
            LensTextEncoder(e.model, e.tokenizer, LAYERS, template_date=bad)
    with pytest.raises(ValueError, match="template_date='2025-02-30'"):
        e2.template_date = "2025-02-30"
    monkeypatch.setenv(TEMPLATE_DATE_ENV, "tomorrow")
    with pytest.raises(ValueError, match=f"{TEMPLATE_DATE_ENV}='tomorrow'"):
        LensTextEncoder(e.model, e.tokenizer, LAYERS)
    monkeypatch.delenv(TEMPLATE_DATE_ENV)
    e3 = LensTextEncoder(e.model, e.tokenizer, LAYERS)
    assert e3.template_date is None
    days = {d.strftime("%Y-%m-%d") for d in (datetime.now(), datetime.now() + timedelta(minutes=1))}
    assert any(f"Current date: {d}\n" in e3.render("cat") for d in days)  # unfixed: the template's clock


def test_fixed_date_makes_features_reproducible(enc):
    f1, m1 = enc.encode(PROMPTS[:2])
    f2, m2 = enc.encode(PROMPTS[:2])
    assert all(torch.equal(a, b) for a, b in zip(f1, f2)) and torch.equal(m1, m2)
    enc.template_date = "1990-01-01"
    f3, m3 = enc.encode(PROMPTS[:2])
    assert torch.equal(m1, m3) and f1[0].shape == f3[0].shape
    assert not torch.allclose(f1[-1][m1], f3[-1][m3], atol=1e-4)  # the date reaches the prompt tokens


def test_date_helpers_and_template_without_date_line(ckpt, monkeypatch, caplog):
    text, found = set_template_date("x\nCurrent date: 2001-01-01\nCurrent date: 2002-02-02", "2025-08-05")
    assert found and text == "x\nCurrent date: 2025-08-05\nCurrent date: 2002-02-02"
    assert set_template_date("no stamp here", DATE) == ("no stamp here", False)
    assert validate_template_date(datetime(2021, 3, 4).date()) == "2021-03-04"
    tok = build_tiny_tokenizer()
    tok.chat_template = TINY_HARMONY_CHAT_TEMPLATE.replace(
        "{{- 'Current date: ' + strftime_now('%Y-%m-%d') + '\\n\\n' -}}", "")
    model = ckpt[1]
    with pytest.raises(ValueError, match="template_date='2025-08-05' was requested"):
        LensTextEncoder(model, tok, LAYERS, template_date=DATE).render("cat")
    monkeypatch.setenv(TEMPLATE_DATE_ENV, DATE)
    e = LensTextEncoder(model, tok, LAYERS)
    with caplog.at_level("WARNING", logger="lens_fast.text_encoder"):
        text = e.render("cat")
    assert "Current date" not in text and text.endswith("final<|message|>")
    assert TEMPLATE_DATE_ENV in caplog.text


# -- layer features and early exit ---------------------------------------------------------

def test_selected_layers_equal_full_model_hidden_states(enc, ckpt):
    model = ckpt[1]
    ids, attn = enc.tokenize(PROMPTS)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
    assert len(hs) == NUM_LAYERS + 1
    enc.selected_layer_index = [4, 0, 2]  # any order, returned in that order
    got = enc.forward_layers(ids, attn)
    for i, g in zip([4, 0, 2], got):
        torch.testing.assert_close(g, hs[i + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1])
    enc.selected_layer_index = [NUM_LAYERS - 1]  # the last layer: its output is before the final norm
    (last,) = enc.forward_layers(ids, attn)
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(last), hs[-1], rtol=1e-5, atol=1e-5)


def test_forward_stops_after_last_selected_layer(enc):
    calls, handles = count_layer_calls(enc)
    norm_calls = []
    handles.append(enc.model.model.norm.register_forward_pre_hook(lambda m, a: norm_calls.append(1)))
    handles.append(enc.model.lm_head.register_forward_pre_hook(lambda m, a: norm_calls.append(1)))
    try:
        feats, mask = enc.encode(PROMPTS)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1, 1, 1, 1, 1, 0] and norm_calls == []
    assert len(feats) == 3 and all(f.shape == (3, mask.shape[1], HIDDEN) for f in feats)
    assert all(len(layer._forward_hooks) == 0 for layer in enc._layers)  # no hook left behind


def test_broken_later_layer_is_never_reached(ckpt):
    e = LensTextEncoder.from_pretrained(ckpt[0], [0, 2], template_date=DATE)  # its own model: layer 3 is broken
    ref, ref_mask = e.encode(PROMPTS)

    def boom(*args, **kwargs):
        raise AssertionError("layer 3 must not run")

    e._layers[3].forward = boom
    got, mask = e.encode(PROMPTS)
    assert torch.equal(mask, ref_mask) and all(torch.equal(a, b) for a, b in zip(got, ref))
    e.selected_layer_index = [3]
    with pytest.raises(AssertionError, match="layer 3 must not run"):
        e.encode(PROMPTS)
    assert len(e._layers[3]._forward_hooks) == 0  # hooks are removed when the model raises


# -- tokenisation, padding, truncation, offset ---------------------------------------------

def test_right_padding_truncation_and_mask_shapes(enc):
    tok = enc.tokenizer
    lengths = [len(tok(enc.render(p))["input_ids"]) for p in PROMPTS]
    ids, attn = enc.tokenize(PROMPTS)
    assert ids.shape == attn.shape == (3, max(lengths)) and attn.dtype == torch.long
    for row, (n, a) in enumerate(zip(lengths, attn)):
        assert a[:n].all() and not a[n:].any()
        assert (ids[row, n:] == tok.pad_token_id).all()
    feats, mask = enc.encode(PROMPTS)
    assert mask.dtype == torch.bool and mask.shape == (3, max(lengths) - 97)
    assert mask.sum(1).tolist() == [n - 97 for n in lengths]
    # truncation at max_sequence_length keeps the first tokens of the longest prompt
    long_prompt = " ".join(["red cat"] * 300)
    n_dog = len(tok(enc.render("dog"))["input_ids"])
    ids, attn = enc.tokenize([long_prompt, "dog"], max_sequence_length=150)
    assert ids.shape == (2, 150) and attn[0].all() and int(attn[1].sum()) == n_dog < 150
    full = tok(enc.render(long_prompt))["input_ids"]
    assert len(full) > 512 and ids[0].tolist() == full[:150]
    feats, mask = enc.encode([long_prompt, "dog"], max_sequence_length=150)
    assert mask.shape == (2, 53) and mask[0].all() and feats[0].shape == (2, 53, HIDDEN)
    assert int(mask[1].sum()) == n_dog - 97
    _, mask = enc.encode([long_prompt])
    assert mask.shape == (1, 512 - 97)  # the default max_sequence_length is 512


def test_offset_dropping_including_short_case(enc):
    n = len(enc.tokenizer(enc.render("two cats"))["input_ids"])
    calls, handles = count_layer_calls(enc)
    try:
        feats, mask = enc.encode(["two cats", "a dog"], max_sequence_length=97)
        assert calls == [0] * NUM_LAYERS  # nothing left after the prefix: the model is not run
    finally:
        for h in handles:
            h.remove()
    assert mask.shape == (2, 0) and mask.dtype == torch.bool
    assert [f.shape for f in feats] == [(2, 0, HIDDEN)] * 3
    feats, mask = enc.encode(["two cats"], max_sequence_length=98)
    assert mask.shape == (1, 1) and mask.all() and feats[0].shape == (1, 1, HIDDEN)
    ids, attn = enc.tokenize(["two cats"])
    full = enc.forward_layers(ids, attn)
    enc.txt_offset = 0
    feats0, mask0 = enc.encode(["two cats"])
    assert mask0.shape == (1, n) and torch.equal(feats0[1], full[1])
    enc.txt_offset = 97
    feats, _ = enc.encode(["two cats"])
    assert torch.equal(feats[1], full[1][:, 97:])
    with pytest.raises(ValueError, match="max_sequence_length=0"):
        enc.encode(["two cats"], max_sequence_length=0)
    with pytest.raises(ValueError, match="prompts is empty"):
        enc.encode([])


def test_batch_equals_each_prompt_alone(enc):
    feats, mask = enc.encode(PROMPTS)
    assert len(set(mask.sum(1).tolist())) == 3  # three different lengths
    for b, p in enumerate(PROMPTS):
        alone, m = enc.encode([p])
        n = int(m.sum())
        assert m.shape[1] == n and int(mask[b].sum()) == n
        for fb, fa in zip(feats, alone):
            torch.testing.assert_close(fb[b, :n], fa[0], rtol=1e-5, atol=1e-5)


def test_device_and_dtype_arguments(enc, ckpt):
    feats, mask = enc.encode(PROMPTS[:2], device="cpu", dtype=torch.bfloat16)
    assert all(f.dtype == torch.bfloat16 and f.device.type == "cpu" for f in feats)
    e16 = LensTextEncoder.from_pretrained(ckpt[0], LAYERS, torch_dtype="bfloat16", template_date=DATE)
    assert e16.dtype == torch.bfloat16
    ref, _ = enc.encode(PROMPTS[:2])
    got, _ = e16.encode(PROMPTS[:2])
    assert got[0].dtype == torch.bfloat16
    # bf16 flips a few MoE routing choices, so compare the first selected layer by relative norm
    err = (got[0].float() - ref[0])[mask].norm() / ref[0][mask].norm()
    assert 0 < err < 0.15


# -- loading -----------------------------------------------------------------------------

def test_missing_folders_and_files_are_named(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        LensTextEncoder.from_pretrained(tmp_path / "does_not_exist", LAYERS)
    with pytest.raises(FileNotFoundError, match=r"text_encoder is missing"):
        LensTextEncoder.from_pretrained(tmp_path, LAYERS)
    os.makedirs(tmp_path / "text_encoder")
    os.makedirs(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        LensTextEncoder.from_pretrained(tmp_path, LAYERS)
    (tmp_path / "text_encoder" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"text_encoder \(the text encoder\) holds no weights"):
        LensTextEncoder.from_pretrained(tmp_path, LAYERS)
    (tmp_path / "text_encoder" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"corrupt safetensors file .*model.safetensors: .*header too small"):
        LensTextEncoder.from_pretrained(tmp_path, LAYERS)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "text_encoder" / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"tokenizer holds neither tokenizer.json"):
        LensTextEncoder.from_pretrained(tmp_path, LAYERS)
    with pytest.raises(ValueError, match=r"\[6, 7\] outside \[0, 5\]"):
        LensTextEncoder.from_pretrained(ckpt[0], [2, 6, 7])
    model, tok = ckpt[1], build_tiny_tokenizer()
    for bad in ([], ["1"], [1.5], None):
        with pytest.raises(ValueError, match="selected_layer_index="):
            LensTextEncoder(model, tok, bad)
    assert LensTextEncoder(model, tok, torch.tensor([3, 1])).selected_layer_index == [3, 1]
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        LensTextEncoder(model, tok, [1])


def test_mxfp4_checkpoint_is_dequantised_on_cpu(tmp_path):
    model = make_tiny_text_encoder_checkpoint(tmp_path, num_layers=2, hidden=64, seed=1, mxfp4=True)
    cfg = (tmp_path / "text_encoder" / "config.json").read_text()
    assert '"quant_method": "mxfp4"' in cfg
    e = LensTextEncoder.from_pretrained(tmp_path, [0, 1], template_date=DATE)
    assert e.dtype == torch.bfloat16
    for a, b in zip(e.model.model.layers, model.model.layers):
        assert torch.equal(a.mlp.experts.gate_up_proj.float(), b.mlp.experts.gate_up_proj)
        assert torch.equal(a.mlp.experts.down_proj.float(), b.mlp.experts.down_proj)
    feats, mask = e.encode(["two cats"])
    assert feats[1].dtype == torch.bfloat16 and feats[1].shape == (1, mask.shape[1], 64)
    assert torch.isfinite(feats[1].float()).all()


def test_make_tiny_gpt_oss_validates(tmp_path):
    with pytest.raises(ValueError, match="hidden=40"):
        make_tiny_gpt_oss(tmp_path, hidden=40, mxfp4=True)


# -- cache ---------------------------------------------------------------------------------

def test_cache_hits_misses_and_lru(enc):
    plain = enc
    e = LensTextEncoder(plain.model, plain.tokenizer, LAYERS, template_date=DATE, cache_size=2)
    ref, ref_mask = plain.encode(PROMPTS[:2])
    feats, mask = e.encode(PROMPTS[:2])
    assert e.cache_info() == {"hits": 0, "misses": 2, "size": 2, "maxsize": 2}
    assert torch.equal(mask, ref_mask)
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f[mask], r[ref_mask], rtol=1e-5, atol=1e-5)
        assert (f[~mask] == 0).all()  # padded positions are zeros with the cache on
    calls, handles = count_layer_calls(e)
    try:
        again, mask2 = e.encode(list(reversed(PROMPTS[:2])))
        assert calls == [0] * NUM_LAYERS  # all hits: the model does not run
        assert e.cache_info()["hits"] == 2 and torch.equal(mask2, mask.flip(0))
        assert all(torch.equal(a, b.flip(0)) for a, b in zip(again, feats))
        e.encode([PROMPTS[0]], max_sequence_length=100)  # another max length is another key
        assert calls[0] == 1 and e.cache_info()["misses"] == 3
        # LRU: PROMPTS[1] was evicted (PROMPTS[0] used more recently), PROMPTS[0] still cached
        e.encode([PROMPTS[0]])
        assert calls[0] == 1 and e.cache_info()["hits"] == 3
        e.encode([PROMPTS[1]])
        assert calls[0] == 2 and e.cache_info()["misses"] == 4
        e.template_date = "2001-01-01"  # another date is another key
        e.encode([PROMPTS[1]])
        assert calls[0] == 3
    finally:
        for h in handles:
            h.remove()
    e.clear_cache()
    assert e.cache_info() == {"hits": 0, "misses": 0, "size": 0, "maxsize": 2}
    with pytest.raises(ValueError, match="cache_size=-1"):
        LensTextEncoder(plain.model, plain.tokenizer, LAYERS, cache_size=-1)


def test_cache_batch_larger_than_cache_and_duplicates(enc):
    e = LensTextEncoder(enc.model, enc.tokenizer, LAYERS, template_date=DATE, cache_size=1, cache_device="cpu")
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    feats, mask = e.encode(prompts)
    ref, ref_mask = enc.encode(prompts)
    assert torch.equal(mask, ref_mask) and e.cache_info()["size"] == 1
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f[mask], r[ref_mask], rtol=1e-5, atol=1e-5)
