"""The demo's RL stage: online RL (DiffusionNFT, ``lens-fast train --recipe rl``) of the
demo's pre-trained model, loaded from its exported folder, with the ShapeEval reward on
the toy world's taxonomy prompt set, for a fixed number of steps.

    lens-fast demo --rl FOLDER --out DIR                 # FOLDER: the demo's exported model
    python -m lens_fast.toy.rl_stage --policy FOLDER --out DIR [--ablation] [--seeds 0 1] [--quick]

The prompts are built from ``lens_fast/toy/taxonomy.yaml`` (``lens-fast rl-prompts
--taxonomy toy``), whose exclusions are the held-out compositions, and reach the model
through the toy rewriter, as held-out prompts do. The report (markdown + JSON) compares
the model before and after on the demo's held-out prompts, per tag, in both prompt modes,
with the same prompts, seeds and sampler (``eval_steps`` steps, the RL guidance); the
reward curve per tag; seed diversity (mean pairwise pixel distance between seeds of one
prompt) before and after; a before / after grid. ``--ablation`` adds the paper's ablation
in miniature: the same budget on a narrow prompt set (single objects only) against the
taxonomy set, every tag scored.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..train import Callback
from . import heldout_prompts
from .demo import PROMPT_MODES, TAG_ORDER, DemoConfig, _summary, build_config, model_prompts, sample_and_score
from .distill_stage import _pipeline, diversity, seed_images, side_by_side
from .text import MiniLMTextEncoder


@dataclass
class RLStageConfig:
    steps: int = 40  # a fixed budget of RL steps (the same run on any machine)
    prompts_per_step: int = 8  # G
    images_per_prompt: int = 8  # K
    sample_steps: int = 10  # the rollout sampler's steps (its sigmas are the training times)
    guidance: float = 1.0  # rollout and policy CFG (1: CFG-free, as DiffusionNFT); the held-out sampler's too
    timesteps_per_sample: int = 1
    lr: float = 3e-4  # AdamW with the demo's betas, constant (tuned: 1e-4 and 3e-5 lost or kept the score at 40 steps)
    beta: float = 1.0
    adv_clip: float = 5.0
    kl_weight: float = 0.0
    old_decay: Tuple[float, float, float] = (0, 0.001, 0.5)  # [flat steps, rate, cap] (train/rl.md)
    ema_decay: float = 0.9
    kinds: Optional[Sequence[str]] = None  # prompt kinds of the taxonomy (None: all)
    seed: int = 0
    eval_per_tag: int = 32  # held-out prompts per tag
    heldout_seed: Optional[int] = None  # the held-out draw (None: the demo's, seed + 99); tune on another draw
    eval_steps: int = 20  # held-out sampler steps (the demo's)
    diversity_prompts: int = 24
    diversity_seeds: int = 4
    grid_prompts: int = 24  # the first seed of the diversity prompts
    threads: Optional[int] = None  # torch threads (None: every core, as the demo)


QUICK = dict(steps=2, prompts_per_step=2, images_per_prompt=2, sample_steps=3, eval_per_tag=1, eval_steps=4,
             diversity_prompts=2, diversity_seeds=2, grid_prompts=3)
NARROW = ("object",)  # the ablation's narrow prompt set: single objects only


def stage_config(quick: bool, **overrides) -> RLStageConfig:
    return replace(RLStageConfig(**(QUICK if quick else {})), **overrides)


def rl_train_config(demo: DemoConfig, stage: RLStageConfig, policy: str, prompts: str):
    """The trainer config of the stage: the demo's model and optimiser settings, recipe rl."""
    from ..train import load_config

    tc = load_config("tiny-cpu")
    tc.name, tc.recipe = f"demo-rl-{demo.name}", "rl"
    tc.model.pretrained = policy
    tc.encoders.vae, tc.encoders.pixel_patch = "pixel", demo.pixel_patch
    tc.optim.lr, tc.optim.warmup_steps, tc.optim.betas = stage.lr, 0, [float(b) for b in demo.betas]
    tc.train.max_steps, tc.train.seed = stage.steps, stage.seed
    tc.ema.decay = stage.ema_decay
    tc.checkpoint.every = max(1, stage.steps // 2)
    tc.logging.every, tc.logging.progress_bar = 1, False
    tc.parallel.activation_checkpointing = "none"
    tc.rl = replace(tc.rl, prompts=prompts, rewards={"shapeeval": 1.0}, rewrite="toy",
                    prompts_per_step=stage.prompts_per_step, images_per_prompt=stage.images_per_prompt,
                    height=demo.eval_sizes[0][1], width=demo.eval_sizes[0][0], sample_steps=stage.sample_steps,
                    guidance=stage.guidance, sample_mu=demo.sample_mu, rollout_batch=64,
                    timesteps_per_sample=stage.timesteps_per_sample, beta=stage.beta, adv_clip=stage.adv_clip,
                    kl_weight=stage.kl_weight, old_decay=list(stage.old_decay), rollout_dtype="float32", frozen_dtype="float32",
                    max_text_tokens=128)
    tc.validate()
    return tc


class RewardCurve(Callback):
    """Trainer callback: the mean reward of every step, overall and per tag."""

    def __init__(self, bar):
        self.bar, self.steps = bar, []

    def on_step_end(self, trainer, step):
        last = trainer.recipe.last
        rewards = last["rewards"].mean(1).tolist()  # per prompt
        tags: Dict[str, List[float]] = {}
        for record, value in zip(last["records"], rewards):
            tags.setdefault(record["tag"], []).append(value)
        self.steps.append({"step": step, "reward": float(np.mean(rewards)),
                           "per_tag": {t: float(np.mean(v)) for t, v in tags.items()}})
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{self.steps[-1]['reward']:.3f}")


def train_arm(policy: str, out: str, demo: DemoConfig, stage: RLStageConfig, text_encoder) -> dict:
    """RL of ``policy`` into ``out`` (prompt set, run folder, export); returns the arm's record."""
    from ..rl.prompts import build_prompt_set, coverage, load_taxonomy, write_prompt_set
    from ..train import Trainer
    from ..train.data import PixelSpace
    from ..train.rollout import PromptSource
    from .rewrite import layout_rewrite

    os.makedirs(out, exist_ok=True)
    taxonomy = load_taxonomy("toy")
    records = build_prompt_set(taxonomy, seed=stage.seed, kinds=stage.kinds)
    prompts = write_prompt_set(os.path.join(out, "prompts.jsonl"), records)
    tc = rl_train_config(demo, stage, policy, prompts)
    source = PromptSource(records, text_encoder, stage.prompts_per_step, stage.seed, layout_rewrite, 128,
                          PixelSpace(demo.pixel_patch))
    with tqdm(total=stage.steps, desc=f"RL {os.path.basename(out)}", unit="step") as bar:
        curve = RewardCurve(bar)
        trainer = Trainer(tc, data=source, out_dir=os.path.join(out, "run"), callbacks=[curve])
        t0 = time.time()
        try:
            trainer.train()
        finally:
            trainer.close()
        seconds = time.time() - t0
    return {"export": trainer.recipe.export_path(trainer.run_dir), "train_seconds": round(seconds, 1),
            "steps": trainer.step, "rollouts": trainer.step * stage.prompts_per_step * stage.images_per_prompt,
            "coverage": coverage(records, taxonomy), "reward_curve": curve.steps}


def spread(prompts: List[dict], n: int) -> List[dict]:
    """``n`` prompts taken evenly over the list (held-out prompts come tag by tag)."""
    return [prompts[int(i)] for i in np.linspace(0, len(prompts) - 1, min(n, len(prompts)))]


def evaluate(model, text_encoder, prompts, demo: DemoConfig, stage: RLStageConfig) -> dict:
    """Held-out scores in both prompt modes and seed diversity (headline mode)."""
    sampler = replace(demo, guidance=stage.guidance, sample_steps=stage.eval_steps)
    with tqdm(total=len(PROMPT_MODES) * len(prompts), desc="held-out prompts", unit="img") as bar:
        scores = {mode: _summary(sample_and_score(model, text_encoder, prompts, [demo.eval_sizes[0]], sampler, bar,
                                                  mode)[0]) for mode in PROMPT_MODES}
    subset = spread(prompts, stage.diversity_prompts)
    texts = model_prompts(subset, demo.prompts, demo)
    pipe = _pipeline(model, text_encoder, demo, "lens")
    images = seed_images(pipe, texts, demo.eval_sizes[0], stage.eval_steps, stage.guidance, stage.diversity_seeds,
                         demo)
    per_prompt = diversity(images)
    return {"scores": scores, "diversity": {"mean": float(np.mean(per_prompt)), "per_prompt": per_prompt},
            "grid": images[0][:stage.grid_prompts]}


def _curve_png(path: str, arms: Dict[str, dict]) -> None:
    """Mean reward per step, one line per arm (and per tag of the first arm, thin)."""
    w, h, pad = 560, 300, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, 10, w - 10, h - pad], outline="black")
    colours = [(200, 30, 30), (30, 90, 200), (30, 150, 60), (150, 60, 190)]
    steps = max(len(a["reward_curve"]) for a in arms.values())
    for i, (name, arm) in enumerate(arms.items()):
        pts = [(pad + (p["step"] - 1) / max(1, steps - 1) * (w - 10 - pad), h - pad - p["reward"] * (h - pad - 10))
               for p in arm["reward_curve"]]
        if len(pts) > 1:
            d.line(pts, fill=colours[i % 4], width=2)
        d.text((pad + 6, 14 + 12 * i), f"{name}: mean reward per step", fill=colours[i % 4])
    d.text((4, 8), "1.0", fill="black")
    d.text((4, h - pad - 8), "0.0", fill="black")
    d.text((pad, h - pad + 6), "step 1", fill="black")
    d.text((w - 70, h - pad + 6), f"step {steps}", fill="black")
    img.save(path)


def targets(before: dict, after: dict, mode: str) -> dict:
    """The issue's targets: overall up >= 0.10, no tag down by more than 0.05, diversity >= 70%."""
    b, a = before["scores"][mode], after["scores"][mode]
    drops = {t: a["per_tag"][t] - b["per_tag"][t] for t in TAG_ORDER}
    ratio = after["diversity"]["mean"] / max(before["diversity"]["mean"], 1e-9)
    gain = a["overall"] - b["overall"]
    return {"overall_gain": gain, "overall_met": gain >= 0.10, "worst_tag": min(drops, key=drops.get),
            "worst_tag_change": min(drops.values()), "tags_met": min(drops.values()) >= -0.05,
            "diversity_ratio": ratio, "diversity_met": ratio >= 0.7}


def markdown(report: dict) -> str:
    mode, stage = report["prompts"], report["stage"]
    lines = ["# RL stage: DiffusionNFT of the demo's model with the ShapeEval reward", "",
             "| model | prompts | " + " | ".join(TAG_ORDER) + " | overall | diversity |", "|---" * (len(TAG_ORDER) + 4) + "|"]
    rows = {"before": report["before"], **{f"after ({name})": arm["after"] for name, arm in report["arms"].items()}}
    for name, res in rows.items():
        for m in PROMPT_MODES:
            sc = res["scores"][m]
            tags = " | ".join(f"{sc['per_tag'][t]:.2f}" for t in TAG_ORDER)
            div = f"{res['diversity']['mean']:.4f}" if m == mode else ""
            lines.append(f"| {name} | {'**' + m + '**' if m == mode else m} | {tags} | {sc['overall']:.3f} | {div} |")
    lines += ["", "Targets (headline mode, each arm against before):", ""]
    for name, arm in report["arms"].items():
        t = arm["targets"]
        lines.append(f"- {name}: overall {t['overall_gain']:+.3f} (target +0.10: {'met' if t['overall_met'] else 'missed'}); "
                     f"worst tag {t['worst_tag']} {t['worst_tag_change']:+.3f} (target >= -0.05: "
                     f"{'met' if t['tags_met'] else 'missed'}); diversity {100 * t['diversity_ratio']:.0f}% of before "
                     f"(target 70%: {'met' if t['diversity_met'] else 'missed'}); {arm['steps']} steps, "
                     f"{arm['rollouts']} rollouts, {arm['train_seconds']} s, {arm['coverage']['prompts']} prompts "
                     f"({', '.join(f'{k} {n}' for k, n in arm['coverage']['kinds'].items())})")
    n = report["before"]["scores"][mode]["n"]
    lines += ["", f"Held-out: {n} prompts ({stage['eval_per_tag']} per tag, the demo's held-out compositions), canvas "
              f"{report['eval_size']}, {stage['eval_steps']} steps, CFG {stage['guidance']:g}, the same seeds for every "
              f"row. A tag of {stage['eval_per_tag']} prompts moves by about +-{1 / stage['eval_per_tag'] ** 0.5 / 2:.2f} "
              "between prompt draws (binomial standard error at 0.5). Diversity: mean pairwise pixel distance (0-1) "
              f"between {stage['diversity_seeds']} seeds of each of {stage['diversity_prompts']} prompts. "
              f"RL: {stage['prompts_per_step']} prompts x {stage['images_per_prompt']} rollouts per step, "
              f"{stage['sample_steps']} sampler steps, lr {stage['lr']:g}, beta {stage['beta']:g}, seed {stage['seed']}. "
              f"Stage wall time {report['wall_seconds']} s on {report['machine']['cpu_count']} CPU cores."]
    return "\n".join(lines) + "\n"


def run_stage(policy: str, out: str, demo: DemoConfig, stage: RLStageConfig, ablation: bool = False,
              text_encoder: Optional[MiniLMTextEncoder] = None) -> dict:
    """RL of ``policy`` (an exported folder of the demo's model) into ``out``; the report."""
    from ..models.transformer import LensTransformer2DModel
    from ..train.build import model_folder

    t0 = time.time()
    torch.set_num_threads(stage.threads or max(1, os.cpu_count() or 1))
    text_encoder = text_encoder or MiniLMTextEncoder()
    demo = replace(demo, eval_per_tag=stage.eval_per_tag)
    heldout_seed = demo.seed + 99 if stage.heldout_seed is None else stage.heldout_seed
    prompts = heldout_prompts(stage.eval_per_tag, seed=heldout_seed)
    before = evaluate(LensTransformer2DModel.from_pretrained(model_folder(policy, "--rl")), text_encoder, prompts,
                      demo, stage)
    arms_cfg = {"taxonomy": stage}
    if ablation:
        arms_cfg["narrow"] = replace(stage, kinds=NARROW)
    arms, grid = {}, {"before": before.pop("grid")}
    for name, arm_stage in arms_cfg.items():
        arm = train_arm(policy, os.path.join(out, name), demo, arm_stage, text_encoder)
        arm["after"] = evaluate(LensTransformer2DModel.from_pretrained(arm["export"]), text_encoder, prompts, demo,
                                arm_stage)
        grid[f"after ({name})"] = arm["after"].pop("grid")
        arm["targets"] = targets(before, arm["after"], demo.prompts)
        arms[name] = arm
    side_by_side(os.path.join(out, "samples.png"), grid, [p["prompt"] for p in spread(prompts, stage.diversity_prompts)[:stage.grid_prompts]])
    _curve_png(os.path.join(out, "reward.png"), arms)
    report = {"policy": os.path.abspath(policy), "stage": asdict(stage), "prompts": demo.prompts,
              "eval_size": list(demo.eval_sizes[0]), "before": before, "arms": arms,
              "wall_seconds": round(time.time() - t0, 1),
              "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__}}
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report))
    return report


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lens_fast.toy.rl_stage", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="the demo's exported model (a transformer folder or its root)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--ablation", action="store_true", help="also RL on single objects only, at the same budget")
    p.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise FileExistsError(f"--out {args.out} is not empty; choose a new folder (nothing is overwritten)")
    report = run_stage(args.policy, args.out, build_config(args.quick), stage_config(args.quick, seed=args.seed),
                       args.ablation)
    print(markdown(report))
    print(f"wrote {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
