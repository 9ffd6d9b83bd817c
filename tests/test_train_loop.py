"""The Trainer in one process: falling loss, the loss pieces, EMA, LR schedule,
export/reload, sample grids and the Python API the demo uses."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lens_fast import LensTransformer2DModel
from lens_fast.sampling import add_noise
from lens_fast.train import BucketData, Callback, InMemorySource, Trainer, load_config
from lens_fast.train.config import ConfigError
from lens_fast.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint_weights
from lens_fast.train.loss import (DROPOUT, NOISE, SIGMA, drop_captions, flow_matching_loss, logit_normal_mu,
                                  sample_sigmas, step_generator)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(*sets):
    cfg = load_config("tiny-cpu")
    return cfg.override(["logging.progress_bar=false", *sets])


def test_tiny_cpu_loss_falls():
    trainer = Trainer(tiny())
    result = trainer.train(max_steps=20)
    trainer.close()
    assert len(result.losses) == 20 and result.step == 20
    first, last = np.mean(result.losses[:3]), np.mean(result.losses[-3:])
    assert last < 0.75 * first, result.losses
    assert result.samples_per_s > 0 and result.tflops_per_gpu > 0 and result.mfu is None  # CPU: no MFU


def test_loss_pieces():
    assert logit_normal_mu(256, [[256, 0.5], [4096, 1.15]]) == pytest.approx(0.5)
    assert logit_normal_mu(4096, [[256, 0.5], [4096, 1.15]]) == pytest.approx(1.15)
    assert logit_normal_mu(2176, [[256, 0.5], [4096, 1.15]]) == pytest.approx(0.825)
    g = step_generator(0, 3, 1, SIGMA, "cpu")
    s = sample_sigmas(20000, 4096, [[256, 0.5], [4096, 1.15]], 1.0, g, "cpu")
    logit = torch.log(s / (1 - s))
    assert abs(logit.mean().item() - 1.15) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    s2 = sample_sigmas(20000, 4096, [[256, 0.5], [4096, 1.15]], 1.0, step_generator(0, 3, 1, SIGMA, "cpu"), "cpu")
    assert torch.equal(s, s2)  # fixed by (seed, step, data rank, stream)
    text = [torch.randn(64, 5, 8) + 3, torch.randn(64, 5, 8) + 3]
    mask = torch.ones(64, 5, dtype=torch.bool)
    t2, m2, dropped = drop_captions(text, mask, 0.5, step_generator(0, 0, 0, DROPOUT, "cpu"))
    assert 10 < int(dropped.sum()) < 54
    for t, t_new in zip(text, t2):
        assert torch.equal(t_new[dropped], torch.zeros_like(t_new[dropped]))  # what inference feeds as uncond
        assert torch.equal(t_new[~dropped], t[~dropped])
    assert not m2[dropped].any() and m2[~dropped].all()
    t3, m3, d3 = drop_captions(text, mask, 0.0, step_generator(0, 0, 0, DROPOUT, "cpu"))
    assert t3 is text and m3 is mask and not d3.any()


def test_flow_matching_loss_is_mse_to_eps_minus_x0():
    cfg = tiny("loss.caption_dropout=0.0")
    model = LensTransformer2DModel(**cfg.model.transformer)
    torch.nn.init.normal_(model.proj_out.weight, std=0.1)
    x0 = torch.randn(2, 16, 48)
    text = [torch.randn(2, 3, 32), torch.randn(2, 3, 32)]
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss = flow_matching_loss(model, x0, text, mask, [(1, 4, 4)], cfg.loss, seed=1, step=5, data_rank=2)
    noise = torch.randn(x0.shape, generator=step_generator(1, 5, 2, NOISE, "cpu"))
    sigma = torch.sigmoid(logit_normal_mu(16, cfg.loss.mu_points)
                          + torch.randn(2, generator=step_generator(1, 5, 2, SIGMA, "cpu")))
    pred = model(add_noise(x0, noise, sigma), text, mask, sigma, [(1, 4, 4)]).sample
    assert loss.item() == pytest.approx(((pred - (noise - x0)) ** 2).mean().item(), rel=1e-6)


class Recorder(Callback):
    def __init__(self):
        self.params, self.records, self.events = [], [], []

    def on_train_start(self, trainer):
        self.events.append("start")
        self.params.append(trainer.full_state_dict(ema=False))

    def on_step_end(self, trainer, step):
        self.params.append(trainer.full_state_dict(ema=False))

    def on_log(self, trainer, record):
        self.records.append(record)

    def on_train_end(self, trainer, result):
        self.events.append("end")


def test_ema_is_the_running_average_and_lr_warms_up_then_stays():
    rec = Recorder()
    trainer = Trainer(tiny("ema.decay=0.5", "optim.warmup_steps=3", "optim.lr=1e-3"), callbacks=[rec])
    trainer.train(max_steps=5)
    expected = {k: v.clone() for k, v in rec.params[0].items()}
    for p in rec.params[1:]:
        for k in expected:
            expected[k] += 0.5 * (p[k] - expected[k])
    ema = trainer.full_state_dict(ema=True)
    for k in expected:
        torch.testing.assert_close(ema[k], expected[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(ema[k], rec.params[-1][k]) for k in ema)
    assert [r["lr"] for r in rec.records] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])
    assert rec.events == ["start", "end"] and [r["step"] for r in rec.records] == [1, 2, 3, 4, 5]
    trainer.close()


def test_lr_cools_down_linearly_to_zero_over_decay_steps():
    trainer = Trainer(tiny("optim.warmup_steps=2", "optim.lr=1e-3", "optim.decay_steps=4", "train.max_steps=10"))
    lrs = [trainer.lr_at(s) for s in range(10)]
    # warm-up 1/2, 2/2; constant; then the last 4 steps at 4/4, 3/4, 2/4, 1/4 of the peak
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    trainer.close()
    with pytest.raises(ConfigError, match="decay_steps"):
        tiny("optim.decay_steps=30", "train.max_steps=10").validate()
    with pytest.raises(ConfigError, match="decay_steps"):
        tiny("optim.decay_steps=-1").validate()


def test_export_reloads_and_reproduces_the_trained_model(tmp_path):
    trainer = Trainer(tiny("checkpoint.every=3", "checkpoint.keep_last=1"), out_dir=str(tmp_path / "run"))
    trainer.train(max_steps=7)
    run = tmp_path / "run"
    assert [s for s, _ in list_checkpoints(str(run))] == [7]  # keep_last=1 removed 3 and 6
    assert latest_checkpoint(str(run))[0] == 7
    loaded = LensTransformer2DModel.from_pretrained(str(run / "export" / "transformer"))
    raw_folder = trainer.export(str(tmp_path / "raw"), ema=False)
    raw = LensTransformer2DModel.from_pretrained(raw_folder)
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 16, 48, generator=g), [torch.randn(2, 4, 32, generator=g) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        out = loaded(x, text, mask, sigma, [(1, 4, 4)]).sample
        assert torch.equal(out, trainer.ema_model()(x, text, mask, sigma, [(1, 4, 4)]).sample)
        trained = trainer.model(x, text, mask, sigma, [(1, 4, 4)]).sample
        assert torch.equal(raw(x, text, mask, sigma, [(1, 4, 4)]).sample, trained)
        assert not torch.allclose(out, trained)  # the export holds the EMA weights
    ck = load_checkpoint_weights(str(run / "checkpoints" / "step_7"), "ema")
    assert all(torch.equal(ck[k], v) for k, v in loaded.state_dict().items())
    with pytest.raises(FileExistsError, match="already holds"):
        trainer.export(raw_folder)  # a folder given by the user is never overwritten
    trainer.close()


def test_sample_grids_use_the_ema_model(tmp_path):
    trainer = Trainer(tiny("logging.sample_every=2", "logging.sample_count=3", "logging.sample_steps=2"),
                      out_dir=str(tmp_path / "run"))
    trainer.train(max_steps=2)
    path = tmp_path / "run" / "samples" / "step_0000002.png"
    with Image.open(path) as im:  # 2 rows (reference, sample) x 3 images of 32 x 32 px, 2 px apart
        assert im.size == (3 * 34 + 2, 2 * 34 + 2)
    p = trainer.data.preview(3)
    a = trainer.sample(p.text, p.text_mask, p.grid, steps=2, guidance=3.0, seed=1)
    with torch.no_grad():
        ema = trainer.ema_model()
        from lens_fast.train.sample import sample_tokens
        b = sample_tokens(ema, p.text, p.text_mask, p.grid, 2, 3.0, seed=1)
    torch.testing.assert_close(a, b)
    trainer.close()


def test_python_api_with_an_in_memory_source_and_a_given_model():
    cfg = tiny("loss.caption_dropout=0.2")
    model = LensTransformer2DModel(**cfg.model.transformer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    buckets = {grid: BucketData(torch.randn(12, grid[0] * grid[1], 48, generator=g),
                                [torch.randn(12, 4, 32, generator=g) for _ in range(2)],
                                torch.ones(12, 4, dtype=torch.bool))
               for grid in [(4, 4), (2, 8)]}
    logs = []

    class OnLog(Callback):
        def on_log(self, trainer, record):
            logs.append(record)

    trainer = Trainer(cfg, model=model, data=InMemorySource(buckets, 4, seed=1), callbacks=[OnLog()])
    result = trainer.train(max_steps=4)
    assert trainer.model is model and not torch.equal(model.img_in.weight, before["img_in.weight"])
    assert len(result.losses) == 4 and len(logs) == 4
    assert {"loss", "grad_norm", "lr", "samples_per_s", "image_tokens_per_s", "tflops_per_gpu", "mfu",
            "peak_memory_gb", "skipped"} <= set(logs[-1])
    assert json.dumps(logs[-1])  # JSON-ready
    with pytest.raises(ValueError, match="below the step this run already reached"):
        trainer.train(max_steps=2)
    with pytest.raises(ValueError, match="no out_dir"):
        trainer.save()
    assert trainer.run_dir is None
    trainer.close()


def test_pretrained_weights_are_the_start_of_a_finetune(tmp_path):
    from lens_fast.tiny import make_tiny_transformer

    src = make_tiny_transformer(seed=3)
    src.save_pretrained(str(tmp_path / "ckpt" / "transformer"))
    cfg = load_config("finetune").override(
        ["logging.progress_bar=false", "parallel.compile=false", "parallel.param_dtype=float32",
         "parallel.activation_checkpointing=none", f"model.pretrained={tmp_path / 'ckpt'}"])
    g = torch.Generator().manual_seed(0)
    data = InMemorySource({(2, 2): BucketData(torch.randn(8, 4, 128, generator=g),
                                              [torch.randn(8, 3, 40, generator=g) for _ in range(3)],
                                              torch.ones(8, 3, dtype=torch.bool))}, 4)
    trainer = Trainer(cfg, data=data)
    start = trainer.full_state_dict(ema=False)
    assert all(torch.equal(start[k], v) for k, v in src.state_dict().items())
    assert all(torch.equal(trainer.full_state_dict(ema=True)[k], v) for k, v in start.items())
    result = trainer.train(max_steps=2)
    assert np.isfinite(result.losses).all()
    trainer.close()
