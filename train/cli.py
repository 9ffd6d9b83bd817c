"""``lens-fast train`` / ``python -m lens_fast.train``: the same command on one GPU, a
CPU, or under ``torchrun`` on many GPUs and nodes.

    lens-fast train --config stage1 --out runs/s1 --data "/data/shard-{000000..000999}.tar" \
        --pretrained /ckpt/Lens-Base            # VAE + text encoder folder
    torchrun --nproc_per_node 8 -m lens_fast.train --config stage2 --out runs/s2 --resume
    lens-fast train --config tiny-cpu --out /tmp/tiny --max-steps 20
    lens-fast train --config distill --teacher /ckpt/Lens --data "/data/shard-{000000..000099}.tar" \
        --out runs/turbo                     # a 4-step, CFG-free Turbo of /ckpt/Lens (runs/turbo/export)
    lens-fast rl-prompts --taxonomy taxonomy.yaml --out set.jsonl
    lens-fast train --config rl --pretrained /ckpt/Lens --set rl.prompts=set.jsonl --out runs/rl   # DiffusionNFT
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

import yaml

from lens_fast.cli_checks import OneLineParser, check_device, integer, number, quiet_loaders
from lens_fast.errors import InvalidValue, run_cli

PROG = "lens-fast train"


def build_parser() -> OneLineParser:
    from .config import RECIPES, REGISTRY

    p = OneLineParser(prog=PROG, description="Train or fine-tune Lens.", allow_abbrev=False)
    p.add_argument("--config", help=f"a registered config ({', '.join(sorted(REGISTRY))}) or a YAML file")
    p.add_argument("--recipe", help=f"what to train (config key recipe): {', '.join(RECIPES)} (pretrain also "
                                    "fine-tunes; distill makes a Turbo of --teacher; rl post-trains --pretrained "
                                    "on rl.prompts)")
    p.add_argument("--teacher", help="recipe distill: the Lens checkpoint folder to distil (distill.teacher)")
    p.add_argument("--out", help="run folder (default runs/<config name>); refused if it holds another "
                                 "run's files, unless --resume")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--max-steps", type=integer(0, 10 ** 12),
                   help="train until this step count (overrides train.max_steps)")
    p.add_argument("--data", action="append", help="WebDataset shards: paths, globs or {000..099} patterns "
                                                   "(repeatable; sets data.shards)")
    p.add_argument("--cache", help="a token cache folder (sets data.source=cache, data.path)")
    p.add_argument("--pretrained", help="official checkpoint folder to start from (sets model.pretrained; also "
                                        "the default VAE and text encoder)")
    p.add_argument("--lr", type=number(0, 10, lo_open=True), help="learning rate (optim.lr)")
    p.add_argument("--seed", type=integer(0, 2 ** 31 - 1), help="seed (train.seed)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, value in YAML syntax (repeatable)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU when there is one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--list-configs", action="store_true", help="list the registered configs and exit")
    return p


def resolve_config(args):
    from .config import load_config

    if not args.config:
        raise InvalidValue("--config is required: a registered config name or a YAML file")
    cfg = load_config(args.config)
    if args.recipe:
        cfg.recipe = args.recipe
    sets = list(args.set)
    if args.max_steps is not None:
        sets.append(f"train.max_steps={args.max_steps}")
    if args.lr is not None:
        sets.append(f"optim.lr={args.lr}")
    if args.seed is not None:
        sets.append(f"train.seed={args.seed}")
    if args.no_progress:
        sets.append("logging.progress_bar=false")
    cfg.override(sets)
    if args.data:
        cfg.data.shards = list(args.data)
        cfg.data.source = "webdataset"
    if args.cache:
        cfg.data.source, cfg.data.path = "cache", args.cache
    if args.pretrained:
        cfg.model.pretrained = args.pretrained
    if args.teacher:
        cfg.distill.teacher = args.teacher
    cfg.validate()
    return cfg


def run(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.list_configs:
        from .config import REGISTRY

        for name, fn in sorted(REGISTRY.items()):
            print(f"{name:10s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    cfg = resolve_config(args)
    check_device("--device", args.device)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from .trainer import Trainer

    if not cfg.logging.progress_bar:
        quiet_loaders()
    out = args.out or os.path.join("runs", cfg.name)
    trainer = Trainer(cfg, out_dir=out, resume=args.resume, device=args.device)
    try:
        result = trainer.train()
        if trainer.dist.is_main:
            mfu = "n/a" if result.mfu is None else f"{100 * result.mfu:.1f}%"
            print(f"lens-fast train: step {result.step}, {result.samples_per_s:.1f} samples/s, "
                  f"{result.tflops_per_gpu:.3f} TFLOP/s per device, MFU {mfu}, skipped {result.skipped} "
                  f"samples; run folder {trainer.run_dir}")
    finally:
        trainer.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``lens-fast train``: returns the exit status (2 for user errors, 1 for bugs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lens_fast.train").setLevel(logging.INFO)
    return run_cli(PROG, run, argv)
