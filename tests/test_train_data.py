"""Trainer data: WebDataset shards (skips, buckets, rank split, mid-epoch resume), the
in-memory / cache source, and a Trainer run over a shard with corrupt samples."""
import json
import tarfile

import numpy as np
import pytest
import torch

from lens_fast.testing import WordFeatures, captioned_sample, image_bytes, write_tar
from lens_fast.train import (BucketData, BucketTable, EncodedSource, InMemorySource, PixelSpace, Trainer,
                             load_cache, load_config, save_cache)
from lens_fast.train import webdata
from lens_fast.train.webdata import WebDatasetSource


pytestmark = pytest.mark.usefixtures("one_thread")


def good(key, w=40, h=40, caption=None, seed=0):
    return captioned_sample(key, w, h, caption, seed)


@pytest.fixture
def corrupt_shards(tmp_path):
    png = image_bytes(40, 40, 1)
    main = [good("a0"), ("a1", {"png": png[:int(len(png) * 0.6)], "json": b'{"caption": "cut png"}'}),
            good("a2", seed=2), ("a3", {"jpg": b"\xff\xd8 definitely not a jpeg", "json": b'{"caption": "junk"}'}),
            good("a4", seed=4), good("a5", w=8, h=8, seed=5), ("a6", {"png": image_bytes(40, 40, 6)}),
            ("a7", {"png": image_bytes(40, 40, 7), "json": b"{not json"}), good("a8", seed=8), good("a9", seed=9),
            good("a10", seed=10), good("a11", seed=11)]
    tail_samples = [good(f"b{i}", seed=20 + i) for i in range(5)]
    write_tar(tmp_path / "probe.tar", tail_samples)
    with tarfile.open(tmp_path / "probe.tar") as tar:
        cut = tar.getmember("b4.png").offset_data + 1000
    paths = [write_tar(tmp_path / "main.tar", main),
             # cut inside the last sample's image data: a truncated shard
             write_tar(tmp_path / "tail.tar", tail_samples, cut_last=cut)]
    return paths


def square_table(batch=3):
    return BucketTable([32], ["1:1"], {32: batch}, multiple=8)


def test_corrupt_truncated_small_and_captionless_samples_are_skipped_and_counted(corrupt_shards):
    src = WebDatasetSource(corrupt_shards, square_table(), seed=0, min_side=16, workers=2, prefetch=False)
    captions = []
    for step in range(40):
        raw = src.batch(step, 0, 1)
        assert raw.images.shape == (3, 3, 32, 32) and raw.images.dtype == torch.uint8
        captions += raw.captions
        if src.streams[0].epoch >= 1:
            break
    assert src.skip_totals() == {"corrupt": 2, "too_small": 1, "no_caption": 2, "truncated_shard": 1}
    assert src.streams[0].skips == src.skip_totals()
    good_keys = {f"a{i}" for i in (0, 2, 4, 8, 9, 10, 11)} | {f"b{i}" for i in range(4)}
    assert set(captions) <= good_keys and len(set(captions)) >= len(good_keys) - 2
    src.close()


def test_trainer_trains_on_through_corrupt_samples_and_reports_them(corrupt_shards, tmp_path):
    cfg = load_config("tiny-cpu")
    cfg.override(["data.areas=[32]", "data.ratios=['1:1']", "data.batch_per_area={32: 3}", "logging.every=2",
                  "logging.progress_bar=false", "checkpoint.every=100"])
    raw = WebDatasetSource(corrupt_shards, square_table(), seed=0, min_side=16, workers=2)
    source = EncodedSource(raw, PixelSpace(4), WordFeatures(2, 32))
    trainer = Trainer(cfg, data=source, out_dir=str(tmp_path / "run"))
    result = trainer.train(max_steps=8)
    trainer.close()
    assert len(result.losses) == 8 and all(np.isfinite(result.losses))
    assert result.skipped == sum(raw.skip_totals().values()) >= 5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped"] == result.skipped and records[-1]["step"] == 8


def mixed_shards(tmp_path, n_shards=2, per_shard=12):
    shapes = {"wide": (64, 32), "tall": (32, 64), "square": (40, 40)}
    paths = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            kind = list(shapes)[(i * 7 + s) % 3]
            w, h = shapes[kind]
            samples.append(good(f"s{s}_{i:02d}", w, h, caption=f"{kind} s{s}_{i:02d}", seed=100 * s + i))
        paths.append(write_tar(tmp_path / f"shard-{s:03d}.tar", samples))
    return paths


def mixed_table():
    return BucketTable([32, 48], ["1:2", "1:1", "2:1"], {32: 3, 48: 2}, multiple=8)


def test_buckets_follow_the_image_aspect_and_the_drawn_area(tmp_path):
    src = WebDatasetSource(mixed_shards(tmp_path), mixed_table(), seed=3, min_side=16, workers=2)
    table = mixed_table()
    kinds = {"2:1": "wide", "1:2": "tall", "1:1": "square"}
    seen = set()
    for step in range(8):
        raw = src.batch(step, 0, 1)
        h, w = raw.images.shape[2:]
        bucket = next(b for b in table.all() if (b.height, b.width) == (h, w))
        assert raw.images.shape[0] == bucket.batch
        assert all(c.split()[0] == kinds[bucket.ratio] for c in raw.captions), (bucket, raw.captions)
        seen.add(bucket.area)
    assert seen == {32, 48}
    src.close()


def test_mid_epoch_resume_reads_on_from_the_saved_offset(tmp_path, monkeypatch):
    shards = mixed_shards(tmp_path)
    a = WebDatasetSource(shards, mixed_table(), seed=5, min_side=16, workers=2, prefetch=True)
    batches = {}
    for step in range(8):
        batches[step] = a.batch(step, 0, 1)
        if step == 3:
            state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    a.close()
    st = state["ranks"]["0"]
    assert st["offset"] > 0 and st["pending"], "the test wants a position inside a shard with buffered samples"
    calls = []
    real = webdata.read_samples

    def spy(path, offset):
        calls.append((path, offset))
        return real(path, offset)
    monkeypatch.setattr(webdata, "read_samples", spy)
    b = WebDatasetSource(shards, mixed_table(), seed=5, min_side=16, workers=2, prefetch=False)
    b.load_state_dict(state)
    for step in range(4, 8):
        got = b.batch(step, 0, 1)
        assert got.captions == batches[step].captions
        assert torch.equal(got.images, batches[step].images)
    pending = sorted(o for _, _, o in st["pending"])
    first = calls[:len(pending) + 1]
    assert sorted(o for _, o in first[:len(pending)]) == pending
    order = np.random.default_rng([5, st["epoch"], 11]).permutation(len(shards)).tolist()
    assert first[-1] == (shards[order[st["cursor"]]], st["offset"])  # never from the shard's start again
    b.close()


@pytest.mark.parametrize("n_shards", [4, 1])
def test_data_ranks_read_disjoint_samples(tmp_path, n_shards):
    shards = mixed_shards(tmp_path, n_shards=n_shards, per_shard=12 if n_shards == 4 else 24)
    src = WebDatasetSource(shards, mixed_table(), seed=1, min_side=16, workers=1, prefetch=False)
    caps = {0: [], 1: []}
    for step in range(3):
        for r in (0, 1):
            caps[r] += src.batch(step, r, 2).captions
    assert caps[0] and caps[1] and not set(caps[0]) & set(caps[1])
    src.close()


def _buckets(m=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for grid in [(2, 2), (2, 4)]:
        mask = torch.zeros(m, 5, dtype=torch.bool)
        for i in range(m):
            mask[i, :1 + i % 5] = True
        text = [torch.randn(m, 5, 8, generator=g) * mask[..., None] for _ in range(2)]
        out[grid] = BucketData(torch.randn(m, grid[0] * grid[1], 12, generator=g), text, mask,
                               [f"{grid} {i}" for i in range(m)])
    return out


def test_in_memory_source_is_the_same_for_any_process_split_and_resumes():
    buckets = _buckets()
    one = InMemorySource(buckets, {(2, 2): 3, (2, 4): 2}, seed=4)
    two = [InMemorySource(buckets, {(2, 2): 3, (2, 4): 2}, seed=4) for _ in range(2)]
    for step in range(6):
        for r in range(2):
            x, y = one.batch(step, r, 2), two[r].batch(step, r, 2)
            assert x.captions == y.captions and torch.equal(x.latents, y.latents)
            assert x.text_mask.shape[1] == int(x.text_mask.sum(1).max())  # trailing padding trimmed
            assert x.grid[0] * x.grid[1] == x.latents.shape[1]
        if step == 2:
            state = json.loads(json.dumps(one.state_dict()))
    later = [one.batch(s, 0, 2).captions for s in range(6, 12)]
    fresh = InMemorySource(buckets, {(2, 2): 3, (2, 4): 2}, seed=4)
    fresh.load_state_dict(state)
    for s in range(3, 6):
        fresh.batch(s, 0, 2)
    assert [fresh.batch(s, 0, 2).captions for s in range(6, 12)] == later
    with pytest.raises(ValueError, match="made with 2 data ranks, not 3"):
        fresh.batch(12, 0, 3)
    with pytest.raises(ValueError, match="expected h \\* w = 6"):
        InMemorySource({(2, 3): buckets[(2, 2)]}, 2)


def test_cache_round_trip_and_no_overwrite(tmp_path):
    buckets = _buckets(m=4)
    save_cache(str(tmp_path / "cache"), buckets)
    loaded = load_cache(str(tmp_path / "cache"))
    assert sorted(loaded) == sorted(buckets)
    for g in buckets:
        assert torch.equal(loaded[g].latents, buckets[g].latents)
        assert torch.equal(loaded[g].text[1], buckets[g].text[1]) and loaded[g].captions == buckets[g].captions
    with pytest.raises(FileExistsError, match="already exists"):
        save_cache(str(tmp_path / "cache"), buckets)
    with pytest.raises(FileNotFoundError, match="index.json is missing"):
        load_cache(str(tmp_path))


def test_cli_finetune_from_a_checkpoint_folder_through_the_frozen_vae_and_text_encoder(tmp_path):
    """The production path: shards -> PIL -> FLUX.2 VAE + GPT-OSS features (a tiny
    official-layout checkpoint) -> the pretrained transformer -> checkpoint, grid, export."""
    from lens_fast import LensTransformer2DModel
    from lens_fast.tiny import make_tiny_checkpoint
    from lens_fast.train.cli import main

    ckpt = make_tiny_checkpoint(str(tmp_path / "ckpt"))
    mixed_shards(tmp_path)
    run = tmp_path / "run"
    rc = main(["--config", "finetune", "--pretrained", ckpt, "--data", str(tmp_path / "shard-{000..001}.tar"),
               "--out", str(run), "--max-steps", "3", "--no-progress",
               "--set", "data.areas=[32, 48]", "--set", "data.batch_per_area={32: 2, 48: 2}",
               "--set", "data.ratios=['1:2', '1:1', '2:1']", "--set", "data.min_side=16",
               "--set", "parallel.compile=false", "--set", "parallel.param_dtype=float32",
               "--set", "encoders.dtype=float32", "--set", "logging.sample_every=3",
               "--set", "logging.sample_steps=2", "--set", "checkpoint.every=3", "--set", "logging.every=1"])
    assert rc == 0
    pre = LensTransformer2DModel.from_pretrained(ckpt)
    with open(run / "run.json") as f:
        recorded = json.load(f)["model_config"]
    # the pretrained model's config as its folder states it (diffusers' config also carries
    # lens_fast's defaults, such as mask_every_block=False, and private keys)
    config = json.loads(json.dumps({k: v for k, v in dict(pre.config).items() if not k.startswith("_")}))
    assert recorded == {k: config[k] for k in recorded} and set(config) - set(recorded) <= {"mask_every_block"}
    assert config.get("mask_every_block", False) is False
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    assert (run / "samples" / "step_0000003.png").is_file()
    tuned = LensTransformer2DModel.from_pretrained(str(run / "export" / "transformer"))
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, pre.state_dict()[k])]
    assert changed and len(changed) < len(pre.state_dict())  # trained from the checkpoint, not from scratch


def test_cli_trains_from_a_token_cache(tmp_path):
    from lens_fast.train.cli import main

    g = torch.Generator().manual_seed(1)
    buckets = {grid: BucketData(torch.randn(10, grid[0] * grid[1], 48, generator=g),
                                [torch.randn(10, 4, 32, generator=g) for _ in range(2)],
                                torch.ones(10, 4, dtype=torch.bool)) for grid in [(8, 8), (6, 12)]}
    save_cache(str(tmp_path / "cache"), buckets)
    run = tmp_path / "run"
    assert main(["--config", "tiny-cpu", "--cache", str(tmp_path / "cache"), "--out", str(run), "--max-steps", "3",
                 "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # tiny-cpu's batch for area 32 (8 x 8 tokens of 4 px, and the nearest area for 6 x 12) is 8
    assert [r["samples"] for r in records] == [8.0, 8.0, 8.0]
    with open(run / "run.json") as f:
        assert json.load(f)["config"]["data"]["source"] == "cache"
