"""LensPipeline / LensTransformer2DModel as diffusers' Lens classes: the constructor with
diffusers' component classes, components, save/load round trips (variant, shards, dtype
dicts, low_cpu_mem_usage), Hub ids served offline from a local cache, the scheduler's
config honoured, output types and indexable outputs, call defaults, to(), refusals."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

from lens_fast import LensPipeline, LensTransformer2DModel, LensVAE
from lens_fast.errors import InvalidValue, MissingFile
from lens_fast.sampling import lens_sigmas
from lens_fast.text_encoder import LensTextEncoder
from lens_fast.tiny import SCHEDULER, make_tiny_checkpoint

KW = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "lens_tiny"), seed=2)


@pytest.fixture(scope="module")
def pipe(ckpt):
    p = LensPipeline.from_pretrained(ckpt, template_date="2026-01-01")
    p.set_progress_bar_config(disable=True)
    return p


def _latents(p, prompt="a red circle", seed=0, **kw):
    return p(prompt, generator=torch.Generator().manual_seed(seed), output_type="latent", **{**KW, **kw}).images


def test_diffusers_constructor_with_diffusers_and_lens_fast_components(pipe):
    comps = pipe.components
    assert set(comps) == {"scheduler", "vae", "text_encoder", "tokenizer", "transformer"}
    assert isinstance(comps["vae"], AutoencoderKLFlux2) and isinstance(comps["scheduler"], FlowMatchEulerDiscreteScheduler)
    assert isinstance(comps["text_encoder"], torch.nn.Module) and isinstance(comps["transformer"], LensTransformer2DModel)
    ref = _latents(pipe)
    # diffusers' constructor, diffusers' own component objects (raw VAE, causal LM + tokenizer)
    rebuilt = LensPipeline(**comps)
    rebuilt.prompt_encoder.template_date = "2026-01-01"
    rebuilt.set_progress_bar_config(disable=True)
    assert torch.equal(_latents(rebuilt), ref)
    # positional, in diffusers' order
    positional = LensPipeline(comps["scheduler"], comps["vae"], comps["text_encoder"], comps["tokenizer"],
                              comps["transformer"])
    assert positional.transformer is comps["transformer"] and positional.vae is comps["vae"]
    # lens_fast's wrappers: LensVAE and LensTextEncoder (which brings its tokenizer)
    encoder = LensTextEncoder(comps["text_encoder"], comps["tokenizer"],
                              comps["transformer"].config.selected_layer_index, template_date="2026-01-01")
    ours = LensPipeline(scheduler=comps["scheduler"], vae=LensVAE(comps["vae"]), text_encoder=encoder,
                        transformer=comps["transformer"])
    ours.set_progress_bar_config(disable=True)
    assert ours.vae is comps["vae"] and ours.tokenizer is comps["tokenizer"] and ours.prompt_encoder is encoder
    assert torch.equal(_latents(ours), ref)
    # only the text encoder and tokenizer (diffusers' encode_prompt-in-isolation set-up)
    text_only = LensPipeline(text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"])
    text_only.prompt_encoder.template_date = "2026-01-01"
    feats, mask, _, _ = text_only.encode_prompt("a red circle")
    assert len(feats) == 1 and feats[0].shape[:2] == mask.shape
    with pytest.raises(ValueError, match="transformer"):
        text_only("a red circle", **KW)
    with pytest.raises(InvalidValue, match="expected diffusers' AutoencoderKLFlux2"):
        LensPipeline(vae=object(), transformer=comps["transformer"])


def test_outputs_index_like_diffusers_and_pt_is_the_raw_decode(pipe):
    out = pipe("a cat", generator=torch.Generator().manual_seed(1), output_type="pt", **KW)
    assert out[0] is out.images and out["images"] is out.images and out.to_tuple()[0] is out.images
    again = pipe("a cat", generator=torch.Generator().manual_seed(1), output_type="pt", return_dict=False, **KW)
    assert isinstance(again, tuple) and torch.equal(again[0], out.images)
    lat = _latents(pipe, "a cat", seed=1)
    raw = pipe.latent_codec.decode(lat, 32, 32)
    torch.testing.assert_close(out.images, raw, rtol=0, atol=1e-6)  # no clamp, no [0, 1] rescale
    t = pipe.transformer
    x = torch.randn(1, 4, t.config.in_channels)
    feats = [torch.randn(1, 3, t.config.enc_hidden_dim) for _ in range(t.num_text_layers)]
    res = t(hidden_states=x, encoder_hidden_states=feats, timestep=torch.tensor([0.5]), img_shapes=[(1, 2, 2)])
    assert res[0] is res.sample


class _Stop(Exception):
    pass


def _stop_at_first_step(pipe, i, t, kw):
    raise _Stop


def _call_settings(p):
    """(steps, guidance) a call without them runs with: one step, then stopped."""
    with pytest.raises(_Stop):
        p("a cat", height=16, width=16, output_type="latent", callback_on_step_end=_stop_at_first_step)
    return p.num_timesteps, p.guidance_scale


def test_call_defaults_are_diffusers_and_recommended_is_one_call_away(ckpt):
    p = LensPipeline.from_pretrained(ckpt, lens_variant="lens-turbo")
    p.set_progress_bar_config(disable=True)
    assert _call_settings(p) == (50, 4.0)  # diffusers' LensPipeline defaults
    assert _call_settings(p.use_recommended_defaults()) == (4, 1.0) == p.recommended
    assert _call_settings(LensPipeline.from_pretrained(ckpt, lens_defaults=True)) == (20, 5.0)


def test_scheduler_config_is_honoured_as_set_timesteps_sigmas_mu(pipe):
    comps = pipe.components
    n, tokens = 4, 4
    # the official Lens config: exponential shift around the empirical mu
    sig, ts = pipe.schedule(n, tokens)
    torch.testing.assert_close(sig, lens_sigmas(n, tokens)[0], rtol=0, atol=1e-6)
    plain = LensPipeline(**{**comps, "scheduler": FlowMatchEulerDiscreteScheduler()})  # shift 1, no dynamic shift
    sig_plain, ts_plain = plain.schedule(n, tokens)
    expected = torch.tensor(list(np.linspace(1.0, 1.0 / n, n)) + [0.0], dtype=torch.float32)
    torch.testing.assert_close(sig_plain, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ts_plain, expected[:-1] * 1000, rtol=0, atol=1e-3)
    shifted = LensPipeline(**{**comps, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)})
    s = torch.tensor(np.linspace(1.0, 1.0 / n, n), dtype=torch.float64)
    torch.testing.assert_close(shifted.schedule(n, tokens)[0][:-1], (3 * s / (1 + 2 * s)).float(), rtol=0, atol=1e-6)
    # the images follow the schedule: each config its own latents, the same config the same
    plain.prompt_encoder.template_date = "2026-01-01"
    plain.set_progress_bar_config(disable=True)
    a, b = _latents(pipe), _latents(plain)
    assert (a - b).abs().max() > 1e-3
    # a scheduler config dict works like the scheduler built from it
    from_dict = LensPipeline(**{**comps, "scheduler": dict(FlowMatchEulerDiscreteScheduler().config)})
    from_dict.prompt_encoder.template_date = "2026-01-01"
    from_dict.set_progress_bar_config(disable=True)
    assert torch.equal(_latents(from_dict), b)


def test_fast_path_uses_the_scheduler_and_refuses_what_it_cannot_serve(ckpt):
    comps = LensPipeline.from_pretrained(ckpt).components  # its own transformer: the fast path fuses projections
    plain = LensPipeline(**{**comps, "scheduler": FlowMatchEulerDiscreteScheduler()})
    plain.prompt_encoder.template_date = "2026-01-01"
    plain.set_progress_bar_config(disable=True)
    eager = _latents(plain)
    plain.enable_fast_path(compile=False, cuda_graphs=False)
    try:
        torch.testing.assert_close(_latents(plain), eager, rtol=1e-4, atol=1e-5)
        plain.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
        with pytest.raises(InvalidValue, match="reference path"):
            _latents(plain)
    finally:
        plain.disable_fast_path()
    from diffusers.models.attention_processor import AttnProcessor2_0

    t = comps["transformer"]
    saved = t.attn_processors
    t.set_attn_processor(AttnProcessor2_0())
    try:
        with pytest.raises(InvalidValue, match="attention processor"):
            plain.enable_fast_path(compile=False, cuda_graphs=False)
    finally:
        t.set_attn_processor(saved)


def test_save_load_round_trip_variant_and_dtype_dict(pipe, tmp_path):
    ref = _latents(pipe)
    out = tmp_path / "saved"
    pipe.save_pretrained(out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "LensTransformer2DModel"] and index["vae"][1] == "AutoencoderKLFlux2"
    back = LensPipeline.from_pretrained(out, template_date="2026-01-01")
    back.set_progress_bar_config(disable=True)
    assert torch.equal(_latents(back), ref)
    with pytest.raises(FileExistsError):
        pipe.save_pretrained(out)  # never overwrites a checkpoint unasked
    fp16 = tmp_path / "fp16"
    pipe.save_pretrained(fp16, variant="fp16", max_shard_size="20KB")
    assert any(n.endswith(".fp16.safetensors") or ".fp16" in n for n in os.listdir(fp16 / "transformer"))
    assert len([n for n in os.listdir(fp16 / "transformer") if n.endswith(".safetensors")]) > 1  # sharded
    with pytest.raises(OSError):
        LensPipeline.from_pretrained(fp16)  # no default-variant files there
    mixed = LensPipeline.from_pretrained(fp16, variant="fp16", low_cpu_mem_usage=True, template_date="2026-01-01",
                                         torch_dtype={"transformer": torch.bfloat16, "default": torch.float32})
    assert mixed.transformer.dtype == torch.bfloat16 and mixed.vae.dtype == torch.float32
    assert mixed.text_encoder.dtype == torch.float32
    for a, b in zip(mixed.transformer.state_dict().values(), pipe.transformer.state_dict().values()):
        assert torch.equal(a, b.to(torch.bfloat16))
    with pytest.raises(InvalidValue, match="torch_dtype has key"):
        LensPipeline.from_pretrained(out, torch_dtype={"unet": torch.float16})


def test_hub_ids_load_offline_from_the_local_cache(ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    commit = "0" * 40
    repo = cache / "models--microsoft--Lens-Tiny"
    shutil.copytree(ckpt, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = LensPipeline.from_pretrained("microsoft/Lens-Tiny", cache_dir=str(cache), template_date="2026-01-01")
    assert p.transformer.config.num_layers == LensTransformer2DModel.from_pretrained(ckpt, subfolder="transformer")\
        .config.num_layers
    t = LensTransformer2DModel.from_pretrained("microsoft/Lens-Tiny", subfolder="transformer", cache_dir=str(cache))
    for a, b in zip(t.state_dict().values(), p.transformer.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(MissingFile, match="offline"):
        LensPipeline.from_pretrained("microsoft/Not-Cached", cache_dir=str(cache))


def test_to_moves_every_component_and_tolerates_absent_ones(ckpt):
    p = LensPipeline.from_pretrained(ckpt)
    p.to(torch.bfloat16)
    assert {p.transformer.dtype, p.vae.dtype, p.text_encoder.dtype} == {torch.bfloat16}
    bare = LensPipeline(scheduler=SCHEDULER, vae=p.vae, transformer=p.transformer)  # no text encoder / tokenizer
    assert bare.text_encoder is None and bare.tokenizer is None
    bare.to("cpu", torch.float32)
    assert bare.transformer.dtype == torch.float32 and bare.vae.dtype == torch.float32
    with pytest.raises(ValueError, match="pass prompt_embeds"):
        bare("a cat", **KW)


def test_transformer_save_variant_shards_and_low_cpu_mem_usage(tmp_path):
    from lens_fast.tiny import make_tiny_transformer

    model = make_tiny_transformer(seed=3)
    model.save_pretrained(tmp_path, variant="fp16", max_shard_size="10KB")
    names = os.listdir(tmp_path)
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    back = LensTransformer2DModel.from_pretrained(tmp_path, variant="fp16", low_cpu_mem_usage=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    with pytest.raises(OSError):
        LensTransformer2DModel.from_pretrained(tmp_path)  # only the fp16 variant is there
    back.enable_gradient_checkpointing()
    assert back.is_gradient_checkpointing and back.gradient_checkpointing
    back.register_to_config(mask_every_block=True)
    assert back.mask_every_block is True


def test_attention_processors_in_diffusers_convention_run_on_the_eager_path():
    from lens_fast.models.processors import LensAttnProcessor
    from lens_fast.tiny import make_tiny_transformer

    model = make_tiny_transformer(seed=4)
    x = torch.randn(1, 4, model.config.in_channels, generator=torch.Generator().manual_seed(0))
    feats = [torch.randn(1, 3, model.config.enc_hidden_dim) for _ in range(model.num_text_layers)]
    mask = torch.tensor([[True, True, False]])
    kw = dict(hidden_states=x, encoder_hidden_states=feats, encoder_hidden_states_mask=mask,
              timestep=torch.tensor([0.5]), img_shapes=[(1, 2, 2)], return_dict=False)
    ref = model(**kw)[0]
    calls = []

    class Recording:  # a processor written for diffusers' Lens: (attn, img, txt, image_rotary_emb, attention_mask)
        def __call__(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb=None, attention_mask=None):
            calls.append(attention_mask is not None)
            return LensAttnProcessor()(attn, hidden_states, encoder_hidden_states, image_rotary_emb, attention_mask)

    model.set_attn_processor(Recording())
    torch.testing.assert_close(model(**kw)[0], ref, rtol=1e-5, atol=1e-6)
    assert len(calls) == model.config.num_layers and calls[0]
    model.set_attn_processor(LensAttnProcessor())
    assert torch.equal(model(**kw)[0], ref)
