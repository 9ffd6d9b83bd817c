"""The built-in demo: `lens-fast demo --quick` end to end, and its text features."""
import json

import pytest
import torch
from PIL import Image

from lens_fast.toy.demo import TAG_ORDER
from lens_fast.toy.demo_cli import main
from lens_fast.toy.text import HIDDEN, MiniLMTextEncoder


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


def test_minilm_features_follow_the_multi_layer_contract(minilm):
    feats, mask = minilm.encode(["a red circle", "two blue squares above a green triangle"])
    assert len(feats) == 3 and all(f.shape == (2, mask.shape[1], HIDDEN) for f in feats)
    assert mask[1].all() and not mask[0].all()  # right padding of the shorter prompt
    assert torch.count_nonzero(feats[0][0, ~mask[0]]) == 0
    # Per-prompt cache: the same prompt alone gives the same valid features.
    alone, m = minilm.encode(["a red circle"])
    torch.testing.assert_close(alone[2][0, m[0]], feats[2][0, mask[0]])
    assert not torch.allclose(feats[0][0, 0], feats[2][0, 0])  # different layers really differ


def test_quick_demo_writes_every_artefact(tmp_path):
    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out)]) == 0
    for name in ("samples.png", "loss.png", "report.md", "report.json"):
        assert (out / name).is_file(), name
    assert Image.open(out / "samples.png").size[0] > 100
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]["per_tag"]) == set(TAG_ORDER)
    assert all(0.0 <= report["scores"]["per_tag"][t] <= 1.0 for t in TAG_ORDER)
    assert report["steps"] > 0 and report["throughput"]["samples_per_s"] > 0
    assert report["untrained"]["overall"] <= 0.1
    # both prompt modes are scored (brief prompts as written, and their rewrites), before and after training
    assert report["prompts"] == "rewritten"
    for key in ("scores_by_prompts", "untrained_by_prompts"):
        assert set(report[key]) == {"as_written", "rewritten"}
        for sc in report[key].values():
            assert set(sc["per_tag"]) == set(TAG_ORDER) and sc["n"] == report["scores"]["n"] > 0
    assert report["scores"] == report["scores_by_prompts"]["rewritten"]
    assert all(sc["overall"] <= 0.1 for sc in report["untrained_by_prompts"].values())
    md = (out / "report.md").read_text()
    assert all(t in md for t in TAG_ORDER) and "overall" in md
    assert "as_written" in md and "rewritten" in md
    # the trained (EMA) model is saved and loads back with its configuration
    from lens_fast.toy.demo import build_config, load_demo_model

    model, cfg = load_demo_model(str(out))
    assert cfg == build_config(True) and cfg.steps == report["config"]["steps"]
    assert sum(p.abs().sum() for p in model.parameters()) > 0
    assert report["steps"] == 120 and len(report["weights_sha256"]) == 16 and report["machine"]["threads"] == 2
    assert main(["--quick", "--out", str(out)]) == 2  # nothing is overwritten


def test_quick_resolution_ablation_reports_both_arms_on_unseen_aspect_ratios(tmp_path):
    out = tmp_path / "ablation"
    assert main(["--quick", "--ablation", "resolution", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"buckets", "square-only"}
    for arm in report.values():
        assert set(arm["scores"]["per_tag"]) == set(TAG_ORDER)
        assert arm["eval_sizes"] == [[24, 52], [52, 24]]  # 1:2 and 2:1 around 36x36, trained by neither arm
    # equal compute: the same number of optimiser steps in both arms
    assert report["buckets"]["steps"] == report["square-only"]["steps"] > 0
    assert report["buckets"]["config"]["ratios"] == [[2, 3], [1, 1], [3, 2]]
    assert report["square-only"]["config"]["ratios"] == [[1, 1]]
    md = (out / "report.md").read_text()
    assert "buckets" in md and "square-only" in md and "overall" in md
    for arm in ("buckets", "square-only"):
        assert (out / arm / "samples.png").is_file()


def test_demo_model_starts_as_adaln_zero():
    from lens_fast.toy.demo import build_config, build_model

    model = build_model(build_config(True))
    sd = model.state_dict()
    assert torch.count_nonzero(sd["proj_out.weight"]) == 0
    assert torch.count_nonzero(sd["transformer_blocks.0.img_mod.1.weight"]) == 0
    assert torch.count_nonzero(sd["transformer_blocks.0.img_mlp.w1.weight"]) > 0


def test_quick_captions_ablation_reports_every_arm_under_both_prompt_modes(tmp_path):
    out = tmp_path / "captions"
    assert main(["--quick", "--ablation", "captions", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"dense", "brief", "mixed", "layout"}
    assert len({arm["steps"] for arm in report.values()}) == 1  # equal optimiser steps per arm
    for mode, arm in report.items():
        assert arm["config"]["captions"] == mode
        for sc in arm["scores_by_prompts"].values():
            assert set(sc["per_tag"]) == set(TAG_ORDER)
    md = (out / "report.md").read_text()
    assert all(f"| {m} | " in md for m in report) and md.count("rewritten") >= 4


def test_a_run_folder_of_an_older_demo_version_still_loads(tmp_path):
    """Older demos wrote keys the config no longer has (max_train_seconds before the fixed
    step budget): the folder's model and config still load."""
    import json
    from dataclasses import asdict

    from lens_fast.toy.demo import build_config, build_model, load_demo_model

    cfg = build_config(True)
    build_model(cfg).save_pretrained(str(tmp_path / "transformer"))
    (tmp_path / "report.json").write_text(json.dumps({"config": {**asdict(cfg), "max_train_seconds": 480}}))
    model, loaded = load_demo_model(str(tmp_path))
    assert loaded == cfg and sum(p.numel() for p in model.parameters()) > 0
