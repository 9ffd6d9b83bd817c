"""``mask_every_block`` is a model option that survives save, export and reload, and every
path honours it: the eager model, the engine (fast path), the trainer and FP8. Absent from
a folder it means the reference behaviour (the text mask in the first block only)."""
import json

import pytest
import torch

from lens_fast import LensPipeline, LensTransformer2DModel
from lens_fast.engine import enable_fast_path
from lens_fast.quant import apply_quantization
from lens_fast.tiny import SCHEDULER, TINY_TRANSFORMER, make_tiny_transformer
from lens_fast.train import PixelSpace, Trainer, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_saved_only_when_set_and_absent_means_first_block_only(tmp_path):
    model = make_tiny_transformer(seed=1)
    model.save_pretrained(tmp_path / "default")
    saved = json.load(open(tmp_path / "default" / "config.json"))
    assert "mask_every_block" not in saved                      # a default folder holds the official keys only
    assert LensTransformer2DModel.from_pretrained(tmp_path / "default").mask_every_block is False
    model.mask_every_block = True
    model.save_pretrained(tmp_path / "every")
    assert json.load(open(tmp_path / "every" / "config.json"))["mask_every_block"] is True
    loaded = LensTransformer2DModel.from_pretrained(tmp_path / "every")
    assert loaded.mask_every_block is True and loaded.config.mask_every_block is True
    loaded.mask_every_block = False  # the config (diffusers' ConfigMixin keeps every key) says False, and a
    loaded.save_pretrained(tmp_path / "off")  # folder saved from it holds the official keys only again
    assert loaded.config.mask_every_block is False
    assert "mask_every_block" not in json.load(open(tmp_path / "off" / "config.json"))
    with pytest.raises(ValueError, match="mask_every_block=1"):
        LensTransformer2DModel(**TINY_TRANSFORMER, mask_every_block=1)


def _pipe(model):
    pipe = LensPipeline(SCHEDULER, PixelSpace(4), transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, seed=0):
    """CFG 4 over a prompt padded inside its row (real features at the pad positions, as
    a shorter prompt of a batch has) and the empty negative prompt."""
    g = torch.Generator().manual_seed(seed)
    layers = pipe.transformer.num_text_layers
    feats = [torch.randn(1, 11, pipe.transformer.config.enc_hidden_dim, generator=g) for _ in range(layers)]
    mask = torch.ones(1, 11, dtype=torch.bool)
    mask[0, 6:] = False
    latents = torch.randn(1, 8 * 8, pipe.transformer.config.in_channels, generator=g)
    return pipe(prompt_embeds=feats, prompt_mask=mask, height=32, width=32, num_inference_steps=3,
                guidance_scale=4.0, latents=latents, output_type="latent").images


def test_trained_with_mask_every_block_exports_reloads_and_serves_the_same_eager_and_fast(tmp_path):
    cfg = load_config("tiny-cpu").override(["logging.progress_bar=false", "model.transformer={mask_every_block: true}",
                                            "train.max_steps=12", "checkpoint.every=12", "optim.warmup_steps=1"])
    trainer = Trainer(cfg, out_dir=str(tmp_path / "run"))
    assert trainer.model.mask_every_block is True
    trainer.train()
    folder = trainer.export()
    assert trainer.ema_model().mask_every_block is True
    trainer.close()
    assert json.load(open(f"{folder}/config.json"))["mask_every_block"] is True

    model = LensTransformer2DModel.from_pretrained(folder)
    assert model.mask_every_block is True
    pipe = _pipe(model)
    eager = _sample(pipe)
    enable_fast_path(pipe)                                        # text bucketed to 64: padding in every block
    fast = _sample(pipe)
    enable_fast_path(pipe, text_bucket=None)
    fast_unbucketed = _sample(pipe)
    pipe.disable_fast_path()
    assert _rel(fast, eager) <= 1e-5 and _rel(fast_unbucketed, eager) <= 1e-5
    # The option matters for these weights: the reference rule gives other numbers, so a
    # path that dropped the option could not match.
    model.mask_every_block = False
    first_only = _sample(pipe)
    assert _rel(first_only, eager) > 1e-4, _rel(first_only, eager)


def test_fp8_engine_honours_mask_every_block():
    model = make_tiny_transformer(seed=2, num_layers=3, attention_head_dim=48, axes_dims_rope=(8, 20, 20),
                                  in_channels=48, out_channels=3, patch_size=4, mask_every_block=True)
    apply_quantization(model, "fp8", backend="emulate", layer_filter={"exclude": []})
    pipe = _pipe(model)
    eager = _sample(pipe)
    enable_fast_path(pipe)
    fast = _sample(pipe)
    pipe.disable_fast_path()
    assert _rel(fast, eager) <= 1e-5
    model.mask_every_block = False
    assert _rel(_sample(pipe), eager) > 1e-4
