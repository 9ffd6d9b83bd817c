"""The curation pipeline end to end on a small toy-world set with planted defects: the
shards the trainer reads, the manifest, resume after a kill, bad inputs and outputs, a
captioning server that is down or answers badly, other input kinds, calibration."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import yaml

pytest.importorskip("pyarrow")
pytest.importorskip("faiss")

from lens_fast.chat_server import LocalChatServer  # noqa: E402
from lens_fast.curate import CurationIncomplete, curate  # noqa: E402
from lens_fast.curate.toy_proof import TOY_SETTINGS, toy_config  # noqa: E402
from lens_fast.curate.toyset import EXPECTED_STAGE, make_toy_set  # noqa: E402
from lens_fast.curate.worker import read_parquet  # noqa: E402

N_CLEAN, N_DEFECT = 24, 2


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    truth = make_toy_set(str(root / "images"), N_CLEAN, N_DEFECT, seed=0, truth_path=str(root / "truth.jsonl"))
    return root, {t["file"]: t["kind"] for t in truth}


@pytest.fixture(scope="module")
def server():
    with LocalChatServer("lens_fast.curate.toy_models:caption_handler", model="toy-vlm") as s:
        yield s


def config(root, url, **changes):
    cfg = toy_config(str(root), url)
    cfg.shards.samples_per_shard, cfg.execution.unit_size = 4, 16
    cfg.caption.backoff_s, cfg.caption.backoff_max_s, cfg.caption.max_retries = 0.01, 0.05, 1
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def config_file(root, url, **changes):
    cfg = config(root, url, **changes)
    path = str(root / f"cfg-{len(os.listdir(root))}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f)
    return path


def cli(*args, timeout=240):
    """``lens-fast curate ARGS`` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "lens_fast.cli", "curate", *args], capture_output=True, text=True,
                          timeout=timeout)


def main(capsys, *args):
    """``lens-fast curate ARGS`` through its entry point in this process: (status, stdout, stderr)."""
    from lens_fast.cli import main as lens_fast

    status = lens_fast(["curate", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def curated(toy, server, tmp_path_factory):
    root, kinds = toy
    out = str(tmp_path_factory.mktemp("curated") / "out")
    report = curate([str(root / "images")], out, config(root, server.url), say=lambda s: None)
    return out, report, read_parquet(os.path.join(out, "manifest.parquet"))


def shard_bytes(out):
    folder = os.path.join(out, "shards")
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_planted_defects_are_dropped_and_clean_images_kept(toy, curated):
    _, kinds = toy
    out, report, manifest = curated
    by_kind = {}
    for row in manifest:
        by_kind.setdefault(kinds[os.path.basename(row["id"])], []).append(row)
    assert report["kept"] == N_CLEAN and all(r["status"] == "kept" for r in by_kind["clean"])
    for kind, stage in EXPECTED_STAGE.items():
        got = {r["dropped_by"] for r in by_kind[kind]}
        # a flat image has no edges at all: clarity (stage 6) drops it before entropy (7) looks
        assert got == ({"clarity"} if kind == "flat" else {stage}), kind
    for r in by_kind["near_duplicate"]:
        assert kinds[os.path.basename(r["dup_of"])] == "clean" and r["score_dedup"] >= 0.95
    decodable = [r for r in manifest if r["decode_error"] is None]
    for stage in ("area", "clarity", "entropy", "luminance"):  # every stage's score for every decodable image
        assert all(r[f"score_{stage}"] is not None for r in decodable)
    assert {r["decode_error"] for r in by_kind["corrupt"]} <= {"corrupt", "empty", "not_an_image"}


def test_shards_are_what_the_trainer_reads(toy, curated):
    from lens_fast.curate.shards import bucket_table
    from lens_fast.train.webdata import WebDatasetSource, read_samples

    root, _ = toy
    out, _, manifest = curated
    captions = {r["sample_key"]: r["caption"] for r in manifest if r["status"] == "kept"}
    table = bucket_table(str(root / "toy_buckets.yaml"))
    seen = 0
    for name in sorted(os.listdir(os.path.join(out, "shards"))):
        for key, files, _, _ in read_samples(os.path.join(out, "shards", name), 0):
            meta = json.loads(files["json"])
            assert meta["caption"] == captions[key] and meta["caption"].startswith("A simple flat picture")
            assert (meta["width"], meta["height"]) == (meta["bucket"]["width"], meta["bucket"]["height"])
            assert name.startswith(f"{meta['bucket']['base']}-{meta['bucket']['ratio'].replace(':', 'x')}-")
            seen += 1
    assert seen == N_CLEAN
    src = WebDatasetSource([os.path.join(out, "shards", "*.tar")], table, min_side=24, prefetch=False)
    try:
        raw = src.batch(0, 0, 1)
        assert raw.images.shape[0] in (8, 16) and all(c in captions.values() for c in raw.captions)
    finally:
        src.close()


def test_resume_after_kill_equals_an_uninterrupted_run(toy, server, curated, tmp_path):
    root, _ = toy
    out_ref, _, manifest_ref = curated
    out = str(tmp_path / "killed")
    server.reset()
    server.add_faults(*([{}] * 8 + [{"delay_s": 3.0}] * 40))  # 8 quick captions, then slow ones
    args = [str(root / "images"), "--out", out, "--config", config_file(root, server.url), "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "lens_fast.cli", "curate", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(os.path.join(out, "shards")) and os.listdir(os.path.join(out, "shards")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its worker processes, mid-way through the shards
    proc.wait(30)
    partial = [n for n in os.listdir(os.path.join(out, "shards")) if n.endswith(".tar")]
    assert 0 < len(partial) < len(shard_bytes(out_ref))
    server.reset()
    done = cli(*args[:-2])  # resumed on one worker, in its own process again
    assert done.returncode == 0, done.stderr
    assert shard_bytes(out) == shard_bytes(out_ref)  # same shards, byte for byte: nothing lost or doubled
    manifest = read_parquet(os.path.join(out, "manifest.parquet"))
    assert manifest == manifest_ref


def test_output_folders_are_never_overwritten(toy, server, curated, tmp_path, capsys):
    root, _ = toy
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "000000.tar").write_bytes(b"someone's shard")
    status, _, err = main(capsys, str(root / "images"), "--out", str(foreign), "--config",
                          config_file(root, server.url))
    assert status == 2 and err.count("\n") == 1
    assert "already holds shards (000000.tar" in err and (foreign / "000000.tar").read_bytes() == b"someone's shard"
    out, _, _ = curated
    folder = os.path.join(out, "shards")
    mtimes = (lambda: {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)})
    before = mtimes()
    status, _, err = main(capsys, str(root / "images"), "--out", out, "--config",
                          config_file(root, server.url, clarity__min_score=9.0))
    assert status == 2 and "holds a curation run with other settings ['clarity.min_score']" in err
    status, printed, _ = main(capsys, str(root / "images"), "--out", out, "--config", config_file(root, server.url))
    assert status == 0 and "already complete" in printed
    assert mtimes() == before


def test_caption_server_down_stops_cleanly_and_resumes(toy, server, curated, tmp_path, capsys):
    root, _ = toy
    out = str(tmp_path / "down")
    dead = "http://127.0.0.1:9/v1"  # the discard port: nothing answers
    status, _, err = main(capsys, str(root / "images"), "--out", out, "--config", config_file(root, dead))
    assert status == 2 and err.count("\n") == 1 and "gave no answer" in err and "Nothing was lost" in err
    assert os.listdir(os.path.join(out, "work", "units")) and not os.listdir(os.path.join(out, "shards"))
    server.reset()
    status, _, err = main(capsys, str(root / "images"), "--out", out, "--config", config_file(root, dead),
                          "--caption-url", server.url)
    assert status == 0, err
    assert shard_bytes(out) == shard_bytes(curated[0])


def test_failed_captions_leave_their_shard_for_a_rerun(toy, server, curated, tmp_path):
    root, _ = toy
    out = str(tmp_path / "bad")
    server.reset()
    server.add_faults({"content": "no"}, {"content": "no"})  # one image's two attempts: too short both times
    cfg = config(root, server.url, caption__max_concurrency=1)
    with pytest.raises(CurationIncomplete, match=r"1 shard\(s\) not written: 1 caption\(s\) failed"):
        curate([str(root / "images")], out, cfg, say=lambda s: None)
    assert len(os.listdir(os.path.join(out, "shards"))) == len(shard_bytes(curated[0])) - 1
    report = curate([str(root / "images")], out, cfg, say=lambda s: None)
    assert report["kept"] == N_CLEAN and shard_bytes(out) == shard_bytes(curated[0])


def test_tar_and_list_inputs_keep_their_own_captions(toy, tmp_path):
    import io

    from PIL import Image

    root, kinds = toy
    names = sorted(n for n, k in kinds.items() if k == "clean")[:6]
    tar_path = tmp_path / "in.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, name in enumerate(names[:4]):
            members = [(f"s{i:03d}.png", (root / "images" / name).read_bytes())]
            if i != 3:  # the last sample brings no caption
                members.append((f"s{i:03d}.txt", f"tar caption {i}".encode()))
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    listing = tmp_path / "list.jsonl"
    rows = [{"path": str(root / "images" / n), "caption": f"list caption {n}"} for n in names[4:]]
    rows.append({"path": str(tmp_path / "gone.png"), "caption": "a file that is not there"})
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert Image.open(root / "images" / names[0]).size
    out = str(tmp_path / "out")
    cfg = config(root, None, caption__enabled=False)
    report = curate([str(tar_path), str(listing)], out, cfg, say=lambda s: None)
    manifest = {r["id"]: r for r in read_parquet(os.path.join(out, "manifest.parquet"))}
    assert report["kept"] == 5 and manifest[f"{tar_path}#s003"]["dropped_by"] == "caption"
    assert manifest[f"{tar_path}#s001"]["caption"] == "tar caption 1"
    assert manifest[str(root / "images" / names[5])]["caption"] == f"list caption {names[5]}"
    gone = manifest[str(tmp_path / "gone.png")]
    assert gone["dropped_by"] == "decode" and gone["decode_error"] == "unreadable" and "cannot read" in gone["decode_detail"]
    assert report["decode_errors"] == {"unreadable": 1}


def test_missing_weights_and_bad_values_are_one_line(toy, tmp_path, capsys):
    root, _ = toy
    status, _, err = main(capsys, str(root / "images"), "--out", str(tmp_path / "o"), "--embedder", "toy",
                          "--no-caption")
    assert status == 2 and err.count("\n") == 1 and "the nsfw stage is on but nsfw.model is not set" in err
    status, _, err = main(capsys, str(root / "images"), "--out", str(tmp_path / "o2"), "--set", "luminance.max_score=2")
    assert status == 2 and "luminance bounds" in err
    status, _, err = main(capsys, str(tmp_path / "missing"), "--out", str(tmp_path / "o3"))
    assert status == 2 and "does not exist" in err


def test_calibrate_prints_percentiles_and_draws_histograms(toy, tmp_path, capsys):
    root, _ = toy
    out = tmp_path / "cal"
    status, printed, err = main(capsys, "calibrate", str(root / "images"), "--out", str(out), "--config",
                                config_file(root, None), "--sample", "20")
    assert status == 0, err
    result = json.loads((out / "calibration.json").read_text())
    assert result["images"] == 20 and set(result["stages"]) == {"area", "clarity", "entropy", "luminance", "dedup"}
    for stage, s in result["stages"].items():
        assert s["p1"] <= s["p50"] <= s["p99"] and 0 <= s["would_drop"] <= 1
        assert (out / f"{stage}.png").stat().st_size > 1000
    assert "clarity" in printed and "would drop" in printed
    assert TOY_SETTINGS["clarity"]["min_score"] == result["stages"]["clarity"]["threshold_low"]
