"""``lens-fast demo``: the command line of the built-in demo (``lens_fast.toy.demo``), its
ablations and the lifecycle (``--lifecycle``: pre-train, RL, then distil; lens_fast.toy.lifecycle).
A module of its own so the demo's library code and the stages built on it import nothing
back."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import List, Optional

from ..cli_checks import OneLineParser, check_output_folder, integer
from ..errors import InvalidValue, run_cli
from .demo import __doc__ as DEMO_DOC
from . import aspect_buckets
from .demo import BUCKET_RATIOS, CAPTION_MODES, DemoConfig, _markdown, _write, build_config, run
from .text import MiniLMTextEncoder


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``lens-fast demo``: returns the exit status (2 for user errors, 1 for bugs)."""
    return run_cli("lens-fast demo", _main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: List[str]) -> int:
    p = OneLineParser(prog="lens-fast demo", description=DEMO_DOC.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~2 minute version (CI)")
    p.add_argument("--out", default="demo_out", help="output folder (must be new or empty)")
    p.add_argument("--ablation", choices=["captions", "resolution", "narrow"], help="equal-compute ablation (narrow: "
                   "with --rl, RL on single objects only against the taxonomy set)")
    p.add_argument("--rl", metavar="FOLDER", help="the RL stage (lens_fast.toy.rl_stage) on the demo's exported model")
    p.add_argument("--seed", type=integer(0, 2 ** 31 - 1), default=0)
    p.add_argument("--steps", type=integer(1, 10 ** 6), help="training steps (default 1800; 120 with --quick)")
    p.add_argument("--threads", type=integer(1, 1024), default=DemoConfig.threads,
                   help="CPU threads for training and sampling (the result depends on it, not on the machine)")
    p.add_argument("--lifecycle", action="store_true", help="pre-train, RL post-train, then distil the RL model "
                                                            "into a 4-step Turbo, each stage scored (lens_fast.toy.lifecycle)")
    args = p.parse_args(argv)
    if args.ablation == "narrow" and not args.rl:
        raise InvalidValue("--ablation narrow compares two RL prompt sets: give --rl FOLDER (a demo model folder)")
    if args.lifecycle and args.ablation:
        raise InvalidValue(f"--lifecycle with --ablation {args.ablation}: choose one (the lifecycle pre-trains the "
                           "default model, post-trains it with RL, then distils it)")
    check_output_folder(args.out, "--out")
    overrides = {"seed": args.seed, "threads": args.threads}
    if args.steps is not None:
        overrides.update(steps=args.steps, warmup=min(DemoConfig.warmup, args.steps // 4))
    cfg = build_config(args.quick, **overrides)
    text_encoder = MiniLMTextEncoder()
    if args.ablation:
        # Every arm trains the same number of optimiser steps on the same batch size; each
        # arm's wall time is in its report.
        arm = replace(cfg, steps=cfg.ablation_steps, warmup=min(cfg.warmup, cfg.ablation_steps // 4))
    if args.rl:
        from .rl_stage import run_stage, stage_config
        run_stage(args.rl, args.out, cfg, stage_config(args.quick, seed=args.seed), args.ablation == "narrow",
                  text_encoder)
    elif args.lifecycle:
        from .lifecycle import run_lifecycle
        run_lifecycle(cfg, args.out, args.quick, text_encoder=text_encoder)
    elif args.ablation == "captions":
        reports = {}
        for mode in CAPTION_MODES:
            reports[mode] = run(replace(arm, name=f"captions-{mode}", captions=mode), os.path.join(args.out, mode),
                                text_encoder)
        _write(args.out, reports, f"Caption ablation ({arm.steps} steps each): dense vs brief vs 50/50 mixed, "
                                  "and the compact layout captions the default trains on")
    elif args.ablation == "resolution":
        # Both models are scored on 1:2 and 2:1, which neither trains on.
        unseen = aspect_buckets(cfg.base, ((1, 2), (2, 1)), multiple=cfg.pixel_patch)
        reports = {
            "buckets": run(replace(arm, name="buckets", ratios=BUCKET_RATIOS, bucket_weights=None),
                           os.path.join(args.out, "buckets"), text_encoder, eval_sizes=unseen),
            "square-only": run(replace(arm, name="square-only", ratios=((1, 1),), bucket_weights=None),
                               os.path.join(args.out, "square-only"), text_encoder, eval_sizes=unseen),
        }
        _write(args.out, reports, f"Resolution ablation ({arm.steps} steps each): buckets (2:3, 1:1, 3:2) vs one "
                                  "square size, both scored on aspect ratios neither trained on (1:2 and 2:1)")
    else:
        report = run(cfg, args.out, text_encoder)
        _write(args.out, {cfg.name: report}, "lens_fast demo: a miniature Lens trained on this CPU")
        print(_markdown({cfg.name: report}, "lens_fast demo"))
    print(f"wrote {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
