"""The rubric judge against a real local chat-completions server process (loopback) with
the toy world's VLM stand-in as its handler: success, 429 then success, timeouts,
malformed answers (retried, then one clear error naming the prompt), the answer cache;
and a judge-backed `lens-fast train --recipe rl` run that stops on a judge answering
garbage and resumes from its last checkpoint to the uninterrupted run's weights."""
import pytest
import torch

from lens_fast.chat_api import ChatEndpoint
from lens_fast.chat_server import LocalChatServer
from lens_fast.rl.judge import RubricJudge, parse_judgement
from lens_fast.rl.prompts import build_prompt_set, load_taxonomy, write_prompt_set
from lens_fast.rl.rewards import RewardError, WeightedReward
from lens_fast.toy.reward import ShapeEvalReward
from lens_fast.toy import render_scene, rewrite_scene

HANDLER = "lens_fast.toy.judge:answer"


@pytest.fixture(scope="module")
def server():
    with LocalChatServer(HANDLER, model="toy-vlm") as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(server):
    server.reset()


def judge(server, cache=None, **kw):
    kw = {"backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, "max_retries": 2, **kw}
    return RubricJudge(ChatEndpoint(server.url, "toy-vlm", **kw), cache_dir=cache)


@pytest.fixture(scope="module")
def cases():
    """Prompt records with a render that satisfies each (what the rewriter would draw)."""
    records = build_prompt_set(load_taxonomy("toy"), seed=1)
    picked = [next(r for r in records if r["kind"] == k) for k in ("count", "relation", "attribute_binding")]
    picked.append(next(r for r in records if r["metadata"].get("background")))
    images = [render_scene(rewrite_scene(r["prompt"], seed=3), 72, 72) for r in picked]
    return picked, images


def test_judge_scores_rubric_items_and_the_global_rule(server, cases):
    records, images = cases
    results = judge(server).score(images, [r["prompt"] for r in records], records)
    for r, res in zip(records, results):
        assert res.score == 1.0 and list(res.items) == r["rubric"] + ["global rule"], (r["prompt"], res.items)
    # The same images judged against prompts they do not satisfy: their items fail, the global rule holds.
    swapped = records[1:] + records[:1]
    results = judge(server).score(images, [r["prompt"] for r in swapped], swapped)
    assert all(res.score < 1.0 and res.items["global rule"] == 1.0 for res in results)
    assert server.stats()["requests"] == 2 * len(records)
    body = server.stats()["bodies"][-1]
    assert body["model"] == "toy-vlm" and body["messages"][1]["content"][1]["type"] == "image_url"


def test_answers_are_cached_by_image_rubric_and_model(server, cases, tmp_path):
    records, images = cases
    prompts = [r["prompt"] for r in records]
    first = judge(server, cache=str(tmp_path)).score(images, prompts, records)
    again = judge(server, cache=str(tmp_path)).score(images, prompts, records)
    assert [r.score for r in first] == [r.score for r in again]
    assert server.stats()["requests"] == len(records)  # the second pass asked nothing
    edited = [dict(records[1], rubric=records[1]["rubric"][:1])]
    judge(server, cache=str(tmp_path)).score(images[1:2], prompts[1:2], edited)
    assert server.stats()["requests"] == len(records) + 1  # another rubric: another question
    other = RubricJudge(ChatEndpoint(server.url, "other-vlm"), cache_dir=str(tmp_path))
    other.score(images[:1], prompts[:1], records[:1])
    assert server.stats()["requests"] == len(records) + 2  # another judge model: another question


def test_429_then_success(server, cases):
    records, images = cases
    server.add_faults({"status": 429, "retry_after": 0.01})
    results = judge(server, max_concurrency=1).score(images[:1], [records[0]["prompt"]], records[:1])
    assert results[0].score == 1.0 and server.stats()["requests"] == 2


def test_timeout_then_success_and_a_judge_that_stays_slow(server, cases):
    records, images = cases
    server.add_faults({"delay_s": 1.0})
    assert judge(server, timeout_s=0.3).score(images[:1], [records[0]["prompt"]], records[:1])[0].score == 1.0
    server.add_faults(*[{"delay_s": 1.0}] * 3)
    with pytest.raises(RewardError, match=rf"no usable answer for prompt '{records[0]['prompt']}' \(image 0\) after "
                                          r"3 attempts: .*timed out after 0.3 s"):
        judge(server, timeout_s=0.3).score(images[:1], [records[0]["prompt"]], records[:1])


def test_malformed_answer_retried_then_a_clear_error(server, cases):
    records, images = cases
    server.add_faults({"content": "The image looks great!"})
    assert judge(server).score(images[:1], [records[0]["prompt"]], records[:1])[0].score == 1.0
    assert server.stats()["requests"] == 2
    server.add_faults(*[{"content": '{"items": [1], "global": 7}'}] * 3)
    with pytest.raises(RewardError, match="unusable answer: the judge's answer must be"):
        judge(server).score(images[:1], [records[0]["prompt"]], records[:1])
    server.add_faults(*[{"body": "<html>502 Bad Gateway</html>"}] * 3)
    with pytest.raises(RewardError, match="is not JSON"):
        judge(server).score(images[:1], [records[0]["prompt"]], records[:1])


def test_parse_judgement():
    assert parse_judgement('```json\n{"items": [1, 0.5], "global": 0}\n```', 2) == {"items": [1.0, 0.5],
                                                                                    "global": 0.0}
    for bad in ('{"items": [1], "global": 1}', '{"items": [1, 2], "global": 1}', '{"items": [1, true], "global": 1}',
                '{"items": [1, 1]}', "yes"):
        with pytest.raises(ValueError):
            parse_judgement(bad, 2)


def test_rewards_compose_with_weights(server, cases):
    records, images = cases
    prompts = [r["prompt"] for r in records]
    both = WeightedReward([(ShapeEvalReward(), 2.0), (judge(server), 0.5)])
    shape = ShapeEvalReward().score(images, prompts, records)
    vlm = judge(server).score(images, prompts, records)
    for out, a, b in zip(both.score(images, prompts, records), shape, vlm):
        assert out.score == pytest.approx(2.0 * a.score + 0.5 * b.score)
        assert set(out.items) == {f"shapeeval/{k}" for k in a.items} | {f"judge/{k}" for k in b.items}


def test_judge_backed_run_stops_on_garbage_and_resumes_to_the_uninterrupted_run(server, tmp_path, monkeypatch,
                                                                                 capsys):
    from lens_fast import LensTransformer2DModel
    from lens_fast.tiny import randomize_
    from lens_fast.toy.text import DEFAULT_LAYERS, HIDDEN
    from lens_fast.train import load_config
    from lens_fast.train.cli import main as train_main

    torch.set_num_threads(1)
    transformer = dict(load_config("tiny-cpu").model.transformer, enc_hidden_dim=HIDDEN,
                       selected_layer_index=list(DEFAULT_LAYERS))  # MiniLM's features
    randomize_(LensTransformer2DModel(**transformer), 5, std=0.08).save_pretrained(str(tmp_path / "start"))
    prompts = write_prompt_set(str(tmp_path / "set.jsonl"), build_prompt_set(load_taxonomy("toy")))
    monkeypatch.setenv("LENS_JUDGE_BASE_URL", server.url)
    monkeypatch.setenv("LENS_JUDGE_MODEL", "toy-vlm")

    def run(out, *extra):
        return train_main(["--config", "tiny-cpu", "--recipe", "rl", "--pretrained", str(tmp_path / "start"),
                           "--out", str(tmp_path / out), "--no-progress", "--max-steps", "4",
                           "--set", f"rl.prompts={prompts}",
                           "--set", "encoders.text_encoder=minilm", "--set", "rl.rewrite=toy",
                           "--set", "rl.rewards={judge: 1.0}", "--set", "rl.prompts_per_step=2",
                           "--set", "rl.images_per_prompt=2", "--set", "rl.height=24", "--set", "rl.width=24",
                           "--set", "rl.sample_steps=3", "--set", "rl.frozen_dtype=float32",
                           "--set", "rl.rollout_dtype=float32", "--set", "checkpoint.every=2",
                           "--set", "rl.judge_options={backoff_s: 0.01, max_retries: 1}", *extra])

    assert run("whole") == 0
    capsys.readouterr()
    server.reset()
    server.add_faults(*[{}] * 8, *[{"content": "no idea"}] * 8)  # steps 1-2 answered, then garbage
    assert run("cut") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "step 3: judge toy-vlm" in err[0] and "no usable answer for prompt" in err[0]
    assert "rerun with --resume" in err[0]
    assert (tmp_path / "cut" / "checkpoints" / "step_2").is_dir()
    server.reset()
    assert run("cut", "--resume") == 0
    from lens_fast.train.checkpoint import load_checkpoint_weights

    a = load_checkpoint_weights(str(tmp_path / "whole" / "checkpoints" / "step_4"))
    b = load_checkpoint_weights(str(tmp_path / "cut" / "checkpoints" / "step_4"))
    assert all(torch.equal(a[k], b[k]) for k in a)
