"""The demo's RL stage (`lens-fast demo --rl FOLDER --quick`) end to end from an exported
model folder, with the narrow-vs-taxonomy ablation; and RL under torchrun (FSDP2 on two
ranks, the engine's rollout copy gathered from the shards) following one process."""
import json
import os

import pytest
from PIL import Image

from lens_fast.toy.demo import TAG_ORDER, build_config, build_model
from lens_fast.toy.demo_cli import main
from lens_fast.toy.rl_stage import main as stage_main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo_model")
    build_model(build_config(True)).save_pretrained(str(folder / "transformer"))
    return str(folder)


def test_quick_rl_stage_and_its_narrow_ablation_from_the_exported_model(exported, tmp_path):
    out = tmp_path / "rl"
    assert main(["--quick", "--rl", exported, "--ablation", "narrow", "--out", str(out)]) == 0
    for name in ("samples.png", "reward.png", "report.md", "report.json", "taxonomy/prompts.jsonl"):
        assert (out / name).is_file(), name
    assert Image.open(out / "samples.png").size[1] > 3 * 36  # before, after (taxonomy), after (narrow)
    report = json.loads((out / "report.json").read_text())
    assert set(report["arms"]) == {"taxonomy", "narrow"}
    arm = report["arms"]["taxonomy"]
    assert arm["steps"] == 2 and len(arm["reward_curve"]) == 2 and arm["rollouts"] == 8
    assert os.path.isfile(os.path.join(arm["export"], "config.json"))
    for res in (report["before"], arm["after"], report["arms"]["narrow"]["after"]):
        assert set(res["scores"]) == {"as_written", "rewritten"}
        assert set(res["scores"]["rewritten"]["per_tag"]) == set(TAG_ORDER) and res["diversity"]["mean"] > 0
    assert set(arm["targets"]) >= {"overall_gain", "tags_met", "diversity_ratio"}
    narrow = report["arms"]["narrow"]
    assert narrow["coverage"]["kinds"] == {"object": 6} and narrow["coverage"]["axes"]["color"]["missing"]
    assert all(set(p["per_tag"]) <= {"single_object"} for p in narrow["reward_curve"])
    md = (out / "report.md").read_text()
    assert "Targets" in md and "after (narrow)" in md
    with pytest.raises(FileExistsError, match="not empty"):
        stage_main(["--quick", "--policy", exported, "--out", str(out)])


def test_two_ranks_under_torchrun_match_one_process(tmp_path, train_metrics):
    """FSDP2 on the policy and the frozen old and reference policies (gloo, CPU), rollouts
    through the engine on a copy gathered from the shards: two ranks follow one process
    that runs the same prompts as two micro-batches."""
    from lens_fast import LensTransformer2DModel
    from lens_fast.rl.prompts import build_prompt_set, load_taxonomy, write_prompt_set
    from lens_fast.tiny import randomize_
    from lens_fast.toy.text import DEFAULT_LAYERS, HIDDEN
    from lens_fast.train import load_config

    transformer = dict(load_config("tiny-cpu").model.transformer, enc_hidden_dim=HIDDEN,
                       selected_layer_index=list(DEFAULT_LAYERS))
    randomize_(LensTransformer2DModel(**transformer), 5, std=0.08).save_pretrained(str(tmp_path / "start"))
    prompts = write_prompt_set(str(tmp_path / "set.jsonl"), build_prompt_set(load_taxonomy("toy")))
    args = ["--config", "tiny-cpu", "--recipe", "rl", "--pretrained", str(tmp_path / "start"),
            "--no-progress", "--max-steps", "2", "--set", "logging.every=1", "--set", f"rl.prompts={prompts}",
            "--set", "encoders.text_encoder=minilm", "--set", "rl.rewrite=toy", "--set", "rl.rewards={shapeeval: 1}",
            "--set", "rl.prompts_per_step=4", "--set", "rl.images_per_prompt=2", "--set", "rl.height=24",
            "--set", "rl.width=24", "--set", "rl.sample_steps=3", "--set", "rl.frozen_dtype=float32",
            "--set", "rl.rollout_dtype=float32", "--set", "rl.kl_weight=0.1", "--set", "parallel.param_dtype=float32"]
    two = train_metrics(args, tmp_path / "two", ranks=2)
    one = train_metrics(args, tmp_path / "one", "--set", "train.grad_accum=2")
    assert sorted(two) == [1, 2] and two[2]["world"] == 2
    for step, r in one.items():
        for key in ("loss", "reward", "reward_std", "kl", "advantage_abs"):
            assert two[step][key] == pytest.approx(r[key], rel=1e-4, abs=1e-7), (step, key)
