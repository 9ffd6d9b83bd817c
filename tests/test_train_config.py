"""Trainer configs, buckets and the command line's argument and folder checks."""
import json
import os

import pytest

from lens_fast.resolutions import RESOLUTION_BUCKETS
from lens_fast.train import REGISTRY, BucketTable, ConfigError, TrainConfig, bucket_size, load_config
from lens_fast.train.cli import main


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registered_configs_validate_and_round_trip(name):
    cfg = load_config(name)
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert cfg.optim.grad_clip == 1.0


def test_stage1_is_one_low_square_resolution_at_24_per_gpu():
    cfg = load_config("stage1")
    table = BucketTable.from_config(cfg.data)
    assert [(b.height, b.width, b.batch) for b in table.all()] == [(512, 512, 24)]
    assert 24 * 128 == 3072 and cfg.train.max_steps == 400_000
    assert cfg.optim.warmup_steps > 0 and cfg.parallel.param_dtype == "bfloat16"


def test_stage2_has_27_buckets_of_about_24k_tokens_per_gpu():
    table = BucketTable.from_config(load_config("stage2").data)
    assert len(table) == 27
    for b in table.all():
        assert b.height % 16 == 0 and b.width % 16 == 0
        tokens = b.batch * (b.height // 16) * (b.width // 16)
        assert abs(tokens - 24576) / 24576 < 0.15, (b, tokens)
    assert {b.batch for b in table.all()} == {24, 10, 6}
    # The 1024 buckets are the official inference resolutions.
    for ratio, (h, w) in RESOLUTION_BUCKETS[1024].items():
        assert table.get(1024, ratio).height == h and table.get(1024, ratio).width == w


def test_finetune_starts_lower_and_needs_a_folder_only_when_run():
    ft, s2 = load_config("finetune"), load_config("stage2")
    assert ft.optim.lr < s2.optim.lr and ft.model.pretrained is None


def test_bucket_geometry():
    assert bucket_size(512, "1:1") == (512, 512)
    h, w = bucket_size(640, "5:4")  # not an official ratio: area-preserving formula
    assert h % 16 == 0 and w % 16 == 0 and w > h and abs(h * w - 640 ** 2) / 640 ** 2 < 0.05
    table = BucketTable([256], ["1:2", "1:1", "2:1"], {256: 4}, multiple=16)
    assert table.nearest_ratio(300, 600) == "1:2"  # W:H = 1:2 is portrait
    assert table.nearest_ratio(620, 600) == "1:1"
    assert table.nearest_ratio(1000, 480) == "2:1"
    with pytest.raises(ValueError, match="ratio 'x:2'"):
        bucket_size(512, "x:2")


@pytest.mark.parametrize("data,match", [
    ({"optim": {"lrr": 1}}, r"unknown key optim\.lrr"),
    ({"optimizer": {}}, "unknown section 'optimizer'"),
    ({"model": {"transformer": {"num_blocks": 2}}}, r"unknown model\.transformer key\(s\) \['num_blocks'\]"),
    ({"optim": {"lr": -1.0}}, r"optim\.lr=-1\.0: expected a finite positive number"),
    ({"data": {"areas": [500]}}, r"data\.areas has 500: expected positive multiples of data\.multiple=16"),
    ({"data": {"areas": [256]}}, r"no batch size for area\(s\) \[256\]"),
    ({"parallel": {"activation_checkpointing": "some"}}, "activation_checkpointing='some'"),
    ({"loss": {"caption_dropout": 1.5}}, r"caption_dropout=1\.5"),
    ({"model": {"transformer": {"out_channels": 16}}}, "must equal in_channels = 128"),
])
def test_bad_config_values_name_the_key_and_the_expectation(data, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


def test_yaml_file_with_base_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: tiny-cpu\noptim: {lr: 3.0e-4}\ndata: {areas: [32], batch_per_area: {32: 5}}\n")
    cfg = load_config(str(path))
    assert cfg.name == "tiny-cpu" and cfg.optim.lr == 3e-4 and cfg.data.batch_per_area == {32: 5}
    assert cfg.model.transformer["num_layers"] == 2  # inherited
    cfg.override(["train.max_steps=7", "loss.mu_points=[[64, 0.0], [256, 1.0]]"])
    assert cfg.train.max_steps == 7 and cfg.loss.mu_points == [[64, 0.0], [256, 1.0]]
    with pytest.raises(ConfigError, match="expected section.key=value"):
        cfg.override(["max_steps=3"])
    (tmp_path / "bad.yaml").write_text("base: stage9\n")
    with pytest.raises(ConfigError, match="base 'stage9' is not a registered config"):
        load_config(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="neither a registered config"):
        load_config("stage9")


def test_cli_errors_return_2_with_one_line(tmp_path, capsys):
    assert main(["--config", "stage9"]) == 2
    assert "neither a registered config" in capsys.readouterr().err
    assert main(["--config", "tiny-cpu", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["--config", "tiny-cpu", "--set", "optim.nope=1"]) == 2
    assert "unknown key optim.nope" in capsys.readouterr().err
    assert main(["--list-configs"]) == 0
    assert "stage2" in capsys.readouterr().out
    assert main(["--config", "tiny-cpu", "--print-config", "--max-steps", "3"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out


def test_out_folder_of_another_run_is_refused_unless_resume(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    assert main(["--config", "tiny-cpu", "--out", str(user), "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds files (notes.txt)" in err and "--resume" in err
    assert main(["--config", "tiny-cpu", "--out", str(user), "--resume", "--no-progress"]) == 2
    assert "not a lens_fast training run" in capsys.readouterr().err
    assert sorted(os.listdir(user)) == ["notes.txt"] and (user / "notes.txt").read_text() == "precious"
    # A run of a different model is refused on --resume too.
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"model_config": {"num_layers": 7}}))
    assert main(["--config", "tiny-cpu", "--out", str(other), "--resume", "--no-progress"]) == 2
    assert "trained a different model" in capsys.readouterr().err


def test_every_recipe_a_config_can_name_is_registered():
    from lens_fast.train.config import RECIPES
    from lens_fast.train.recipes import RECIPE_CLASSES

    assert set(RECIPES) == set(RECIPE_CLASSES)
