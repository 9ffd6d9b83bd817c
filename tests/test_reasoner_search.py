"""The training-free system-prompt search: rule sets, the loop against a real local chat
server (the toy world's stand-in LLM as rewriter and proposer), its cache, and the CLI end
to end with ShapeEval on a demo model folder."""
import json

import pytest

from lens_fast.chat_api import ChatEndpoint
from lens_fast.chat_server import LocalChatServer
from lens_fast.cli import main
from lens_fast.reasoner import load_system_prompt
from lens_fast.reasoner.api import ApiBackend
from lens_fast.reasoner.metrics import MetricResult, PromptMetric, load_metric
from lens_fast.reasoner.search import (MUTATIONS, RuleSet, SearchConfig, SystemPromptSearch, parse_rules,
                                       report_markdown)
from lens_fast.toy.reasoner_llm import TOY_RULES

SEED_PROMPT = "You rewrite image requests.\n\nRules:\n- Keep everything the user asked for.\n\nAnswer with the prompt only."
PLACES = ("top", "middle", "bottom", "centre")


class LayoutCompleteness:
    """A cheap generation-free metric: the share of the toy layout caption's parts (place,
    size, colour, background) each rewrite states."""
    name = "layout-completeness"

    def __init__(self):
        self.calls = 0

    def fingerprint(self):
        return self.name

    def requests(self, split):
        return {"dev": ["a circle", "a red square above a triangle", "two squares"],
                "test": ["a triangle", "a blue circle and a square"]}[split]

    def score(self, requests, prompts, seed):
        self.calls += 1
        per = []
        for p in prompts:
            words = p.replace(",", " ").split()
            parts = [any(w in PLACES for w in words), "small" in words or "large" in words,
                     any(w in ("red", "green", "blue", "yellow", "purple", "orange") for w in words), "on" in words]
            per.append(sum(parts) / 4)
        return MetricResult(sum(per) / len(per), per, {"n": len(per)})


def test_rule_sets_round_trip_and_answers_are_parsed():
    default = load_system_prompt()
    rs = RuleSet.parse(default)
    assert rs.render() == default and len(rs.rules) == 8 and rs.closing == "Answer with the prompt only."
    assert RuleSet.parse(SEED_PROMPT).with_rules(["a", "b"]).render() == \
        "You rewrite image requests.\n\nRules:\n- a\n- b\n\nAnswer with the prompt only."
    assert parse_rules('Here you go:\n- one\n2. two\n* "three"\n- one\nThanks') == ("one", "two", "three")
    with pytest.raises(ValueError, match="expected 1 to 16 rules"):
        parse_rules("No rules here.")
    with pytest.raises(ValueError, match="has no rules"):
        RuleSet.parse("Just a paragraph.")
    assert isinstance(LayoutCompleteness(), PromptMetric)


@pytest.fixture(scope="module")
def server():
    with LocalChatServer("lens_fast.toy.reasoner_llm:answer", model="toy-llm") as s:
        yield s


def backend(server):
    return ApiBackend(ChatEndpoint(server.url, "toy-llm", timeout_s=10, max_retries=1, backoff_s=0.01))


def test_search_improves_on_the_seed_and_reports_every_candidate(server, tmp_path):
    server.reset()
    metric = LayoutCompleteness()
    logs = []
    search = SystemPromptSearch(backend(server), metric, SearchConfig(budget=6, seed=1, crossover_rate=0.3),
                                cache_dir=str(tmp_path / "cache"), log=logs.append)
    report = search.run(SEED_PROMPT)
    cands = report["candidates"]
    assert len(cands) == 6 and [c["id"] for c in cands] == list(range(6)) and cands[0]["operator"] == "seed"
    assert cands[0]["score"] == pytest.approx(1 / 12)  # as written: only the one colour a request names
    assert len({tuple(c["rules"]) for c in cands}) == 6  # no rule set scored twice
    best = max(c["score"] for c in cands)
    assert report["winner_score"] == best == cands[report["winner"]]["score"] > report["seed_score"]
    assert any(r in TOY_RULES for r in cands[report["winner"]]["rules"])
    assert all(c["parents"] and all(p < c["id"] for p in c["parents"]) for c in cands[1:])
    assert {c["operator"] for c in cands[1:]} <= {"mutation", "crossover"}
    assert all(c["instruction"] in MUTATIONS for c in cands if c["operator"] == "mutation")
    assert report["test"]["winner"]["score"] > report["test"]["seed"]["score"]  # held out of the search
    assert report["winner_system_prompt"].startswith("You rewrite image requests.")
    md = report_markdown(report)
    assert md.count("\n| ") == 7 and "(winner)" in md and "Test (2 held-out requests" in md
    assert len(logs) >= 6
    # the same search again: everything from the cache, same result, no request to the server
    requests, calls = server.stats()["requests"], metric.calls
    again = SystemPromptSearch(backend(server), metric, SearchConfig(budget=6, seed=1, crossover_rate=0.3),
                               cache_dir=str(tmp_path / "cache"), log=logs.append).run(SEED_PROMPT)
    assert server.stats()["requests"] == requests and metric.calls == calls
    assert [c["score"] for c in again["candidates"]] == [c["score"] for c in cands]
    assert all(c["cached"] for c in again["candidates"])


def test_search_stops_when_the_proposer_never_answers(server):
    server.reset()
    server.add_faults(*[{"content": "I have no idea."}] * 40)
    logs = []
    report = SystemPromptSearch(backend(server), LayoutCompleteness(),
                                SearchConfig(budget=3, proposal_attempts=2), log=logs.append).run(SEED_PROMPT, test=False)
    assert len(report["candidates"]) == 1 and report["winner"] == 0 and report["failed_proposals"] == 3
    assert "no usable new rule set" in logs[-1] and "test" not in report
    server.reset()


def test_metric_spec_errors():
    with pytest.raises(ValueError, match="expected 'toy:RUN_DIR' or 'package.module:factory'"):
        load_metric("nonsense")
    with pytest.raises(ValueError, match="cannot load"):
        load_metric("lens_fast.nope:factory")
    with pytest.raises(FileNotFoundError, match="holds no report.json and transformer/"):
        load_metric("toy:/nonexistent/run")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A demo run folder holding an untrained miniature model (the path, not the score, is tested)."""
    from dataclasses import asdict

    from lens_fast.toy.demo import build_config, build_model

    cfg = build_config(True, sample_steps=2)
    out = tmp_path_factory.mktemp("run")
    build_model(cfg).save_pretrained(str(out / "transformer"))
    (out / "report.json").write_text(json.dumps({"config": asdict(cfg)}))
    return str(out)


def test_cli_search_with_shapeeval_end_to_end(server, demo_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LENS_FAST_REASONER_BASE_URL", server.url)
    monkeypatch.setenv("LENS_FAST_REASONER_MODEL", "toy-llm")
    seed = tmp_path / "seed.txt"
    seed.write_text(SEED_PROMPT)
    out = tmp_path / "search"
    argv = ["search-system-prompt", "--metric", f"toy:{demo_run}", "--metric-arg", "per_tag=1", "--out", str(out),
            "--seed-prompt", str(seed), "--budget", "3", "--seed", "2"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "toy-shapeeval" and len(report["candidates"]) == 3 and report["dev_requests"] == 6
    assert all(0 <= c["score"] <= 1 and c["details"]["n"] == 6 for c in report["candidates"])
    assert (out / "best_system_prompt.txt").read_text().strip() == report["winner_system_prompt"]
    assert "winner: candidate" in capsys.readouterr().out
    assert main(argv) == 2 and "is not empty" in capsys.readouterr().err  # nothing is overwritten
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(argv[:6] + [str(tmp_path / "s2"), "--seed-prompt", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err and not (tmp_path / "s2").exists()
