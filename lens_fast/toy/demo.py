"""``lens-fast demo``: a miniature Lens trained, sampled and scored on a laptop CPU.

The real code paths run end to end: the Lens denoiser (4 blocks, 128 wide), real
pre-trained MiniLM text features through the multi-layer path (per-layer RMSNorm,
concatenation, txt_in), pixel space standing in for the VAE behind the same
interface, the project's trainer (bucketed in-memory source, logit-normal sigma,
caption dropout for CFG, EMA, warm-up then a linear LR cool-down over the last 40% of
the steps), and LensPipeline's sampler (CFG with the norm rescale). Held-out compositions
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

Reproducible: the run is a fixed number of optimiser steps (``steps``, 1,800) on fixed
seeds with a fixed thread count (``threads``, 2), so the same software gives the same
score on any machine and under any load, bit for bit on the same CPU type (the report
carries a hash of the trained weights to check that); the wall time is reported, not
budgeted. Time plan on a 2-core CPU (default): ~25 s data + text features, ~8 min
training, ~1.5 min sampling and scoring before and after (both prompt modes).
``--quick`` shrinks everything to about a minute. Ablation arms train ``ablation_steps``
each (600; 40 with ``--quick``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..atomic import save_image, write_json, write_text
from ..errors import InvalidValue, MissingFile
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
    steps: int = 1800  # the fixed training budget (optimiser steps): the score does not depend on machine speed
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    decay_fraction: float = 0.4  # linear LR cool-down to 0 over this fraction of the steps
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
    # Intra-op threads for training and sampling. Results depend on the thread count (not on
    # the core count or load), so it is fixed. `lens-fast demo` runs with OMP_WAIT_POLICY=PASSIVE
    # (lens_fast.cli.passive_openmp): with the default policy, two threads ran 4-13x slower
    # whenever another CPU-heavy process shared the 2 cores (README, "Reliability").
    threads: int = 2
    ablation_steps: int = 600  # optimiser steps of EACH ablation arm (equal compute across arms)


BUCKET_RATIOS = ((2, 3), (1, 1), (3, 2))  # the resolution ablation's bucketed arm

QUICK = dict(name="quick", n_samples=600, steps=120, warmup=20, ema_decay=0.9, eval_per_tag=4, sample_steps=10,
             ablation_steps=40)


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
        raise InvalidValue(f"captions={cfg.captions!r}; expected dense, brief, mixed or layout")
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
    tc.optim.decay_steps = min(cfg.steps, max(1, int(round(cfg.decay_fraction * cfg.steps)))) \
        if cfg.decay_fraction > 0 else 0
    tc.ema.decay = cfg.ema_decay
    tc.checkpoint.every = cfg.steps + 1  # no out_dir: nothing is written anyway
    tc.logging.every, tc.logging.sample_every, tc.logging.progress_bar = 10, 0, False
    tc.parallel.activation_checkpointing = "none"
    return tc


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
    raise InvalidValue(f"prompts={mode!r}; expected one of {list(PROMPT_MODES)}")


def sample_and_score(model, text_encoder, prompts: List[dict], sizes, cfg: DemoConfig, bar,
                     mode: str = "as_written", texts: Optional[List[str]] = None) -> Tuple[dict, list]:
    """Sample every held-out prompt (as written or rewritten; ``texts``: what to give the
    model instead, one per prompt, e.g. another rewriter's) at every eval canvas with CFG,
    then ShapeEval against the prompt's own metadata."""
    from ..pipeline import LensPipeline
    from ..train.data import PixelSpace

    pipe = LensPipeline(vae=PixelSpace(cfg.pixel_patch), text_encoder=text_encoder, transformer=model.eval(),
                        lens_defaults=True)
    pipe.set_progress_bar_config(disable=True)
    texts = model_prompts(prompts, mode, cfg) if texts is None else list(texts)
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
        raise InvalidValue(f"prompts={cfg.prompts!r}; expected one of {list(PROMPT_MODES)}")
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
    save_image(canvas, path)


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
    save_image(img, path)


def weights_digest(model) -> str:
    """A short hash of a model's weights: two runs that agree on it trained bit for bit alike."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def fixed_threads(n: int):
    """``torch.set_num_threads(n)`` for the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(cfg: DemoConfig, out: str, text_encoder: Optional[MiniLMTextEncoder] = None, eval_sizes=None,
        write_artifacts: bool = True, export: Optional[str] = None) -> dict:
    """Train, sample, score one configuration; returns its report dict. A fixed number
    of steps on ``cfg.threads`` threads: the result does not depend on the machine's
    speed, core count or load. ``export``: a new folder to write the trained (EMA) model to
    as a diffusers ``transformer`` folder."""
    with fixed_threads(cfg.threads):
        return _run(cfg, out, text_encoder, eval_sizes, write_artifacts, export)


def _run(cfg: DemoConfig, out: str, text_encoder, eval_sizes, write_artifacts: bool, export: Optional[str]) -> dict:
    from ..train import InMemorySource, Trainer

    t0 = time.time()
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
        trainer.train(max_steps=cfg.steps)
        t_train = time.time() - t1
        if export:
            trainer.export(export)
        bar.set_description("sampling held-out prompts")
        ema = trainer.ema_model()
        scores, images = evaluate(ema, text_encoder, prompts, eval_sizes, cfg, bar)
    steps_done = trainer.step
    report = {
        "config": asdict(cfg), "data": data_info, "steps": steps_done, "train_seconds": round(t_train, 1),
        "data_seconds": round(t_data, 1), "wall_seconds": round(time.time() - t0, 1),
        "throughput": {"steps_per_s": round(steps_done / max(t_train, 1e-9), 2),
                       "samples_per_s": round(steps_done * cfg.batch / max(t_train, 1e-9), 1)},
        "final_loss": float(np.mean([l for _, l in progress.losses[-5:]])) if progress.losses else None,
        "weights_sha256": weights_digest(ema),
        "eval_sizes": [list(s) for s in eval_sizes],
        "prompts": cfg.prompts,
        "scores": _summary(scores[cfg.prompts]),
        "scores_by_prompts": {m: _summary(scores[m]) for m in PROMPT_MODES},
        "untrained": _summary(untrained[cfg.prompts]),
        "untrained_by_prompts": {m: _summary(untrained[m]) for m in PROMPT_MODES},
        "machine": {"cpu_count": os.cpu_count(), "threads": cfg.threads, "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    if write_artifacts:
        _grid_png(os.path.join(out, "samples.png"), images[:48], [p["prompt"] for p in prompts][:48])
        _loss_png(os.path.join(out, "loss.png"), progress.losses)
        trainer.ema_model().save_pretrained(os.path.join(out, "transformer"))  # to sample again: load_demo_model
        report["artifacts"] = ["samples.png", "loss.png", "report.md", "report.json", "transformer/"]
    return report


def load_demo_model(run_dir: str):
    """(model, config) of a finished demo run folder: its EMA transformer (``transformer/``)
    and the DemoConfig in its ``report.json``."""
    from ..models.transformer import LensTransformer2DModel

    path = os.path.join(run_dir, "report.json")
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(run_dir, "transformer")):
        raise MissingFile(f"{run_dir} holds no report.json and transformer/; expected the folder of a "
                                "finished `lens-fast demo` run")
    with open(path, encoding="utf-8") as f:
        values = json.load(f)["config"]
    known = {f.name for f in fields(DemoConfig)}
    # Keys of older demo versions (e.g. max_train_seconds before the fixed step budget) describe
    # how the run was trained, not the model: left out, so older run folders still load.
    values = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in values.items() if k in known}
    cfg = DemoConfig(**values)
    return LensTransformer2DModel.from_pretrained(os.path.join(run_dir, "transformer")), cfg


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
              f"with {first['machine']['threads']} threads on {first['machine']['cpu_count']} CPU cores "
              f"(torch {first['machine']['torch']}); trained weights {first['weights_sha256']} (the same hash: the "
              "same model, bit for bit)."]
    return "\n".join(lines) + "\n"


def _write(out: str, reports: Dict[str, dict], title: str) -> None:
    write_json(os.path.join(out, "report.json"), reports if len(reports) > 1 else next(iter(reports.values())),
               indent=2)
    write_text(os.path.join(out, "report.md"), _markdown(reports, title))
