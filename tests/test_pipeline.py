"""LensPipeline: conformance sampling, prompt -> image end to end, CFG rules, errors."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lens_fast import LensPipeline
from lens_fast.resolutions import RESOLUTION_BUCKETS, resolve_resolution
from lens_fast.sampling import cfg_combine, compute_empirical_mu, lens_sigmas
from lens_fast.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def conformance(conformance_dir):
    pipe = LensPipeline.from_pretrained(conformance_dir)
    pipe.set_progress_bar_config(disable=True)
    d = load_file(os.path.join(conformance_dir, "pipeline_case.safetensors"))
    with open(os.path.join(conformance_dir, "pipeline_case.json")) as f:
        meta = json.load(f)
    return pipe, d, meta


def _run_case(pipe, d, meta, steps, guidance, output_type):
    feats = [d[f"prompt_feat{i}"] for i in range(3)]
    return pipe(prompt_embeds=feats, prompt_mask=torch.ones(1, feats[0].shape[1], dtype=torch.bool),
                negative_prompt=meta["negative_prompt"], height=meta["height"], width=meta["width"],
                num_inference_steps=steps, guidance_scale=guidance, latents=d["init_latents"],
                output_type=output_type).images


@pytest.mark.parametrize("case", [0, 1])
def test_pipeline_conformance_latents_and_images(conformance, case):
    pipe, d, meta = conformance
    steps, guidance = meta["cases"][case]
    latents = _run_case(pipe, d, meta, steps, guidance, "latent")
    expected = d[f"latents_s{steps}"]
    assert (latents - expected).abs().max() <= 1e-4 * expected.abs().max()
    image = _run_case(pipe, d, meta, steps, guidance, "np")
    expected_img = d[f"image_s{steps}"].numpy()
    assert image.shape == expected_img.shape
    assert np.abs(image - expected_img).max() <= 1e-4 * max(1.0, np.abs(expected_img).max())


def test_schedule_and_mu_match_reference(conformance):
    _, d, meta = conformance
    for steps, _g in meta["cases"]:
        sigmas, timesteps = lens_sigmas(steps, 35)
        torch.testing.assert_close(sigmas, d[f"sigmas_s{steps}"], rtol=0, atol=1e-6)
        assert sigmas[-1] == 0 and timesteps.shape == (steps,)
    for key, value in meta["empirical_mu"].items():
        n, steps = (int(v) for v in key.strip("()").split(","))
        assert compute_empirical_mu(n, steps) == pytest.approx(value, abs=1e-9)


def test_cfg_combine_rescales_to_cond_norm_and_guidance_one_is_cond():
    cond, uncond = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    out = cfg_combine(cond, uncond, 4.0)
    torch.testing.assert_close(out.norm(dim=-1), cond.norm(dim=-1))
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    zero = cfg_combine(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), 3.0)
    assert torch.equal(zero, torch.zeros(1, 1, 4))


def test_guidance_one_skips_the_uncond_half(conformance):
    pipe, d, meta = conformance
    seen = []
    orig = pipe.transformer.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["hidden_states"].shape[0])
        return orig(*args, **kwargs)

    pipe.transformer.forward = spy
    try:
        _run_case(pipe, d, meta, 2, 1.0, "latent")
        _run_case(pipe, d, meta, 2, 3.0, "latent")
    finally:
        del pipe.transformer.forward
    assert seen == [1, 1, 2, 2]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "lens_tiny"), seed=1)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_ckpt):
    pipe = LensPipeline.from_pretrained(tiny_ckpt, template_date="2026-01-01")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompt_to_image_end_to_end(tiny_pipe):
    g = torch.Generator().manual_seed(0)
    images = tiny_pipe(["a red circle", "two blue squares above a green triangle"], height=48, width=64,
                       num_inference_steps=3, guidance_scale=4.0, generator=g).images
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (64, 48) for im in images)
    arr = np.asarray(images[0]).astype(np.float32)
    assert arr.std() > 1.0  # not a blank image
    # Same seed -> same image; different prompts -> different images.
    again = tiny_pipe(["a red circle", "two blue squares above a green triangle"], height=48, width=64,
                      num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(np.asarray(again[0]), np.asarray(images[0]))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_encode_prompt_contract(tiny_pipe):
    pe, pm, ne, nm = tiny_pipe.encode_prompt(["a red circle", "a much longer prompt with many words in it"],
                                             num_images_per_prompt=2)
    assert len(pe) == 3 and pe[0].shape[0] == 4 and pm.shape == pe[0].shape[:2] and pm.dtype == torch.bool
    assert torch.equal(pe[0][0], pe[0][1]) and not torch.equal(pe[0][0], pe[0][2])
    assert all(torch.count_nonzero(f) == 0 for f in ne) and not nm.any()
    _, _, ne2, nm2 = tiny_pipe.encode_prompt("a red circle", negative_prompt="blurry")
    assert nm2.any() and any(torch.count_nonzero(f) > 0 for f in ne2)


def test_num_images_per_prompt_and_output_types(tiny_pipe):
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=2.0)
    out = tiny_pipe("a cat", num_images_per_prompt=2, output_type="pt", generator=torch.Generator().manual_seed(1),
                    **kw).images
    assert out.shape == (2, 3, 32, 32)
    # "pt" is the decoder's raw output, as diffusers returns it; "np" is it mapped to [0, 1].
    arr = tiny_pipe("a cat", num_images_per_prompt=2, output_type="np", generator=torch.Generator().manual_seed(1),
                    **kw).images
    assert out.min() < 0
    np.testing.assert_allclose(arr, ((out.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    lat = tiny_pipe("a cat", output_type="latent", generator=torch.Generator().manual_seed(1), **kw).images
    assert lat.shape == (1, 4, 128)


def test_callback_can_replace_latents(tiny_pipe):
    calls = []

    def cb(pipe, i, t, kw):
        calls.append(i)
        return {"latents": torch.zeros_like(kw["latents"])}

    lat = tiny_pipe("a cat", height=32, width=32, num_inference_steps=3, guidance_scale=1.0, output_type="latent",
                    callback_on_step_end=cb).images
    assert calls == [0, 1, 2] and torch.count_nonzero(lat) == 0


def test_recommended_defaults_by_variant(tmp_path, tiny_ckpt):
    turbo = str(tmp_path / "Lens-Turbo")
    shutil.copytree(tiny_ckpt, turbo)
    assert LensPipeline.from_pretrained(turbo).recommended == (4, 1.0)
    assert LensPipeline.from_pretrained(tiny_ckpt).recommended == (20, 5.0)
    assert LensPipeline.from_pretrained(tiny_ckpt, variant="lens-turbo").recommended == (4, 1.0)


def test_buckets():
    assert resolve_resolution(1024, "16:9") == (768, 1376)
    assert resolve_resolution(1440, "1:2") == (2080, 1040)
    assert all(h % 16 == 0 and w % 16 == 0 for t in RESOLUTION_BUCKETS.values() for h, w in t.values())


# -- bad input -------------------------------------------------------------------------
def test_size_not_divisible_by_16(tiny_pipe):
    with pytest.raises(ValueError, match="height=50 must be a positive multiple of 16"):
        tiny_pipe("x", height=50, width=64)


def test_bucket_errors(tiny_pipe):
    with pytest.raises(ValueError, match=r"aspect_ratio='5:4' is not a bucket"):
        tiny_pipe("x", base_resolution=1024, aspect_ratio="5:4")
    with pytest.raises(ValueError, match=r"base_resolution=768 is not a bucket"):
        tiny_pipe("x", base_resolution=768, aspect_ratio="1:1")


def test_wrong_number_of_feature_tensors_and_bad_mask(conformance):
    pipe, d, meta = conformance
    feats = [d[f"prompt_feat{i}"] for i in range(3)]
    with pytest.raises(ValueError, match="prompt_embeds has 2 tensors; this model takes 3"):
        pipe(prompt_embeds=feats[:2], prompt_mask=torch.ones(1, 5, dtype=torch.bool), height=80, width=112,
             num_inference_steps=1)
    with pytest.raises(ValueError, match=r"prompt_mask must be \[B, S\] = \[1, 5\]"):
        pipe(prompt_embeds=feats, prompt_mask=torch.ones(1, 4, dtype=torch.bool), height=80, width=112,
             num_inference_steps=1)


def test_missing_component_folder(tmp_path, tiny_ckpt):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="missing the vae/ folder"):
        LensPipeline.from_pretrained(str(broken))
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        LensPipeline.from_pretrained(str(tmp_path))


def test_no_text_encoder_needs_embeddings(conformance):
    pipe, _, _ = conformance
    with pytest.raises(ValueError, match="has no text encoder"):
        pipe("a prompt", height=80, width=112, num_inference_steps=1)


def test_mu_override_changes_only_the_schedule():
    base, _ = lens_sigmas(5, 35, mu=0.0)  # no shift: the plain linspace schedule
    torch.testing.assert_close(base[:-1], torch.linspace(1.0, 0.2, 5))
    ref, _ = lens_sigmas(5, 35)
    assert torch.equal(ref, lens_sigmas(5, 35, mu=compute_empirical_mu(35, 5))[0])
    assert (ref[1:-1] > base[1:-1]).all()  # the empirical shift spends more steps at high noise
