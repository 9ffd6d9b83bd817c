"""``lens-fast demo``: a miniature Lens trained, sampled and scored on a laptop CPU.

The real code paths run end to end: the Lens denoiser (4 blocks, 128 wide), real
pre-trained MiniLM text features through the multi-layer path (per-layer RMSNorm,
concatenation, txt_in), pixel space standing in for the VAE behind the same
interface, the project's trainer (bucketed in-memory source, logit-normal sigma,
caption dropout for CFG, EMA, warm-up then a linear LR cool-down fitted to the time
cap), and LensPipeline's sampler (CFG with the norm rescale). Held-out compositions
are scored with ShapeEval, GenEval-style. Ablations (``--ablation captions|resolution``)
train at equal compute.

Captions and prompts, as Lens does it: the default trains on complete captions (every
object's place, size, colour and class and the background; ``layout_caption``, the dense
caption's content in a compact template, so a step costs about a brief-caption step),
and the held-out GenEval-style prompts ("a circle", "a red square above a triangle") reach
the model through a prompt rewriter (``toy.rewrite``) that expands them into that style,
drawing what the prompt leaves open at random. Both are scored: ``rewritten`` (the
headline) and ``as_written`` (the brief prompt straight into the model).

Choices measured on a 2-core CPU (README, "The demo"; bench/results/demo_cpu2_2026-11-27/
and demo_cpu2_2026-11-27_sizes/): the toy world's object sizes (``toy.scene.SIZES``), a 36x36 canvas (9x9 tokens of 4x4 px: every 3x3-grid cell is centred on a token, so
all cells share one set of shape patterns), training sigmas at logit-normal mu 1.0
(the class of a shape must come from the text only at high sigma, where the sampler
spends most of its steps), CFG 2, and one square bucket: mixing in other aspect ratios
cost half or more of the score at this budget (0.188 vs 0.677 with the current sizes), even at 1/8 of the samples each or with the text's RoPE
offset unchanged (probably because each canvas puts the grid cells at other token
positions, and an image token's only absolute reference is its RoPE offset to the text
tokens, so each canvas needs its own layout); ``--ablation resolution`` trains the
2:3/1:1/3:2 buckets against one square size.

Time plan on a 2-core CPU (default): ~25 s data + text features, ~8 min training (the
480 s cap), ~1.5 min sampling and scoring before and after (both prompt modes).
``--quick`` shrinks everything to about a minute. Ablation arms train ``ablation_steps``
each (600; 40 with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from . import aspect_buckets, heldout_prompts, make_samples, score_set
from .captions import dense_caption, layout_caption
from .text import DEFAULT_LAYERS, HIDDEN, MiniLMTextEncoder

TAG_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass
class DemoConfig:
    name: str = "default"
    n_samples: int = 4000
    base: int = 36  # canvas area ~ base^2 per ratio; 36 px = 9x9 tokens, each grid cell centred on one
    # One square bucket by default: at this scale every extra aspect ratio costs more than it
    # teaches (README, "The demo"); --ablation resolution trains BUCKET_RATIOS against it.
    ratios: Tuple[Tuple[int, int], ...] = ((1, 1),)
    bucket_weights: Optional[Tuple[float, ...]] = None  # share of the samples per ratio (None: equal)
    pixel_patch: int = 4
    captions: str = "layout"  # layout | dense | brief | mixed (50/50 dense/brief); see the module docstring
    dense_words: int = 100  # word budget of the dense captions (40-100; optional sentences are dropped first)
    textures: Tuple[str, ...] = ("flat", "gradient", "noise")  # background textures of the training set
    train_mu: Optional[float] = 1.0  # logit-normal location of the training sigmas (None: 0 -> 0.3 by tokens)
    steps: int = 2400
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    decay_fraction: float = 0.4  # linear LR cool-down to 0 over this fraction of the steps that fit the time cap
    betas: Tuple[float, float] = (0.9, 0.95)  # AdamW
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    num_layers: int = 4
    heads: int = 4
    head_dim: int = 32
    eval_per_tag: int = 16
    eval_sizes: Tuple[Tuple[int, int], ...] = ((36, 36),)  # (width, height) canvases for held-out prompts
    rewrite_sizes: Tuple[str, ...] = ("small", "large")  # object sizes the rewriter may choose
    prompts: str = "rewritten"  # headline: "rewritten" (toy.rewrite, into the training caption style) or "as_written"
    sample_steps: int = 20
    guidance: float = 2.0
    sample_mu: Optional[float] = None  # sampler's time-shift location (None: the reference's empirical mu)
    seed: int = 0
    max_train_seconds: float = 480.0
    ablation_steps: int = 600  # optimiser steps of EACH ablation arm (equal compute across arms)


BUCKET_RATIOS = ((2, 3), (1, 1), (3, 2))  # the resolution ablation's bucketed arm

QUICK = dict(name="quick", n_samples=600, steps=120, warmup=20, ema_decay=0.9, eval_per_tag=4, sample_steps=10,
             max_train_seconds=60.0, ablation_steps=40)


def build_config(quick: bool, **overrides) -> DemoConfig:
    cfg = DemoConfig(**(QUICK if quick else {}))
    return replace(cfg, **overrides)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def build_data(cfg: DemoConfig, text_encoder: MiniLMTextEncoder, bar) -> Tuple[dict, dict]:
    """Render the training set per bucket, pixel-patchify it and attach cached text features."""
    from ..train.data import BucketData, PixelSpace

    buckets = aspect_buckets(cfg.base, cfg.ratios, multiple=cfg.pixel_patch)
    samples = make_samples(cfg.n_samples, cfg.seed, buckets=buckets, textures=cfg.textures,
                           bucket_weights=cfg.bucket_weights)
    rng = np.random.default_rng(cfg.seed + 17)
    dense = [dense_caption(s["scene"], max_words=cfg.dense_words) for s in samples] \
        if cfg.captions in ("dense", "mixed") else None
    if cfg.captions == "dense":
        captions = dense
    elif cfg.captions == "brief":
        captions = [s["brief"] for s in samples]
    elif cfg.captions == "layout":
        captions = [layout_caption(s["scene"]) for s in samples]
    elif cfg.captions == "mixed":
        captions = [d if rng.random() < 0.5 else s["brief"] for d, s in zip(dense, samples)]
    else:
        raise ValueError(f"captions={cfg.captions!r}; expected dense, brief, mixed or layout")
    bar.set_description("text features")
    feats, mask = text_encoder.encode(captions, max_sequence_length=128)
    bar.update(1)
    space = PixelSpace(cfg.pixel_patch)
    by_size: Dict[Tuple[int, int], List[int]] = {}
    for i, s in enumerate(samples):
        by_size.setdefault(tuple(s["size"]), []).append(i)
    data = {}
    for (w, h), idx in sorted(by_size.items()):
        images = torch.stack([_to_tensor(samples[i]["image"]) for i in idx])
        grid = space.latent_grid(h, w)
        index = torch.as_tensor(idx)
        data[grid] = BucketData(space.encode(images), [f[index] for f in feats], mask[index],
                                captions=[captions[i] for i in idx])
    bar.update(1)
    return data, {"buckets": [list(b) for b in buckets], "n_samples": len(samples)}


def model_kwargs(cfg: DemoConfig) -> dict:
    """The miniature Lens: the reference architecture at toy width, pixel-patch tokens."""
    d = cfg.head_dim
    return dict(patch_size=cfg.pixel_patch, in_channels=3 * cfg.pixel_patch ** 2, out_channels=3,
                num_layers=cfg.num_layers, attention_head_dim=d, num_attention_heads=cfg.heads,
                inner_dim=cfg.heads * d, enc_hidden_dim=HIDDEN, axes_dims_rope=[d // 4, 3 * d // 8, 3 * d // 8],
                gate_mlp=True, rms_norm=True, multi_layer_encoder_feature=True,
                selected_layer_index=list(DEFAULT_LAYERS))


def build_model(cfg: DemoConfig):
    """The miniature model with the trainer's own initialisation (adaLN-Zero as DiT:
    modulation and the output head start at zero, so every block starts as the identity)."""
    from ..models.transformer import LensTransformer2DModel
    from ..train.parallel import init_rule

    torch.manual_seed(cfg.seed)
    model = LensTransformer2DModel(**model_kwargs(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_rule(name, tuple(p.shape), cfg.seed))
    return model


def train_config(cfg: DemoConfig, data: dict):
    from ..train import load_config

    tc = load_config("tiny-cpu")
    tc.name = f"demo-{cfg.name}"
    tc.model.transformer.update(model_kwargs(cfg))
    tc.optim.lr, tc.optim.warmup_steps = cfg.lr, cfg.warmup
    tc.optim.betas = [float(b) for b in cfg.betas]
    tc.train.max_steps, tc.train.seed = cfg.steps, cfg.seed
    tc.loss.caption_dropout = cfg.caption_dropout
    tokens = sorted(g[0] * g[1] for g in data)
    tc.loss.mu_points = [[tokens[0], 0.0], [max(tokens[-1], tokens[0] + 1), 0.3]]
    if cfg.train_mu is not None:
        tc.loss.mu_points = [[p[0], float(cfg.train_mu)] for p in tc.loss.mu_points]
    tc.ema.decay = cfg.ema_decay
    tc.checkpoint.every = cfg.steps + 1  # no out_dir: nothing is written anyway
    tc.logging.every, tc.logging.sample_every, tc.logging.progress_bar = 10, 0, False
    tc.parallel.activation_checkpointing = "none"
    return tc


def _plan_steps(cfg: DemoConfig, trainer, planned: int, elapsed: float) -> int:
    """Steps that fit the time cap at the rate measured so far (frozen once the LR
    cool-down has started); sets the trainer's max_steps and decay_steps to match."""
    tc = trainer.cfg
    if trainer.step >= 50 and trainer.step < tc.train.max_steps - tc.optim.decay_steps:
        rate = elapsed / trainer.step
        fit = trainer.step + int(0.98 * (cfg.max_train_seconds - elapsed) / rate)
        planned = max(trainer.step + 1, min(cfg.steps, fit))
    decay = max(1, int(round(cfg.decay_fraction * planned)))
    tc.train.max_steps, tc.optim.decay_steps = planned, min(decay, planned)
    return planned


class _Progress:
    """Trainer callback: advances the demo's tqdm bar and records the loss curve."""

    def __init__(self, bar):
        self.bar, self.losses = bar, []

    def on_train_start(self, trainer):
        pass

    def on_step_end(self, trainer, step):
        self.bar.update(1)

    def on_log(self, trainer, record):
        self.losses.append((record["step"], record["loss"]))
        self.bar.set_postfix(loss=f"{record['loss']:.3f}")

    def on_checkpoint(self, trainer, path):
        pass

    def on_train_end(self, trainer, result):
        pass


PROMPT_MODES = ("as_written", "rewritten")
CAPTION_MODES = ("dense", "brief", "mixed", "layout")


def model_prompts(prompts: List[dict], mode: str, cfg: DemoConfig) -> List[str]:
    """The text each held-out prompt reaches the model as: the brief prompt itself, or its
    rewrite in the training caption style (layout for a layout-trained model, else dense;
    toy.rewrite reads only the prompt and draws what it leaves open from a generator fixed
    by the demo seed and the prompt's index)."""
    if mode == "as_written":
        return [p["prompt"] for p in prompts]
    if mode == "rewritten":
        from .rewrite import rewrite_prompt
        style = "layout" if cfg.captions == "layout" else "dense"
        return [rewrite_prompt(p["prompt"], np.random.default_rng([cfg.seed, 0x2E, i]), max_words=cfg.dense_words,
                               style=style, sizes=cfg.rewrite_sizes) for i, p in enumerate(prompts)]
    raise ValueError(f"prompts={mode!r}; expected one of {list(PROMPT_MODES)}")


def sample_and_score(model, text_encoder, prompts: List[dict], sizes, cfg: DemoConfig, bar,
                     mode: str = "as_written") -> Tuple[dict, list]:
    """Sample every held-out prompt (as written or rewritten) at every eval canvas with
    CFG, then ShapeEval against the prompt's own metadata."""
    from ..pipeline import LensPipeline
    from ..train.data import PixelSpace

    pipe = LensPipeline(model.eval(), PixelSpace(cfg.pixel_patch), text_encoder, variant="lens")
    pipe.set_progress_bar_config(disable=True)
    texts = model_prompts(prompts, mode, cfg)
    images, metas = [], []
    for w, h in sizes:
        for start in range(0, len(prompts), 32):
            chunk = prompts[start:start + 32]
            g = torch.Generator().manual_seed(cfg.seed + 1000 + start)
            with torch.no_grad():
                out = pipe(texts[start:start + 32], height=h, width=w, num_inference_steps=cfg.sample_steps,
                           guidance_scale=cfg.guidance, generator=g, max_sequence_length=128,
                           mu=cfg.sample_mu).images
            images += out
            metas += [p["metadata"] for p in chunk]
            bar.update(len(chunk))
    return score_set(images, metas), images


def evaluate(model, text_encoder, prompts, sizes, cfg: DemoConfig, bar) -> Tuple[Dict[str, dict], list]:
    """Scores under both prompt modes ({mode: score_set}) and the headline mode's images."""
    if cfg.prompts not in PROMPT_MODES:
        raise ValueError(f"prompts={cfg.prompts!r}; expected one of {list(PROMPT_MODES)}")
    scores, shown = {}, None
    for mode in PROMPT_MODES:
        scores[mode], images = sample_and_score(model, text_encoder, prompts, sizes, cfg, bar, mode)
        if mode == cfg.prompts:
            shown = images
    return scores, shown


def _grid_png(path: str, images: List[Image.Image], prompts: List[str], cols: int = 8, scale: int = 3) -> None:
    cell_w = max(im.size[0] for im in images) * scale
    cell_h = max(im.size[1] for im in images) * scale
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (cell_w + 4), rows * (cell_h + 16)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (im, text) in enumerate(zip(images, prompts)):
        x, y = (i % cols) * (cell_w + 4), (i // cols) * (cell_h + 16)
        canvas.paste(im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST), (x, y))
        draw.text((x, y + cell_h + 1), text[:22], fill="black")
    canvas.save(path)


def _loss_png(path: str, losses: List[Tuple[int, float]]) -> None:
    w, h, pad = 480, 280, 36
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, 8, w - 8, h - pad], outline="black")
    if len(losses) >= 2:
        steps, vals = zip(*losses)
        lo, hi = min(vals), max(vals)
        xs = [pad + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (w - 8 - pad) for s in steps]
        ys = [h - pad - (v - lo) / max(1e-9, hi - lo) * (h - pad - 16) for v in vals]
        d.line(list(zip(xs, ys)), fill=(200, 30, 30), width=2)
        d.text((pad, h - pad + 4), f"step {steps[0]}", fill="black")
        d.text((w - 90, h - pad + 4), f"step {steps[-1]}", fill="black")
        d.text((2, 10), f"{hi:.3f}", fill="black")
        d.text((2, h - pad - 12), f"{lo:.3f}", fill="black")
    d.text((pad + 6, 12), "training loss (flow matching MSE)", fill="black")
    img.save(path)


def run(cfg: DemoConfig, out: str, text_encoder: Optional[MiniLMTextEncoder] = None, eval_sizes=None,
        write_artifacts: bool = True, export: Optional[str] = None) -> dict:
    """Train, sample, score one configuration; returns its report dict. ``export``: a new
    folder to write the trained (EMA) model to as a diffusers ``transformer`` folder."""
    from ..train import InMemorySource, Trainer

    t0 = time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    text_encoder = text_encoder or MiniLMTextEncoder()
    eval_sizes = [tuple(s) for s in (eval_sizes or cfg.eval_sizes)]
    prompts = heldout_prompts(cfg.eval_per_tag, seed=cfg.seed + 99)
    n_eval = len(prompts) * len(eval_sizes)
    with tqdm(total=2 + cfg.steps + 4 * n_eval, desc=f"demo {cfg.name}", unit="it") as bar:
        data, data_info = build_data(cfg, text_encoder, bar)
        t_data = time.time() - t0
        model = build_model(cfg)
        bar.set_description("untrained baseline")
        untrained, _ = evaluate(model, text_encoder, prompts, eval_sizes, cfg, bar)
        source = InMemorySource(data, batch_size=cfg.batch, seed=cfg.seed)
        progress = _Progress(bar)
        trainer = Trainer(train_config(cfg, data), model=model, data=source, out_dir=None, callbacks=[progress])
        bar.set_description("training")
        t1 = time.time()
        # Chunks of 50 steps up to cfg.steps, stopping early at the wall-clock cap so the
        # demo's time budget holds on slower machines (the report says how far it got).
        # With a cool-down, the planned step count (and so where the cool-down starts) is
        # re-estimated from the measured step rate until the cool-down begins.
        planned = cfg.steps
        while trainer.step < planned and time.time() - t1 < cfg.max_train_seconds:
            if cfg.decay_fraction > 0:
                planned = _plan_steps(cfg, trainer, planned, time.time() - t1)
            trainer.train(max_steps=min(planned, trainer.step + 50))
        t_train = time.time() - t1
        if export:
            trainer.export(export)
        bar.set_description("sampling held-out prompts")
        scores, images = evaluate(trainer.ema_model(), text_encoder, prompts, eval_sizes, cfg, bar)
    steps_done = trainer.step
    report = {
        "config": asdict(cfg), "data": data_info, "steps": steps_done, "train_seconds": round(t_train, 1),
        "data_seconds": round(t_data, 1), "wall_seconds": round(time.time() - t0, 1),
        "throughput": {"steps_per_s": round(steps_done / max(t_train, 1e-9), 2),
                       "samples_per_s": round(steps_done * cfg.batch / max(t_train, 1e-9), 1)},
        "final_loss": float(np.mean([l for _, l in progress.losses[-5:]])) if progress.losses else None,
        "eval_sizes": [list(s) for s in eval_sizes],
        "prompts": cfg.prompts,
        "scores": _summary(scores[cfg.prompts]),
        "scores_by_prompts": {m: _summary(scores[m]) for m in PROMPT_MODES},
        "untrained": _summary(untrained[cfg.prompts]),
        "untrained_by_prompts": {m: _summary(untrained[m]) for m in PROMPT_MODES},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    if write_artifacts:
        os.makedirs(out, exist_ok=True)
        _grid_png(os.path.join(out, "samples.png"), images[:48], [p["prompt"] for p in prompts][:48])
        _loss_png(os.path.join(out, "loss.png"), progress.losses)
        report["artifacts"] = ["samples.png", "loss.png", "report.md", "report.json"]
    return report


def _summary(scores: dict) -> dict:
    return {"per_tag": {t: scores["per_tag"].get(t) for t in TAG_ORDER}, "overall": scores["overall"],
            "n": scores["n"]}


def _markdown(reports: Dict[str, dict], title: str) -> str:
    lines = [f"# {title}", "", "| run | prompts | steps | train s | " + " | ".join(TAG_ORDER) + " | overall | untrained |",
             "|---" * (len(TAG_ORDER) + 6) + "|"]
    for name, r in reports.items():
        for mode in PROMPT_MODES:
            sc, un = r["scores_by_prompts"][mode], r["untrained_by_prompts"][mode]
            tags = " | ".join(f"{sc['per_tag'][t]:.2f}" for t in TAG_ORDER)
            label = f"**{mode}**" if mode == r["prompts"] else mode
            lines.append(f"| {name} | {label} | {r['steps']} | {r['train_seconds']} | {tags} | {sc['overall']:.3f} | "
                         f"{un['overall']:.3f} |")
    first = next(iter(reports.values()))
    lines += ["", f"Held-out prompts: {first['scores']['n']} (compositions never seen in training), "
                  f"canvases {first['eval_sizes']}; ShapeEval (colour segmentation + shape geometry) against each "
                  "prompt's own metadata. `as_written`: the brief GenEval-style prompt goes to the model as is; "
                  "`rewritten`: `lens_fast.toy.rewrite` first expands it into the caption style the model trained on "
                  "(reading only the prompt; what it leaves open, such as places and unnamed colours, is drawn at "
                  "random). "
                  f"Bold: the headline mode ({first['prompts']}).",
              f"Throughput: {first['throughput']['samples_per_s']} samples/s; wall time {first['wall_seconds']} s "
              f"on {first['machine']['cpu_count']} CPU cores (torch {first['machine']['torch']})."]
    return "\n".join(lines) + "\n"


def _write(out: str, reports: Dict[str, dict], title: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(reports if len(reports) > 1 else next(iter(reports.values())), f, indent=2)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(_markdown(reports, title))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="lens-fast demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="~2 minute version (CI)")
    p.add_argument("--out", default="demo_out", help="output folder (must be new or empty)")
    p.add_argument("--ablation", choices=["captions", "resolution", "narrow"], help="equal-compute ablation (narrow: "
                   "with --rl, RL on single objects only against the taxonomy set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rl", metavar="FOLDER", help="the RL stage (lens_fast.toy.rl_stage) on the demo's exported model")
    p.add_argument("--lifecycle", action="store_true", help="pre-train, then distil the exported model into a "
                                                            "4-step Turbo and score both (lens_fast.toy.lifecycle)")
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise FileExistsError(f"--out {args.out} is not empty; choose a new folder (nothing is overwritten)")
    cfg = build_config(args.quick, seed=args.seed)
    text_encoder = MiniLMTextEncoder()
    if args.ablation:
        # Every arm trains the same number of optimiser steps on the same batch size (the
        # time cap is only a guard); each arm's wall time is in its report.
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
