"""``lens-fast curate``: images in, training shards out.

    lens-fast curate /data/raw --out /data/curated --embedder /models/clip-vit-l-14 \\
        --aesthetic-model /models/aesthetic-head --nsfw-model /models/nsfw --watermark-model /models/wm \\
        --caption-url http://127.0.0.1:8000/v1 --caption-model Qwen/Qwen2.5-VL-7B-Instruct
    lens-fast curate /data/raw --out /data/curated ... --executor ray --ray-address auto
    lens-fast curate calibrate /data/raw --out /tmp/calib --embedder ... --sample 2000
    lens-fast train --config stage2 --data '/data/curated/shards/*.tar' ...

Rerunning the same command resumes a killed run. Errors a user can cause print one line
and exit 2; shards left unwritten because captions failed exit 1 (rerun to retry them).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .config import STAGES, CurateConfig

OPTIONAL_STAGES = ("area", "nsfw", "aesthetic", "watermark", "clarity", "entropy", "luminance", "dedup", "caption")


def build_parser(calibration: bool = False) -> argparse.ArgumentParser:
    prog = "lens-fast curate calibrate" if calibration else "lens-fast curate"
    what = ("Score a sample with every stage; print percentiles and save a histogram per stage."
            if calibration else "Filter, deduplicate and densely caption images into training shards "
            f"(stages: {', '.join(STAGES)}, then caption and shard). 'lens-fast curate calibrate -h' for calibration.")
    p = argparse.ArgumentParser(prog=prog, description=what, allow_abbrev=False)
    p.add_argument("inputs", nargs="+", help="folders of images, WebDataset .tar files (globs allowed), "
                                             "or .parquet/.jsonl lists of local files")
    p.add_argument("--out", required=True, help="output folder (new, or this run's to resume; never overwritten)")
    p.add_argument("--config", help="a YAML file with the sections of CurateConfig (see STAGES.md)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key, value in YAML syntax (repeatable), e.g. clarity.min_score=50")
    p.add_argument("--embedder", help="CLIP/SigLIP folder (transformers or open_clip) for dedup and the heads, "
                                      "or 'toy'")
    for stage in ("nsfw", "aesthetic", "watermark"):
        p.add_argument(f"--{stage}-model", help=f"local folder with the {stage} stage's weights")
    for stage in OPTIONAL_STAGES:
        p.add_argument(f"--no-{stage}", action="store_true", help=f"turn the {stage} stage off")
    p.add_argument("--buckets", help="train config (name or YAML) whose buckets the shards follow (default stage2)")
    p.add_argument("--unit-size", type=int, help="images per unit of work for folders and lists (default 1000)")
    p.add_argument("--device", help="device of the model stages (auto, cpu, cuda, cuda:N)")
    if calibration:
        p.add_argument("--sample", type=int, default=1000, help="images to score (default 1000)")
        return p
    p.add_argument("--executor", choices=["local", "ray"], help="local processes (default) or a Ray cluster")
    p.add_argument("--workers", type=int, help="processes (local) or actors (ray); default: all cores")
    p.add_argument("--ray-address", help="Ray cluster to join (default: start a local Ray instance)")
    p.add_argument("--caption-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--caption-model", help="the model name the endpoint serves")
    p.add_argument("--caption-prompt", help="file with the captioning instructions (default: caption_prompt.txt)")
    p.add_argument("--drop-failed-captions", action="store_true",
                   help="finish without the images whose caption failed (default: stop; a rerun retries them)")
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--image-format", choices=["jpg", "png", "webp"])
    p.add_argument("--early-exit", action="store_true",
                   help="skip the later stages of an image once one drops it (faster; fewer scores in the manifest)")
    return p


def resolve_config(args, calibration: bool = False) -> CurateConfig:
    cfg = CurateConfig.from_file(args.config) if args.config else CurateConfig()
    sets = list(args.set)
    simple = {"embedder.model": args.embedder, "nsfw.model": args.nsfw_model, "aesthetic.model": args.aesthetic_model,
              "watermark.model": args.watermark_model, "shards.buckets": args.buckets,
              "execution.unit_size": args.unit_size, "embedder.device": args.device}
    if not calibration:
        simple.update({"execution.executor": args.executor, "execution.workers": args.workers,
                       "execution.ray_address": args.ray_address, "caption.base_url": args.caption_url,
                       "caption.model": args.caption_model, "caption.prompt_file": args.caption_prompt,
                       "shards.samples_per_shard": args.samples_per_shard, "shards.image_format": args.image_format})
        if args.drop_failed_captions:
            simple["caption.drop_failed"] = True
        if args.early_exit:
            simple["execution.score_all"] = False
    for stage in OPTIONAL_STAGES:
        if getattr(args, f"no_{stage}"):
            simple[f"{stage}.enabled"] = False
    for section_key, value in simple.items():
        if value is not None:
            section, key = section_key.split(".")
            cfg.update({section: {key: value}}, f"--{key}")
    cfg.override(sets)
    return cfg.validate()


def run(argv: List[str]) -> int:
    if argv and argv[0] == "calibrate":
        args = build_parser(calibration=True).parse_args(argv[1:])
        from .calibrate import calibrate

        calibrate(args.inputs, args.out, resolve_config(args, calibration=True), sample=args.sample)
        return 0
    args = build_parser().parse_args(argv)
    from .pipeline import curate

    curate(args.inputs, args.out, resolve_config(args))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``lens-fast curate``: 0 done, 1 finished with shards left to redo (or a
    bug: a traceback), 2 a user error (one line)."""
    from ..errors import run_cli
    from .pipeline import CurationIncomplete

    def run_or_report(args: List[str]) -> int:
        try:
            return run(args)
        except CurationIncomplete as e:
            print(f"lens-fast curate: {e}", file=sys.stderr)
            return 1

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_cli("lens-fast curate", run_or_report, list(sys.argv[1:] if argv is None else argv))

if __name__ == "__main__":
    sys.exit(main())
