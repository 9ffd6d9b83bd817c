"""The demo's distillation stage (python -m lens_fast.toy.lifecycle --teacher): a quick
run from an exported folder of the demo's model writes the side-by-side report."""
import json
import os

import pytest
from PIL import Image

from lens_fast.toy.demo import TAG_ORDER, build_config, build_model
from lens_fast.toy.distill_stage import diversity
from lens_fast.toy.lifecycle import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_distill_stage_from_an_exported_teacher_writes_the_report(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    build_model(build_config(True)).save_pretrained(str(teacher / "transformer"))
    out = tmp_path / "lifecycle"
    assert main(["--quick", "--teacher", str(teacher), "--out", str(out)]) == 0
    report = json.loads((out / "distill" / "report.json").read_text())
    assert report["variant"] == "lens-turbo" and report["recommended"] == [4, 1.0]
    assert (out / "distill" / "run" / "export" / "transformer" / "config.json").is_file()
    rows = [(r["model"], r["steps"], r["guidance"], r["nfe"]) for r in report["rows"]]
    assert rows == [("teacher", 6, 2.0, 12), ("teacher", 4, 2.0, 8), ("teacher", 4, 1.0, 4), ("student", 4, 1.0, 4),
                    ("teacher", 2, 1.0, 2), ("student", 2, 1.0, 2), ("teacher", 1, 1.0, 1), ("student", 1, 1.0, 1)]
    for r in report["rows"]:
        assert r["seconds_per_image"] > 0
        for mode in ("as_written", "rewritten"):
            assert set(r["scores"][mode]["per_tag"]) == set(TAG_ORDER) and r["scores"][mode]["n"] == 6
    assert [(r["model"], r["steps"], r["guidance"]) for r in report["second_set"]] == [x[:3] for x in rows[:4]]
    for o in report["second_set"]:  # a second draw of the headline scores, on other prompts
        assert all(set(o["scores"][m]["per_tag"]) == set(TAG_ORDER) and o["scores"][m]["n"] == 6 for m in o["scores"])
    for mode in ("as_written", "rewritten"):
        for name in ("teacher", "teacher_4_steps", "student"):
            d = report["diversity"][mode][name]
            assert len(d["per_prompt"]) == 3 and 0 < d["mean"] < 1
    assert set(report["targets"]) == {"score_ratio", "score_ratio_met", "above_teacher_4_steps_by",
                                      "above_teacher_4_steps_met", "diversity_ratio", "diversity_met", "both_sets"}
    assert report["steps"] == 3
    with Image.open(out / "distill" / "samples.png") as grid:  # labelled rows (teacher 6 and 4 steps, student) x 3 prompts
        assert grid.size == (150 + 3 * (36 * 3 + 4), 14 + 3 * (36 * 3 + 4))
    md = (out / "report.md").read_text()
    assert "## distill" in md and "student" in md and "Targets" in md
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["--quick", "--teacher", str(teacher), "--out", str(out)]) == 2  # nothing written over
    assert "is not empty" in capsys.readouterr().err and sorted(p.name for p in out.rglob("*")) == before


def test_quick_lifecycle_from_a_policy_runs_rl_then_distils_the_rl_model(tmp_path):
    policy = tmp_path / "policy"
    build_model(build_config(True)).save_pretrained(str(policy / "transformer"))
    out = tmp_path / "lifecycle"
    assert main(["--quick", "--policy", str(policy), "--out", str(out)]) == 0
    rl = json.loads((out / "rl" / "report.json").read_text())
    distill = json.loads((out / "distill" / "report.json").read_text())
    assert rl["policy"] == str(policy.resolve())
    assert distill["teacher"] == os.path.abspath(rl["arms"]["taxonomy"]["export"])  # each stage from the last's export
    assert distill["variant"] == "lens-turbo"
    md = (out / "report.md").read_text()
    assert md.index("## rl") < md.index("## distill")


def test_the_lifecycle_takes_a_policy_or_a_teacher_not_both(tmp_path, capsys):
    policy = tmp_path / "policy"
    build_model(build_config(True)).save_pretrained(str(policy / "transformer"))
    assert main(["--policy", str(policy), "--teacher", str(policy), "--out", str(tmp_path / "out")]) == 2
    assert "not allowed with argument" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("teacher, expected", [("absent", "--teacher {} does not exist"),
                                               (".", "--teacher {} is not a Lens checkpoint")])
def test_the_lifecycle_refuses_a_bad_teacher_in_one_line_before_any_work(tmp_path, capsys, teacher, expected):
    path = str(tmp_path / teacher)
    assert main(["--teacher", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected.format(path) in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_diversity_is_the_mean_pairwise_pixel_distance_per_prompt():
    black, white, grey = (Image.new("RGB", (4, 4), c) for c in ((0, 0, 0), (255, 255, 255), (51, 51, 51)))
    # two prompts, three seeds: prompt 0 sees black/white/black (pairs 1, 0, 1), prompt 1 grey three times
    assert diversity([[black, grey], [white, grey], [black, grey]]) == pytest.approx([2 / 3, 0.0])
