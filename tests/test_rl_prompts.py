"""Taxonomy-driven prompt sets (lens-fast rl-prompts): the toy taxonomy is the toy world's,
prompts are distinct and never name a held-out composition, every prompt's rubric and
metadata agree with a render that satisfies it (ShapeEval reward and the toy judge both
give 1), coverage, and one clear line for a bad taxonomy or prompt set."""
import json

import pytest

from lens_fast.cli import main as cli
from lens_fast.rl.prompts import (PromptSetError, build_prompt_set, coverage, load_prompt_set, load_taxonomy,
                                  write_prompt_set)
from lens_fast.toy.reward import ShapeEvalReward
from lens_fast.toy import (BACKGROUNDS, CLASSES, COLORS, HELDOUT_COLOR_CLASS, HELDOUT_LAYOUTS, RELATIONS, parse_prompt,
                           render_scene, rewrite_scene)
from lens_fast.toy.judge import judge_item
from lens_fast.toy.shapeeval import detect_objects


@pytest.fixture(scope="module")
def toy():
    return load_taxonomy("toy")


def test_the_toy_taxonomy_is_the_toy_worlds(toy):
    assert toy["categories"] == list(CLASSES) and toy["attributes"] == {"color": list(COLORS)}
    assert sorted(toy["relations"]) == sorted(RELATIONS) and toy["settings"] == {"background": list(BACKGROUNDS)}
    assert toy["exclude_pairs"] == {(c, k) for c, k in HELDOUT_COLOR_CLASS}
    assert toy["exclude_relations"] == set(HELDOUT_LAYOUTS)


def test_prompts_are_distinct_never_held_out_and_cover_the_taxonomy(toy):
    records = build_prompt_set(toy)
    assert records == build_prompt_set(toy)  # fixed by the seed
    assert len({r["prompt"] for r in records}) == len(records) == sum(toy["kinds"].values())
    for r in records:
        spec = parse_prompt(r["prompt"])  # the toy rewriter reads every prompt
        named = {(c, k) for _, c, k in spec["objects"] if c}
        assert not named & set(HELDOUT_COLOR_CLASS), r["prompt"]
        if spec["relation"]:
            rel, i, j = spec["relation"]
            assert (spec["objects"][i][2], rel, spec["objects"][j][2]) not in HELDOUT_LAYOUTS
    report = coverage(records, toy)
    assert report["kinds"] == toy["kinds"]
    assert all(not axis["missing"] for axis in report["axes"].values())
    assert report["combinations"]["category x attribute"] == {"covered": 14, "possible": 14}
    assert report["combinations"]["category x relation x category"] == {"covered": 18, "possible": 18}
    narrow = coverage(build_prompt_set(toy, kinds=["object"]), toy)
    assert narrow["prompts"] == 6 and narrow["axes"]["color"]["missing"] == list(COLORS)
    assert narrow["combinations"]["category x count"]["covered"] == 0


def test_rubric_and_metadata_agree_with_a_render_that_satisfies_the_prompt(toy):
    records = build_prompt_set(toy, seed=2)
    reward = ShapeEvalReward()
    for r in records[::5]:
        image = render_scene(rewrite_scene(r["prompt"], seed=1), 72, 72)
        res = reward.score([image], [r["prompt"]], [r])[0]
        assert res.score == 1.0, (r["prompt"], res.detail)
        objects, info = detect_objects(image)
        assert all(judge_item(item, objects, info["background"]) == 1.0 for item in r["rubric"]), r["prompt"]
    wrong = render_scene(rewrite_scene("a yellow square", seed=1), 72, 72)
    res = reward.score([wrong], ["two circles"], [next(r for r in records if r["prompt"] == "two circles")])[0]
    assert res.items == {"2 circles": 0.0, "clean": 1.0} and res.score == 0.5 and res.detail == "expected 2 circles, found 0"


def test_cli_writes_a_set_reports_coverage_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "set.jsonl"
    assert cli(["rl-prompts", "--taxonomy", "toy", "--out", str(out), "--coverage", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "150 prompts from taxonomy lens-world" in printed and "category x attribute: 14/14 covered" in printed
    records = load_prompt_set(str(out))
    assert len(records) == 150 and all(r["rubric"] and r["global_rule"] for r in records)
    assert json.loads((tmp_path / "c.json").read_text())["prompts"] == 150
    assert cli(["rl-prompts", "--taxonomy", "toy", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("kinds: {object: 3}\nglobal_rule: clean\n", "categories must be a non-empty list"),
    ("categories: [cat]\nkinds: {objects: 3}\nglobal_rule: clean\n", "unknown kind 'objects'"),
    ("categories: [cat, dog]\nkinds: {relation: 3}\nglobal_rule: clean\n", "kind relation needs relations"),
    ("categories: [cat]\nkinds: {object: 3}\n", "global_rule must be a sentence"),
    ("categories: [cat]\nkinds: {object: 3}\nglobal_rule: x\ncolours: []\n", "unknown key(s) ['colours']"),
    ("categories: [cat\n", "is not valid YAML/JSON"),
    ("- a list\n", "expected a mapping"),
])
def test_bad_taxonomy_is_one_clear_line(tmp_path, capsys, text, message):
    path = tmp_path / "tax.yaml"
    path.write_text(text)
    assert cli(["rl-prompts", "--taxonomy", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(path) in err[0]


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("\n\n", "is empty"),
    ('{"prompt": "a cat", "rubric": ["a cat"]}\nnot json\n', "line 2 is not JSON"),
    ('{"rubric": ["a cat"]}\n', "line 1: expected an object with a non-empty \"prompt\""),
    ('{"prompt": "a cat", "rubric": []}\n', "line 1 (prompt 'a cat'): \"rubric\" must be a non-empty list"),
    ('{"prompt": "a cat", "rubric": ["x"], "metadata": 3}\n', "\"metadata\" must be a mapping"),
])
def test_bad_prompt_set_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "set.jsonl"
    path.write_text(text)
    with pytest.raises(PromptSetError) as e:
        load_prompt_set(str(path))
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_train_cli_refuses_a_bad_prompt_set_before_anything_is_written(tmp_path, capsys):
    from lens_fast import LensTransformer2DModel
    from lens_fast.train import load_config
    from lens_fast.train.cli import main as train_main

    LensTransformer2DModel(**load_config("tiny-cpu").model.transformer).save_pretrained(str(tmp_path / "start"))
    (tmp_path / "set.jsonl").write_text('{"prompt": "a cat"}\n')
    args = ["--config", "tiny-cpu", "--recipe", "rl", "--pretrained", str(tmp_path / "start"), "--out",
            str(tmp_path / "run"), "--set", "rl.rewards={shapeeval: 1}"]
    assert train_main(args + ["--set", f"rl.prompts={tmp_path / 'set.jsonl'}"]) == 2
    assert train_main(args + ["--set", f"rl.prompts={tmp_path / 'none.jsonl'}"]) == 2
    assert train_main(args + ["--set", "rl.prompts=" + write_prompt_set(str(tmp_path / "ok.jsonl"),
                                                                        [{"prompt": "a", "rubric": ["a"]}]),
                              "--set", "rl.rewards={judge: 1}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 3 and "\"rubric\" must be a non-empty list" in err[0] and "does not exist" in err[1]
    assert "set LENS_JUDGE_BASE_URL" in err[2]
    assert not (tmp_path / "run").exists()


def test_the_toy_global_rule_wants_no_smudges_and_an_even_background():
    """Grain on a background meant to be plain broke the rule once RL found that it hid
    smudges from the segmentation: the rule checks the background's evenness too."""
    from dataclasses import replace

    from lens_fast.chat_api import user_message
    from lens_fast.rl.judge import judge_request_text
    from lens_fast.toy.judge import answer

    record = {"prompt": "a red circle", "rubric": ["there is a red circle"], "global_rule": "clean",
              "metadata": {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]}}
    scene = rewrite_scene("a red circle", seed=1)
    for texture, clean in (("flat", 1.0), ("noise", 0.0), ("gradient", 0.0)):
        image = render_scene(replace(scene, texture=texture, texture_seed=3), 72, 72)
        res = ShapeEvalReward().score([image], [record["prompt"]], [record])[0]
        assert res.items == {"1 red circle": 1.0, "clean": clean}, (texture, res.detail)
        request = {"messages": [user_message(judge_request_text(record["prompt"], record["rubric"], "clean"), [image])]}
        assert json.loads(answer(request)) == {"items": [1.0], "global": clean}
