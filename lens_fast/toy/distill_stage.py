"""The demo's distillation stage: Decoupled DMD of the demo's trained teacher into a
4-step, CFG-free student (a Turbo), measured on held-out prompts.

The teacher is loaded from its exported folder by the trainer's own loading path
(``lens-fast train --recipe distill --teacher FOLDER`` in Python: the ``distill`` recipe
on the demo's in-memory prompts, a fixed number of student updates), the student is
exported as a Turbo folder and reloaded from it (``detect_variant`` reads lens-turbo:
4 steps, guidance 1). The report compares, on the same held-out prompts and seeds,
both prompt modes: teacher 20 steps with CFG, teacher 4 steps with and without CFG,
student 4 / 2 / 1 steps without CFG and the teacher at 2 and 1 steps for comparison; NFE and wall time per image; seed diversity (mean
pairwise pixel distance between 4 seeds of one prompt); a side-by-side grid.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..atomic import save_image, write_json, write_text
from . import heldout_prompts
from .demo import (PROMPT_MODES, TAG_ORDER, DemoConfig, _Progress, _summary, build_data, fixed_threads,
                   model_prompts, sample_and_score, train_config)
from .text import MiniLMTextEncoder


@dataclass
class DistillStageConfig:
    # Defaults: the best of the tuning probes (bench/results/distill_cpu2_2026-12-06/README.md);
    # 300 updates of batch 32 with 2 fake updates, lr 1e-4, CFG 3 scored 0.333 (4 steps).
    steps: int = 150  # student updates (a fixed budget: the same run on any machine)
    batch: int = 16
    lr: float = 3e-5  # student and fake score (AdamW, the demo's betas), constant after the warm-up
    warmup: int = 20
    fake_lr: Optional[float] = None  # the fake score's learning rate (None: lr)
    fake_updates: int = 1  # fake-score updates per student update
    guidance: float = 2.0  # the teacher CFG the CA term bakes in (Lens's norm-rescaled CFG; the demo's)
    dm_weight: float = 1.0
    ca_weight: float = 1.0
    schedule: str = "hybrid"
    ema_decay: float = 0.95
    student_steps: int = 4
    teacher_steps: int = 20  # the teacher's reference sampling (with the demo's CFG)
    timing_repeats: int = 2  # wall time per image: the best of this many runs of one batch
    diversity_prompts: int = 24  # held-out prompts x 4 seeds for the diversity measure
    diversity_seeds: int = 4
    grid_prompts: int = 16
    second_set_seed: Optional[int] = 299  # the noise: headline rows again on held-out prompts of seed + this (None: off)
    train_prompts: Optional[int] = None  # captions to distil on (None: the demo's training set, n_samples)
    eval_per_tag: Optional[int] = None  # held-out prompts per tag (None: the demo's)


QUICK = dict(steps=3, batch=4, warmup=1, fake_updates=1, diversity_prompts=3, diversity_seeds=2, grid_prompts=3,
             train_prompts=32, eval_per_tag=1, teacher_steps=6, timing_repeats=1)


def rows(stage: DistillStageConfig):
    """(model, steps, CFG on) of each report row: the teacher as it is meant to run, then
    teacher and student at the student's step counts."""
    s, half = stage.student_steps, max(1, stage.student_steps // 2)
    return (("teacher", stage.teacher_steps, True), ("teacher", s, True), ("teacher", s, False), ("student", s, False),
            ("teacher", half, False), ("student", half, False), ("teacher", 1, False), ("student", 1, False))


def stage_config(quick: bool, **overrides) -> DistillStageConfig:
    return replace(DistillStageConfig(**(QUICK if quick else {})), **overrides)


def distill_train_config(demo: DemoConfig, stage: DistillStageConfig, data: dict, teacher: str):
    """The demo's trainer config turned into the distill recipe's."""
    tc = train_config(demo, data)
    tc.name, tc.recipe = f"demo-distill-{demo.name}", "distill"
    tc.distill = replace(tc.distill, teacher=teacher, steps=stage.student_steps, guidance=stage.guidance,
                         fake_updates=stage.fake_updates, fake_lr=stage.fake_lr, dm_weight=stage.dm_weight, ca_weight=stage.ca_weight,
                         schedule=stage.schedule, teacher_dtype="float32")
    tc.optim.lr, tc.optim.warmup_steps, tc.optim.decay_steps = stage.lr, stage.warmup, 0
    tc.train.max_steps = stage.steps
    tc.ema.decay = stage.ema_decay
    tc.checkpoint.every = stage.steps
    tc.validate()
    return tc


def _pipeline(model, text_encoder, demo: DemoConfig, variant: str):
    from ..pipeline import LensPipeline
    from ..train.data import PixelSpace

    pipe = LensPipeline(vae=PixelSpace(demo.pixel_patch), text_encoder=text_encoder, transformer=model.eval(),
                        lens_variant=variant, lens_defaults=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def seconds_per_image(pipe, texts: List[str], size, steps: int, guidance: float, demo: DemoConfig,
                      repeats: int) -> float:
    """Wall time of sampling one batch of ``texts`` (best of ``repeats``), per image."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe(texts, height=size[1], width=size[0], num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(demo.seed), max_sequence_length=128, output_type="np")
        best = min(best, time.perf_counter() - t0)
    return best / len(texts)


@torch.no_grad()
def seed_images(pipe, texts: List[str], size, steps: int, guidance: float, seeds: int, demo: DemoConfig):
    """[seed][prompt] images: the same prompts under ``seeds`` noise seeds."""
    return [pipe(texts, height=size[1], width=size[0], num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(demo.seed + 5000 + s), max_sequence_length=128).images
            for s in range(seeds)]


def diversity(images) -> List[float]:
    """Per prompt: the mean absolute pixel difference (0-1 scale) over every pair of seeds."""
    arrays = [[np.asarray(im, dtype=np.float32) / 255.0 for im in row] for row in images]
    out = []
    for p in range(len(arrays[0])):
        pairs = [np.abs(arrays[a][p] - arrays[b][p]).mean() for a in range(len(arrays))
                 for b in range(a + 1, len(arrays))]
        out.append(float(np.mean(pairs)))
    return out


def side_by_side(path: str, rows: Dict[str, List[Image.Image]], prompts: List[str], scale: int = 3) -> None:
    """One labelled row of images per model, the same prompts and seeds in each column."""
    w, h = rows[next(iter(rows))][0].size
    cw, ch, label = w * scale + 4, h * scale + 4, 150
    canvas = Image.new("RGB", (label + cw * len(prompts), 14 + ch * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(prompts):
        draw.text((label + j * cw, 1), text[:int(cw / 6)], fill="black")
    for i, (name, images) in enumerate(rows.items()):
        draw.text((2, 14 + i * ch + ch // 2 - 6), name, fill="black")
        for j, im in enumerate(images):
            canvas.paste(im.resize((w * scale, h * scale), Image.NEAREST), (label + j * cw, 14 + i * ch))
    save_image(canvas, path)


def run_stage(teacher: str, out: str, demo: DemoConfig, stage: DistillStageConfig,
              text_encoder: Optional[MiniLMTextEncoder] = None) -> dict:
    """Distil ``teacher`` (an exported folder of the demo's model) into ``out`` on the
    demo's fixed thread count (the result depends on it, not on the machine); returns the report."""
    with fixed_threads(demo.threads):
        return _run_stage(teacher, out, demo, stage, text_encoder)


def _run_stage(teacher: str, out: str, demo: DemoConfig, stage: DistillStageConfig,
               text_encoder: Optional[MiniLMTextEncoder]) -> dict:
    from ..models.transformer import LensTransformer2DModel
    from ..pipeline import detect_variant
    from ..train import InMemorySource, Trainer
    from ..train.build import model_folder

    t0 = time.time()
    text_encoder = text_encoder or MiniLMTextEncoder()
    demo = replace(demo, n_samples=stage.train_prompts or demo.n_samples,
                   eval_per_tag=stage.eval_per_tag or demo.eval_per_tag)
    prompts = heldout_prompts(demo.eval_per_tag, seed=demo.seed + 99)
    size = tuple(demo.eval_sizes[0])
    os.makedirs(out, exist_ok=True)
    with tqdm(total=2 + stage.steps, desc="distil", unit="it") as bar:
        data, data_info = build_data(demo, text_encoder, bar)
        tc = distill_train_config(demo, stage, data, teacher)
        bar.set_description("distilling")
        trainer = Trainer(tc, data=InMemorySource(data, batch_size=stage.batch, seed=demo.seed),
                          out_dir=os.path.join(out, "run"), callbacks=[_Progress(bar)])
        t1 = time.time()
        result = trainer.train()
        train_seconds = time.time() - t1
        export = trainer.recipe.export_path(trainer.run_dir)
        trainer.close()
    variant = detect_variant(export)
    models = {"teacher": (LensTransformer2DModel.from_pretrained(model_folder(teacher, "teacher")), "lens"),
              "student": (LensTransformer2DModel.from_pretrained(export), variant)}
    pipes = {name: _pipeline(model, text_encoder, demo, v) for name, (model, v) in models.items()}
    table = []
    with tqdm(total=len(rows(stage)) * len(PROMPT_MODES) * len(prompts), desc="held-out prompts", unit="img") as bar:
        for name, steps, cfg_on in rows(stage):
            guidance = demo.guidance if cfg_on else 1.0
            texts = model_prompts(prompts, demo.prompts, demo)[:32]
            table.append({"model": name, "steps": steps, "guidance": guidance,
                          "nfe": steps * (2 if guidance != 1.0 else 1),
                          "scores": score_modes(models[name][0], text_encoder, prompts, size, steps, guidance, demo,
                                                bar),
                          "seconds_per_image": seconds_per_image(pipes[name], texts, size, steps, guidance, demo,
                                                                 stage.timing_repeats)})
    second = []
    if stage.second_set_seed is not None:  # the noise: the headline rows on other prompts and seeds
        other = heldout_prompts(demo.eval_per_tag, seed=demo.seed + stage.second_set_seed)
        other_demo = replace(demo, seed=demo.seed + stage.second_set_seed)
        with tqdm(total=4 * len(PROMPT_MODES) * len(other), desc="second held-out set", unit="img") as bar:
            for name, steps, cfg_on in rows(stage)[:4]:
                guidance = demo.guidance if cfg_on else 1.0
                second.append({"model": name, "steps": steps, "guidance": guidance,
                               "scores": score_modes(models[name][0], text_encoder, other, size, steps, guidance,
                                                     other_demo, bar)})
    subset = prompts[:stage.diversity_prompts]
    div, shown = {}, {}
    for mode in PROMPT_MODES:
        texts = model_prompts(subset, mode, demo)
        for name, steps, guidance in (("teacher", stage.teacher_steps, demo.guidance),
                                      ("teacher", stage.student_steps, 1.0), ("student", stage.student_steps, 1.0)):
            images = seed_images(pipes[name], texts, size, steps, guidance, stage.diversity_seeds, demo)
            per_prompt = diversity(images)
            key = name if name == "student" or steps == stage.teacher_steps else f"teacher_{steps}_steps"
            div.setdefault(mode, {})[key] = {"mean": float(np.mean(per_prompt)), "per_prompt": per_prompt}
            if mode == demo.prompts:
                shown[f"{name} {steps} steps" + (f", CFG {guidance:g}" if guidance != 1.0 else "")] = images[0]
    n = stage.grid_prompts
    side_by_side(os.path.join(out, "samples.png"), {k: v[:n] for k, v in shown.items()},
                 [p["prompt"] for p in subset[:n]])
    report = {
        "teacher": os.path.abspath(teacher), "export": export, "variant": variant,
        "recommended": list(pipes["student"].recommended), "stage": asdict(stage), "demo": asdict(demo),
        "data": data_info, "steps": result.step, "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - t0, 1), "final_loss": result.losses[-1] if result.losses else None,
        "rows": table, "second_set": second, "diversity": div, "prompts": demo.prompts, "eval_size": list(size),
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__},
    }
    report["targets"] = targets(report)
    write_json(os.path.join(out, "report.json"), report)
    write_text(os.path.join(out, "report.md"), markdown(report))
    return report


def score_modes(model, text_encoder, prompts, size, steps: int, guidance: float, demo: DemoConfig, bar) -> dict:
    """ShapeEval of ``model`` on ``prompts`` in both prompt modes at ``steps`` and ``guidance``."""
    return {mode: _summary(sample_and_score(model, text_encoder, prompts, [size],
                                            replace(demo, sample_steps=steps, guidance=guidance), bar, mode)[0])
            for mode in PROMPT_MODES}


def _row(report, model, steps, cfg_on):
    return next(r for r in report["rows"] if r["model"] == model and r["steps"] == steps
                and (r["guidance"] != 1.0) == cfg_on)


def targets(report: dict) -> dict:
    """The issue's targets on the headline prompt mode: student (4 steps, guidance 1) vs
    the teacher at 20 steps with CFG (>= 90%) and at 4 steps (above both), diversity >= 70%."""
    mode, s, t = report["prompts"], report["stage"]["student_steps"], report["stage"]["teacher_steps"]
    student = _row(report, "student", s, False)["scores"][mode]["overall"]
    teacher20 = _row(report, "teacher", t, True)["scores"][mode]["overall"]
    best4 = max(_row(report, "teacher", s, c)["scores"][mode]["overall"] for c in (True, False))
    div = report["diversity"][mode]
    ratio = div["student"]["mean"] / max(div["teacher"]["mean"], 1e-9)
    out = {"score_ratio": student / max(teacher20, 1e-9), "score_ratio_met": 0 < teacher20 <= student / 0.9,
           "above_teacher_4_steps_by": student - best4, "above_teacher_4_steps_met": student > best4,
           "diversity_ratio": ratio, "diversity_met": ratio >= 0.7}
    if report.get("second_set"):  # the same on both held-out sets together (twice the prompts)
        both = {(r["model"], r["steps"], r["guidance"]): (r["scores"][mode]["overall"] + o["scores"][mode]["overall"]) / 2
                for r, o in zip(report["rows"], report["second_set"])}
        g = report["demo"]["guidance"]
        pooled_student, pooled_teacher20 = both[("student", s, 1.0)], both[("teacher", t, g)]
        out["both_sets"] = {"score_ratio": pooled_student / max(pooled_teacher20, 1e-9),
                            "above_teacher_4_steps_by": pooled_student - max(both[("teacher", s, g)],
                                                                             both[("teacher", s, 1.0)])}
    return out


def markdown(report: dict) -> str:
    lines = ["# Distillation stage: Decoupled DMD of the demo's teacher into a 4-step Turbo", "",
             "| model | steps | guidance | NFE | s / image | " + " | ".join(TAG_ORDER) + " | overall | prompts |",
             "|---" * (len(TAG_ORDER) + 7) + "|"]
    for r in report["rows"]:
        for mode in PROMPT_MODES:
            sc = r["scores"][mode]
            tags = " | ".join(f"{sc['per_tag'][t]:.2f}" for t in TAG_ORDER)
            label = f"**{mode}**" if mode == report["prompts"] else mode
            lines.append(f"| {r['model']} | {r['steps']} | {r['guidance']:g} | {r['nfe']} | "
                         f"{r['seconds_per_image'] * 1e3:.1f} ms | {tags} | {sc['overall']:.3f} | {label} |")
    t = report["targets"]
    st = report["stage"]
    lines += ["", f"Seed diversity (mean pairwise pixel distance, 0-1, between {st['diversity_seeds']} seeds of one "
              f"prompt; teacher {st['teacher_steps']} steps with CFG, student {st['student_steps']} steps):", ""]
    for mode, d in report["diversity"].items():
        extra = "".join(f", {k.replace('_', ' ')} {v['mean']:.4f}" for k, v in d.items() if k.startswith("teacher_"))
        lines.append(f"- {mode}: teacher {d['teacher']['mean']:.4f}{extra}, student {d['student']['mean']:.4f} "
                     f"({len(d['teacher']['per_prompt'])} prompts)")
    if report.get("second_set"):
        lines += ["", f"The noise: the same rows on a second held-out set (prompts, rewrites and noise seeds of "
                  f"seed + {st['second_set_seed']}), overall score as_written / rewritten, first set -> second set:",
                  ""]
        for r, o in zip(report["rows"], report["second_set"]):
            pair = " / ".join(f"{r['scores'][m]['overall']:.3f} -> {o['scores'][m]['overall']:.3f}"
                              for m in PROMPT_MODES)
            lines.append(f"- {o['model']} {o['steps']} steps, guidance {o['guidance']:g}: {pair}")
    first = report["rows"][0]["scores"][report["prompts"]]
    lines += ["", f"Targets ({report['prompts']} prompts): student 4 steps / guidance 1 at "
              f"{100 * t['score_ratio']:.0f}% of the teacher's {st['teacher_steps']}-step CFG score (target 90%: "
              f"{'met' if t['score_ratio_met'] else 'missed'}); {t['above_teacher_4_steps_by']:+.3f} over the "
              f"teacher's best 4-step score ({'met' if t['above_teacher_4_steps_met'] else 'missed'}); diversity "
              f"{100 * t['diversity_ratio']:.0f}% of the teacher's (target 70%: "
              f"{'met' if t['diversity_met'] else 'missed'})."
              + (f" Both held-out sets together: {100 * t['both_sets']['score_ratio']:.0f}% of the teacher's "
                 f"{st['teacher_steps']}-step CFG score, {t['both_sets']['above_teacher_4_steps_by']:+.3f} over its "
                 "best 4-step score." if "both_sets" in t else ""),
              f"Held-out prompts: {first['n']} per row and mode, canvas {report['eval_size']}, the same seeds "
              f"for every row; {report['steps']} student updates in {report['train_seconds']} s "
              f"({report['stage']['fake_updates']} fake updates each, batch {report['stage']['batch']}); "
              f"stage wall time {report['wall_seconds']} s on {report['machine']['cpu_count']} CPU cores. "
              f"The student reloads from {report['export']} as variant {report['variant']} "
              f"(defaults: {report['recommended'][0]} steps, guidance {report['recommended'][1]:g})."]
    return "\n".join(lines) + "\n"
