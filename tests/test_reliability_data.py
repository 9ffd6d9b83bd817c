"""Reliability of data sources: shards that can make no progress stop with one clear
error naming the shards and what was skipped (never a silent endless loop); sources
that can make progress are never stopped by mistake."""
import json
import os
import time

import pytest

from lens_fast.cli import main
from lens_fast.errors import InvalidValue, MissingFile, NoUsableData
from lens_fast.testing import captioned_sample, image_bytes, write_tar
from lens_fast.tiny import make_tiny_checkpoint
from lens_fast.train import BucketTable, ConfigError, load_config
from lens_fast.train.webdata import WebDatasetSource

pytestmark = pytest.mark.usefixtures("one_thread")


def table(batch=3):
    return BucketTable([32], ["1:1"], {32: batch}, multiple=8)


def read_until_error(shards, steps=200, world=1, **kw):
    """Batches until the source raises; fails the test when it never does (or is slow)."""
    kw = {"seed": 0, "min_side": 16, "workers": 1, "prefetch": False, **kw}
    src = WebDatasetSource(shards, table(), **kw)
    start = time.time()
    try:
        with pytest.raises(NoUsableData) as info:
            for step in range(steps):
                for rank in range(world):
                    src.batch(step, rank, world)
        assert time.time() - start < 20
        return str(info.value)
    finally:
        src.close()


def junk(path, data):
    path.write_bytes(data)
    return str(path)


def png_cut(seed):
    png = image_bytes(40, 40, seed)
    return png[:len(png) // 2]  # the header parses, the pixels do not decode


# Every way a shard set can hold nothing usable, and the skip reason each must report.
NO_PROGRESS = {
    "random_bytes": (lambda d: [junk(d / "noise.tar", os.urandom(20_000))], "truncated_shard"),
    "empty_file": (lambda d: [junk(d / "empty.tar", b"")], "a whole pass"),
    "empty_archive": (lambda d: [write_tar(d / "none.tar", [])], "a whole pass"),
    "no_captions": (lambda d: [write_tar(d / "nocap.tar", [(f"k{i}", {"png": image_bytes(40, 40, i)})
                                                             for i in range(4)])], "no_caption"),
    "wrong_caption_key": (lambda d: [write_tar(d / "key.tar", [(f"k{i}", {"png": image_bytes(40, 40, i),
                                                                          "json": b'{"text": "x"}'})
                                                                for i in range(4)])], "no_caption"),
    "all_too_small": (lambda d: [write_tar(d / "small.tar", [captioned_sample(f"k{i}", 8, 8, seed=i)
                                                             for i in range(4)])], "too_small"),
    "no_images": (lambda d: [write_tar(d / "txt.tar", [(f"k{i}", {"txt": b"caption"}) for i in range(4)])],
                  "no_image"),
    "undecodable_pixels": (lambda d: [write_tar(d / "cut.tar", [(f"k{i}", {"png": png_cut(i), "txt": b"c"})
                                                                for i in range(6)])], "corrupt"),
    "several_junk_shards": (lambda d: [junk(d / f"n{i}.tar", os.urandom(3000)) for i in range(5)],
                            "a whole pass over its 5 shard(s)"),
}


@pytest.mark.parametrize("case", sorted(NO_PROGRESS))
def test_a_source_that_cannot_make_progress_stops_with_one_clear_error(tmp_path, case):
    make, reason = NO_PROGRESS[case]
    shards = make(tmp_path)
    msg = read_until_error(shards, max_consecutive_skips=50)
    assert "cannot make progress" in msg and reason in msg, msg
    assert os.path.basename(shards[0]) in msg and "data.min_side 16" in msg and "\n" not in msg


def test_consecutive_skip_cap_stops_a_long_shard_of_junk_before_its_end(tmp_path):
    shard = write_tar(tmp_path / "long.tar", [(f"k{i:03d}", {"png": image_bytes(40, 40, i)}) for i in range(40)])
    msg = read_until_error([shard], max_consecutive_skips=10)
    assert "the last 10 samples it read were all skipped" in msg and "no_caption 10" in msg


def test_the_error_crosses_the_prefetch_thread_and_names_each_data_rank(tmp_path):
    shard = junk(tmp_path / "noise.tar", os.urandom(5000))
    msg = read_until_error([shard], prefetch=True)
    assert msg.startswith("data rank 0 cannot make progress")
    # one shard, two data ranks: both read it (strided); rank 0 stops first
    assert "data rank 0" in read_until_error([shard], world=2)


def test_sparse_but_usable_data_is_never_stopped(tmp_path):
    # 2 usable samples for a batch of 3, among junk and captionless samples, over 2 shards:
    # every pass finds something, so it must train on (repeating samples across epochs).
    a = write_tar(tmp_path / "a.tar", [captioned_sample("good0")] + [(f"x{i}", {"png": image_bytes(40, 40, i)})
                                                                   for i in range(5)])
    b = write_tar(tmp_path / "b.tar", [(f"y{i}", {"png": image_bytes(40, 40, i)}) for i in range(5)]
                  + [captioned_sample("good1", seed=1)])
    src = WebDatasetSource([a, b], table(), seed=0, min_side=16, workers=1, prefetch=False,
                           max_consecutive_skips=20)
    for step in range(6):
        assert set(src.batch(step, 0, 1).captions) <= {"good0", "good1"}
    assert src.skip_totals()["no_caption"] >= 10
    src.close()


def test_a_shard_that_vanishes_mid_run_is_skipped_and_the_others_go_on(tmp_path):
    shards = [write_tar(tmp_path / f"s{i}.tar", [captioned_sample(f"s{i}_{j}", seed=10 * i + j) for j in range(4)])
              for i in range(3)]
    src = WebDatasetSource(shards, table(), seed=0, min_side=16, workers=1, prefetch=False)
    src.batch(0, 0, 1)
    os.remove(shards[1])
    for step in range(1, 12):
        assert len(src.batch(step, 0, 1).captions) == 3
    assert src.streams[0].skips["unreadable_shard"] >= 1
    os.remove(shards[0])
    os.remove(shards[2])  # nothing readable is left: a clear error, not a hang
    with pytest.raises(NoUsableData, match="unreadable_shard"):
        for step in range(12, 40):
            src.batch(step, 0, 1)
    src.close()


def test_shard_patterns_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(MissingFile, match=r"from pattern '.*nothing-\*\.tar' do not exist"):
        WebDatasetSource([str(tmp_path / "nothing-*.tar")], table())
    write_tar(tmp_path / "shard-001.tar", [captioned_sample("a")])
    with pytest.raises(MissingFile, match=r"^2 data shard\(s\) .* do not exist: .*shard-000\.tar, .*shard-002\.tar$"):
        WebDatasetSource([str(tmp_path / "shard-{000..002}.tar")], table())
    (tmp_path / "dir.tar").mkdir()
    with pytest.raises(MissingFile, match="dir.tar"):
        WebDatasetSource([str(tmp_path / "dir.tar")], table())
    with pytest.raises(InvalidValue, match="max_consecutive_skips=0"):
        WebDatasetSource([write_tar(tmp_path / "ok.tar", [captioned_sample("a")])], table(), max_consecutive_skips=0)
    with pytest.raises(ConfigError, match="data.max_consecutive_skips=0"):
        load_config("tiny-cpu").override(["data.max_consecutive_skips=0"])


@pytest.fixture(scope="module")
def lens_folder(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("rel_data") / "Lens"), seed=3)


def test_training_on_a_shard_of_random_bytes_exits_2_naming_the_shard(lens_folder, tmp_path, capsys):
    """The reported case: `lens-fast train` on one shard of random bytes used to hang silently."""
    shard = junk(tmp_path / "random.tar", os.urandom(50_000))
    argv = ["train", "--config", "tiny-cpu", "--pretrained", lens_folder, "--data", shard, "--out",
            str(tmp_path / "run"), "--max-steps", "3", "--no-progress", "--set", "encoders.dtype=float32",
            "--set", "data.areas=[32]", "--set", "data.ratios=['1:1']", "--set", "data.batch_per_area={32: 2}",
            "--set", "data.multiple=16", "--set", "data.prefetch=false"]
    start = time.time()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert time.time() - start < 60
    assert len(err) == 1 and "random.tar" in err[0] and "cannot make progress" in err[0], err
    assert "truncated_shard" in err[0]
    # A missing shard is refused before the run folder is even created.
    assert main(argv[:6] + [str(tmp_path / "missing-{0..3}.tar")] + argv[7:8] + [str(tmp_path / "run2")]
                + argv[9:]) == 2
    assert "do not exist" in capsys.readouterr().err and not (tmp_path / "run2").exists()
    with open(tmp_path / "run" / "run.json") as f:
        assert json.load(f)["config"]["data"]["shards"] == [shard]
