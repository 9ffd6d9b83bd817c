"""The whole lifecycle on the toy world, one stage after another, each starting from the
previous stage's exported folder, in the paper's order: pre-train (the demo) -> RL
post-training (ShapeEval reward, taxonomy prompts) -> distil (a 4-step Turbo of the RL model).

    lens-fast demo --lifecycle [--quick] --out DIR      # DIR/pretrain, DIR/rl, DIR/distill
    python -m lens_fast.toy.lifecycle --policy FOLDER --out DIR2    # start at RL from an exported model
    python -m lens_fast.toy.lifecycle --teacher FOLDER --out DIR2   # the distil stage alone

``DIR/pretrain/export`` holds the demo's model as a diffusers ``transformer/`` folder,
``DIR/rl/taxonomy/run/export`` the RL model, ``DIR/distill/run/export`` the Turbo
(``model_index.json`` marks it lens-turbo). ``DIR/report.md`` gathers the stages' reports.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

from ..cli_checks import OneLineParser, check_output_folder, integer
from ..errors import run_cli
from .demo import DemoConfig, _write, build_config, run as pretrain_run
from . import distill_stage, rl_stage
from .text import MiniLMTextEncoder

STAGES = ("pretrain", "rl", "distill")


def run_lifecycle(demo: DemoConfig, out: str, quick: bool = False, teacher: Optional[str] = None,
                  text_encoder: Optional[MiniLMTextEncoder] = None, policy: Optional[str] = None) -> dict:
    """Run the stages into ``out``; with ``policy`` (an exported folder) start at RL, with
    ``teacher`` start at distil."""
    if teacher is not None and policy is not None:
        raise ValueError("give the lifecycle a policy (start at RL) or a teacher (start at distil), not both")
    text_encoder = text_encoder or MiniLMTextEncoder()
    reports = {}
    if teacher is None and policy is None:
        policy = os.path.join(out, "pretrain", "export")
        reports["pretrain"] = pretrain_run(demo, os.path.join(out, "pretrain"), text_encoder,
                                           export=os.path.join(policy, "transformer"))
        _write(os.path.join(out, "pretrain"), {demo.name: reports["pretrain"]}, "Pre-training (the demo)")
    if teacher is None:
        reports["rl"] = rl_stage.run_stage(policy, os.path.join(out, "rl"), demo,
                                           rl_stage.stage_config(quick, seed=demo.seed), text_encoder=text_encoder)
        teacher = reports["rl"]["arms"]["taxonomy"]["export"]
    reports["distill"] = distill_stage.run_stage(teacher, os.path.join(out, "distill"), demo,
                                                 distill_stage.stage_config(quick), text_encoder)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(reports, f, indent=1)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(f"# lens_fast lifecycle on the toy world: {' -> '.join(reports)}\n\n")
        for name in reports:
            path = os.path.join(out, name, "report.md")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as stage:
                    f.write(f"## {name}\n\n{stage.read().split(chr(10), 1)[1]}\n")
    return reports


PROG = "python -m lens_fast.toy.lifecycle"


def main(argv: Optional[List[str]] = None) -> int:
    """Returns the exit status (2 with one line for bad input, before any compute)."""
    return run_cli(PROG, _main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: List[str]) -> int:
    from ..train.build import model_folder

    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--policy", help="start at the RL stage from this exported folder of the demo's model")
    start.add_argument("--teacher", help="start at the distil stage from this exported folder of the demo's model")
    p.add_argument("--quick", action="store_true", help="a smoke run of every stage (CI)")
    p.add_argument("--seed", type=integer(0, 2 ** 31 - 1), default=0)
    args = p.parse_args(argv)
    check_output_folder(args.out, "--out")
    for flag, folder in (("--policy", args.policy), ("--teacher", args.teacher)):
        if folder:
            model_folder(folder, flag)
    run_lifecycle(build_config(args.quick, seed=args.seed), args.out, args.quick, args.teacher, policy=args.policy)
    print(f"wrote {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
