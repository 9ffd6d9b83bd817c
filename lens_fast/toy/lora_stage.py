"""Toy LoRA stage: teach the demo's pre-trained model a colour it never saw, with a LoRA.

The demo model (``lens-fast demo``, exported as a diffusers transformer folder) trained
on six palette colours; ``scene.UNSEEN_PALETTE`` adds cyan, which the world can draw and
ShapeEval can see but sampling never drew. This stage trains LoRA adapters with the
trainer's ``lora`` recipe (frozen base, adapters only) on a small set where one object of
a third of the scenes is recoloured cyan (the rest keep the old colours, against
forgetting), captioned in the demo's layout style, then loads the exported file with the
library's loader (what ``LensPipeline.load_lora_weights`` runs) and scores, on several
sampling seeds:

- new concept: ``colors`` ("a cyan square") and ``color_attr`` ("a cyan circle and a red
  triangle") prompts with one object cyan; the model reads each scene's layout caption
  (the rewriter does not know the new word);
- control: the same scenes with their original colour;
- old tags: the demo's own 96 held-out prompts (16 per tag, rewritten mode), as in its report.

    python -m lens_fast.toy.lora_stage --teacher /work/notes/artifacts/teacher_1800 --out runs/lora_toy
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import write_json, write_text
from ..errors import InvalidValue, MissingFile, run_cli
from .captions import brief_caption, layout_caption, metadata
from .demo import (DemoConfig, _grid_png, _summary, _to_tensor, fixed_threads, heldout_prompts, sample_and_score,
                   train_config)
from .prompts import make_samples
from .scene import UNSEEN_PALETTE, as_scene, render_scene, sample_scene
from .text import MiniLMTextEncoder

NEW_TAGS = ("colors", "color_attr")


@dataclass
class LoraStageConfig:
    color: str = "cyan"  # a colour of scene.UNSEEN_PALETTE
    n_samples: int = 3000
    new_fraction: float = 0.35  # share of training scenes with one object recoloured
    rank: int = 8
    targets: Sequence[str] = ("attn", "mlp")
    steps: int = 300
    lr: float = 1e-3
    warmup: int = 20
    ema_decay: float = 0.98
    new_per_tag: Dict[str, int] = dataclasses.field(default_factory=lambda: {"colors": 24, "color_attr": 12})
    eval_seeds: Sequence[int] = (0, 1)  # sampling seeds of the new-concept and control sets
    old_per_tag: Optional[int] = None  # the demo's held-out prompts per tag (None: its report's own count)
    old_seeds: Sequence[int] = (0,)  # sampling seeds of the old tags (0: the demo report's own images)
    sample_steps: Optional[int] = None  # None: the demo's
    seed: int = 7


QUICK = dict(n_samples=128, steps=10, new_per_tag={"colors": 2, "color_attr": 2}, eval_seeds=(0,), old_per_tag=1,
             sample_steps=4)


def recolour(scene, rng: np.random.Generator, color: str):
    """``scene`` with one object (drawn by ``rng``) in ``color``."""
    scene = as_scene(scene)
    i = int(rng.integers(len(scene.objects)))
    objects = list(scene.objects)
    objects[i] = replace(objects[i], color=color)
    return replace(scene, objects=tuple(objects))


def training_data(demo: DemoConfig, stage: LoraStageConfig, text_encoder):
    """One square bucket of layout-captioned samples, ``new_fraction`` of them with an
    object recoloured ``stage.color``; returns (buckets, captions)."""
    from ..train.data import BucketData, PixelSpace

    rng = np.random.default_rng([stage.seed, 0x10AA])
    samples = make_samples(stage.n_samples, stage.seed, buckets=[(demo.base, demo.base)], textures=demo.textures)
    images, captions = [], []
    for s in samples:
        scene = as_scene(s["scene"])
        if rng.random() < stage.new_fraction:
            scene = recolour(scene, rng, stage.color)
            images.append(render_scene(scene, demo.base, demo.base))
        else:
            images.append(s["image"])
        captions.append(layout_caption(scene))
    feats, mask = text_encoder.encode(captions, max_sequence_length=128)
    space = PixelSpace(demo.pixel_patch)
    tokens = space.encode(torch.stack([_to_tensor(im) for im in images]))
    return {space.latent_grid(demo.base, demo.base): BucketData(tokens, feats, mask, captions=captions)}, captions


def new_concept_prompts(stage: LoraStageConfig) -> tuple:
    """(prompts with one object in the new colour, the same scenes in their own colours)."""
    new, control = [], []
    for k, (tag, n) in enumerate(stage.new_per_tag.items()):
        rng = np.random.default_rng([stage.seed, k, 0xC0105])
        for _ in range(n):
            scene = sample_scene(rng, tag)
            for out, s in ((control, scene), (new, recolour(scene, rng, stage.color))):
                out.append({"prompt": brief_caption(s), "metadata": metadata(s), "scene": s.to_dict(),
                            "text": layout_caption(s)})
    return new, control


def lora_train_config(demo: DemoConfig, stage: LoraStageConfig, data: dict, teacher: str):
    tc = train_config(replace(demo, steps=stage.steps, lr=stage.lr, warmup=stage.warmup, ema_decay=stage.ema_decay,
                              seed=stage.seed), data)
    tc.name, tc.recipe = "toy-lora", "lora"
    tc.model.pretrained = teacher
    tc.lora.rank, tc.lora.targets, tc.lora.base_dtype = stage.rank, list(stage.targets), "float32"
    return tc


def load_teacher(teacher: str):
    """(model, DemoConfig) of a demo export: ``transformer/`` and the run's ``report.json``."""
    from ..models.transformer import LensTransformer2DModel

    path = os.path.join(teacher, "report.json")
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(teacher, "transformer")):
        raise MissingFile(f"--teacher {teacher}: expected a demo run folder with report.json and transformer/")
    with open(path, encoding="utf-8") as f:
        values = json.load(f)["config"]
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    values = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in values.items() if k in fields}
    return LensTransformer2DModel.from_pretrained(os.path.join(teacher, "transformer")), DemoConfig(**values)


def score(model, text_encoder, demo: DemoConfig, stage: LoraStageConfig, sets: Dict[str, List[dict]], bar):
    """{set: {seed: summary}} and the first seed's images per set. Old tags go through the
    demo's rewriter; the new-concept sets give the model each scene's layout caption."""
    scores, images = {}, {}
    for name, prompts in sets.items():
        scores[name] = {}
        for seed in stage.old_seeds if name == "old_tags" else stage.eval_seeds:
            cfg = replace(demo, seed=demo.seed + seed, sample_steps=stage.sample_steps or demo.sample_steps)
            texts = None if name == "old_tags" else [p["text"] for p in prompts]
            result, shown = sample_and_score(model, text_encoder, prompts, [(demo.base, demo.base)], cfg, bar,
                                             mode="rewritten", texts=texts)
            scores[name][seed] = _summary(result)
            images.setdefault(name, shown)
    return scores, images


def mean_over_seeds(by_seed: Dict[int, dict]) -> dict:
    overall = [s["overall"] for s in by_seed.values()]
    tags = {t for s in by_seed.values() for t, v in s["per_tag"].items() if v is not None}
    return {"overall": float(np.mean(overall)), "overall_by_seed": overall,
            "per_tag": {t: float(np.mean([s["per_tag"][t] for s in by_seed.values()])) for t in sorted(tags)},
            "n_per_seed": next(iter(by_seed.values()))["n"], "seeds": len(by_seed)}


def run_stage(teacher: str, out: str, stage: LoraStageConfig, text_encoder=None) -> dict:
    from ..lora import adapters
    from ..train import InMemorySource, Trainer

    if stage.color not in UNSEEN_PALETTE:
        raise InvalidValue(f"color={stage.color!r}: expected one of the unseen colours {list(UNSEEN_PALETTE)}")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    text_encoder = text_encoder or MiniLMTextEncoder()
    model, demo = load_teacher(teacher)
    new, control = new_concept_prompts(stage)
    old = heldout_prompts(stage.old_per_tag or demo.eval_per_tag, demo.seed + 99)
    sets = {"new_concept": new, "control": control, "old_tags": old}
    n_images = 2 * (len(stage.eval_seeds) * (len(new) + len(control)) + len(stage.old_seeds) * len(old))
    with fixed_threads(demo.threads), tqdm(total=n_images + stage.steps, desc="toy LoRA", unit="it") as bar:
        before, before_images = score(model.eval(), text_encoder, demo, stage, sets, bar)
        data, _ = training_data(demo, stage, text_encoder)
        tc = lora_train_config(demo, stage, data, teacher)
        trainer = Trainer(tc, data=InMemorySource(data, batch_size=demo.batch, seed=stage.seed),
                          out_dir=os.path.join(out, "run"))
        t1 = time.time()
        try:
            trainer.train()
        finally:
            trainer.close()
        train_seconds = time.time() - t1
        export = trainer.recipe.export_path(trainer.run_dir)
        t2 = time.time()
        name = adapters.load(model, export, stage.color)  # what LensPipeline.load_lora_weights runs
        load_seconds = time.time() - t2
        after, after_images = score(model, text_encoder, demo, stage, sets, bar)
    weights = os.path.join(export, "pytorch_lora_weights.safetensors")
    report = {
        "teacher": os.path.abspath(teacher), "stage": asdict(stage), "adapter": name,
        "adapter_file": weights, "adapter_bytes": os.path.getsize(weights),
        "adapter_parameters": sum(p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad),
        "base_parameters": sum(p.numel() for n, p in trainer.model.named_parameters() if not p.requires_grad),
        "train_steps": trainer.step, "train_seconds": round(train_seconds, 1), "load_seconds": round(load_seconds, 3),
        "wall_seconds": round(time.time() - t0, 1),
        "prompts": {k: len(v) for k, v in sets.items()},
        "before": {k: mean_over_seeds(v) for k, v in before.items()},
        "after": {k: mean_over_seeds(v) for k, v in after.items()},
        "machine": {"cpu_count": os.cpu_count(), "threads": demo.threads, "platform": platform.platform(),
                    "torch": torch.__version__},
    }
    rows = [(f"before: {p['prompt']}", im) for p, im in zip(new[:8], before_images["new_concept"][:8])]
    rows += [(f"after: {p['prompt']}", im) for p, im in zip(new[:8], after_images["new_concept"][:8])]
    rows += [(f"after: {p['prompt']}", im) for p, im in zip(old[::12], after_images["old_tags"][::12])]
    _grid_png(os.path.join(out, "samples.png"), [im for _, im in rows], [t for t, _ in rows])
    write_json(os.path.join(out, "report.json"), report)
    write_text(os.path.join(out, "report.md"), markdown(report))
    return report


def markdown(r: dict) -> str:
    s = r["stage"]
    lines = [f"# Toy LoRA: teaching the demo model the unseen colour {s['color']}", "",
             f"Rank {s['rank']} on {', '.join(s['targets'])}; {r['train_steps']} steps, batch 32, lr {s['lr']}, "
             f"{s['n_samples']} samples ({s['new_fraction']:.0%} with one object {s['color']}); "
             f"{r['train_seconds']} s training on {r['machine']['threads']} threads. Adapter: "
             f"{r['adapter_parameters']:,} parameters on a {r['base_parameters']:,}-parameter base, "
             f"{r['adapter_bytes'] / 1024:.0f} KiB file (float32, diffusers layout); loaded in {r['load_seconds']} s.",
             "", "| set | prompts x seeds | before | after | per tag after |", "|---|---|---|---|---|"]
    for k in r["prompts"]:
        b, a = r["before"][k], r["after"][k]
        tags = ", ".join(f"{t} {v:.2f}" for t, v in a["per_tag"].items())
        lines.append(f"| {k} | {b['n_per_seed']} x {b['seeds']} | {b['overall']:.3f} "
                     f"({', '.join(f'{v:.3f}' for v in b['overall_by_seed'])}) | {a['overall']:.3f} "
                     f"({', '.join(f'{v:.3f}' for v in a['overall_by_seed'])}) | {tags} |")
    lines += ["", "Before/after: mean ShapeEval over sampling seeds (each seed's score in brackets). new_concept: "
              f"one object {s['color']} (colors, color_attr tags); control: the same scenes in their own colours; "
              "old_tags: the demo's 96 held-out prompts (rewritten mode).", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lens_fast.toy.lora_stage", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="a demo run folder (report.json and transformer/)")
    p.add_argument("--out", required=True, help="a new folder for the report, grid and LoRA run")
    p.add_argument("--steps", type=int, help="LoRA training steps (default 300)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    p.add_argument("--n-samples", type=int, help="training samples (default 3000)")
    p.add_argument("--new-fraction", type=float, help="share of samples with one object recoloured (default 0.35)")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        raise InvalidValue(f"--out {args.out} is not empty; give a new folder")
    stage = LoraStageConfig(**(QUICK if args.quick else {}))
    given = {k: getattr(args, k) for k in ("steps", "lr", "n_samples", "new_fraction") if getattr(args, k) is not None}
    stage = replace(stage, **given)
    report = run_stage(args.teacher, args.out, stage)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli("lora_stage", main, None))
