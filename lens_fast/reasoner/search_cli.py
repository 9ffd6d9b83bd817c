"""``lens-fast search-system-prompt``: tune the reasoner's system prompt against a generation
metric, training-free (SEARCH.md beside this file).

    lens-fast search-system-prompt --metric toy:RUN_DIR --out search_out --budget 12
    lens-fast search-system-prompt --metric mypkg.judge:build --backend local --model path/to/Lens ...

The rewriter (and, unless ``--proposer-prefix`` names another endpoint, the proposer) is
the ``api`` backend (``LENS_FAST_REASONER_BASE_URL`` / ``_MODEL`` / ``_API_KEY``) or the
``local`` GPT-OSS of a Lens checkpoint. ``--out`` gets report.json, report.md (every
candidate's score, the winner) and best_system_prompt.txt; the cache (default OUT/cache)
makes a rerun free. Bad input (missing or empty seed prompt, unreachable endpoint, a
missing key, a metric that cannot be built, an --out in use) stops in one line, exit 2.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import sys
from typing import List, Optional

from ..errors import InvalidValue, OutputExists
from .base import load_system_prompt
from .metrics import load_metric
from .search import SearchConfig, SystemPromptSearch, write_report


def _backend(args):
    from ..chat_api import ChatError

    if args.backend == "api":
        from .api import ApiBackend

        backend = ApiBackend.from_env(temperature=args.temperature, seed=args.seed)
        try:
            backend.check()
        except ChatError as e:
            raise InvalidValue(str(e)) from None
        return backend
    if not args.model:
        raise InvalidValue("--backend local needs --model: the Lens checkpoint folder whose GPT-OSS generates")
    from ..models.config import read_json
    from ..text_encoder import LensTextEncoder
    from .local import LocalGptOssBackend

    layers = read_json(os.path.join(args.model, "transformer", "config.json"))["selected_layer_index"]
    encoder = LensTextEncoder.from_pretrained(args.model, layers, template_date="2026-01-01")
    return LocalGptOssBackend(encoder, temperature=args.temperature or 0.0, seed=args.seed)


def _proposer(args):
    if not args.proposer_prefix:
        return None
    from ..chat_api import ChatError
    from .api import ApiBackend

    proposer = ApiBackend.from_env(args.proposer_prefix, temperature=args.temperature, seed=args.seed)
    try:
        proposer.check()
    except ChatError as e:
        raise InvalidValue(str(e)) from None
    return proposer


def _claim(out: str):
    """Creates ``out`` (new or empty) and holds its lock for the whole run: one process per folder."""
    if os.path.isdir(out) and [f for f in os.listdir(out) if f != ".lock"]:
        raise OutputExists(f"--out {out} is not empty; choose a new folder (nothing is overwritten)")
    os.makedirs(out, exist_ok=True)
    handle = open(os.path.join(out, ".lock"), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutputExists(f"--out {out} is in use by another search") from None
    return handle


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="lens-fast search-system-prompt", description=__doc__.split("\n\n")[0])
    p.add_argument("--metric", required=True, help="'toy:RUN_DIR' (ShapeEval on a lens-fast demo run) or "
                                                   "'package.module:factory'")
    p.add_argument("--metric-arg", action="append", default=[], metavar="KEY=INT",
                   help="keyword for the metric, e.g. per_tag=8 (repeatable)")
    p.add_argument("--out", required=True, help="report folder (new or empty)")
    p.add_argument("--seed-prompt", help="the system prompt to start from (default: the packaged Lens one)")
    p.add_argument("--backend", choices=["api", "local"], default="api")
    p.add_argument("--model", help="Lens checkpoint folder (--backend local)")
    p.add_argument("--proposer-prefix", help="environment prefix of another endpoint for the mutation and "
                                             "crossover LLM (e.g. LENS_FAST_PROPOSER -> LENS_FAST_PROPOSER_BASE_URL)")
    p.add_argument("--budget", type=int, default=12, help="candidates scored, the seed prompt included")
    p.add_argument("--max-seconds", type=float, help="stop proposing after this long")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (parents, operators, LLM sampling)")
    p.add_argument("--metric-seed", type=int, default=0, help="generation seed of the metric")
    p.add_argument("--temperature", type=float, help="LLM sampling temperature (default: the backend's)")
    p.add_argument("--crossover-rate", type=float, default=0.3)
    p.add_argument("--cache", help="cache folder (default: OUT/cache); share it between runs to pay once")
    p.add_argument("--no-test", action="store_true", help="skip scoring seed and winner on the test split")
    args = p.parse_args(argv)
    seed_prompt = load_system_prompt(args.seed_prompt)
    config = SearchConfig(budget=args.budget, max_seconds=args.max_seconds, seed=args.seed,
                          metric_seed=args.metric_seed, crossover_rate=args.crossover_rate)
    metric_kwargs = {}
    for item in args.metric_arg:
        key, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise InvalidValue(f"--metric-arg {item!r}: expected KEY=INTEGER")
        metric_kwargs[key] = int(value)
    rewriter, proposer = _backend(args), _proposer(args)
    metric = load_metric(args.metric, **metric_kwargs)
    lock = _claim(args.out)
    try:
        search = SystemPromptSearch(rewriter, metric, config, proposer=proposer,
                                    cache_dir=args.cache or os.path.join(args.out, "cache"))
        report = search.run(seed_prompt, test=not args.no_test)
        write_report(args.out, report)
    finally:
        lock.close()
    print(f"winner: candidate {report['winner']} (dev {report['winner_score']:.3f} vs seed {report['seed_score']:.3f}); "
          f"wrote {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
