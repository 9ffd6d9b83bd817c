"""RL-step benchmark of the ``rl`` recipe (DiffusionNFT) at the official width.

One trainer step = rollouts (``--prompts`` x ``--images`` images through the pipeline's
sampler, ``--sample-steps`` CFG-free steps), decode + reward, then one policy update on
``--times`` noised copies of every rollout: dim 1536 (24 heads x 64), SwiGLU 4096, text
features 2880 x 4 layers, as many blocks as fit one card (``--layers auto``), FSDP2 with
the policy in fp32 masters (bf16 compute, AdamW, EMA, activation checkpointing) and the
old and reference policies stored in bf16. The step runs twice: rollouts through the
inference engine (``rl.fast_rollouts``: an unsharded bf16 copy of the old policy,
compiled blocks and CUDA graphs on a GPU) and through the reference sampler on the
sharded old policy. Text features are fixed random tensors and the decoder a fixed
random projection of the tokens to pixels (the VAE is not what is measured); the reward
is the image's mean brightness.

Reported per path: rollout images/s, the update's time and model TFLOP/s (forwards of
``RLRecipe.forwards`` minus the sampler's), the whole step's time.

    python bench/rl_step.py --out bench/results/rl_step_h100.json
    torchrun --nproc_per_node 8 bench/rl_step.py --layers 48 --prompts 16 --images 8 --area 1024
    python bench/rl_step.py --dry-run --out /tmp/rl_step.json    # CPU, tiny model
"""
from __future__ import annotations

import os
import statistics
import sys

import numpy as np
import torch

from lens_fast.flops import lens_forward_flops
from lens_fast.rl.rewards import RewardResult
from lens_fast.train import Callback, PixelSpace, Trainer, load_config
from lens_fast.train.rollout import PromptSource
from distill_step import largest_case, model_once  # bench/
from train_step import OFFICIAL_WIDTH, bench_parser, finish, setup_device  # bench/


class RandomText:
    """Fixed random text features: ``encode`` returns [B, text_len, dim] per layer."""

    def __init__(self, layers: int, dim: int, text_len: int):
        self.layers, self.dim, self.text_len = layers, dim, text_len

    def encode(self, prompts, max_sequence_length=512, device=None):
        g = torch.Generator().manual_seed(0)
        feats = [torch.randn(len(prompts), self.text_len, self.dim, generator=g) for _ in range(self.layers)]
        return feats, torch.ones(len(prompts), self.text_len, dtype=torch.bool)


class ProjectionDecoder:
    """Tokens [B, N, C] -> images: a fixed random projection of each token to a 16 x 16 patch."""

    spatial_factor = 16

    def __init__(self, channels: int, device):
        g = torch.Generator().manual_seed(0)
        self.weight = (torch.randn(channels, 3 * 16 * 16, generator=g) / channels ** 0.5).to(device)

    def latent_grid(self, height, width):
        return height // 16, width // 16

    def decode(self, tokens, height, width):
        h, w = self.latent_grid(height, width)
        x = torch.tanh(tokens.float() @ self.weight).view(-1, h, w, 3, 16, 16)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, 3, h * 16, w * 16)


class Brightness:
    name = "brightness"

    def score(self, images, prompts, metadata):
        return [RewardResult(float(np.asarray(im).mean() / 255.0)) for im in images]


class PhaseTimes(Callback):
    """The recipe's own phase timings of every step (rollout, reward, update)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, trainer, step):
        self.steps.append(dict(trainer.recipe.last_times))


def make_config(args, layers, cpu, start, fast):
    cfg = load_config("tiny-cpu" if cpu else "rl")
    cfg.recipe = "rl"
    if not cpu:
        cfg.model.transformer.update(OFFICIAL_WIDTH, num_layers=layers)
        cfg.parallel.activation_checkpointing = args.ac
        cfg.parallel.compile = not args.no_compile
    cfg.model.pretrained = start
    side = args.area if not cpu else 16
    cfg.rl.prompts_per_step, cfg.rl.images_per_prompt = args.prompts, args.images
    cfg.rl.height = cfg.rl.width = side
    cfg.rl.sample_steps, cfg.rl.timesteps_per_sample = args.sample_steps, args.times
    cfg.rl.rollout_batch, cfg.rl.fast_rollouts = args.rollout_batch, fast
    cfg.rl.rollout_dtype = cfg.rl.frozen_dtype = "float32" if cpu else "bfloat16"
    cfg.rl.rewards = {"shapeeval": 1.0}  # replaced by Brightness below; keeps the config valid
    cfg.train.max_steps = args.warmup + args.steps
    cfg.optim.warmup_steps = 1
    cfg.logging.progress_bar = False
    cfg.logging.every = args.warmup + args.steps
    cfg.checkpoint.every = 10 ** 9
    cfg.validate()
    return cfg


def run_path(args, layers, device, cpu, start, fast) -> dict:
    from lens_fast.train.rl import RLRecipe

    cfg = make_config(args, layers, cpu, start, fast)
    t = cfg.model.transformer
    text = RandomText(len(t["selected_layer_index"]), t["enc_hidden_dim"], args.text_len if not cpu else 5)
    records = [{"prompt": f"prompt {i}", "rubric": ["anything"], "metadata": {}} for i in range(4 * args.prompts)]
    decoder = PixelSpace(4) if cpu else ProjectionDecoder(t["in_channels"], device)
    data = PromptSource(records, text, args.prompts, image_encoder=decoder)
    phases = PhaseTimes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    recipe = RLRecipe(reward=Brightness())
    trainer = Trainer(cfg, data=data, recipe=recipe, callbacks=[phases], device=str(device))
    try:
        trainer.train()
    finally:
        trainer.close()
    steady = phases.steps[args.warmup:]
    med = {k: statistics.median(s[k] for s in steady) for k in steady[0]}
    world = trainer.dist.world
    images = args.prompts * args.images // world
    grid = decoder.latent_grid(cfg.rl.height, cfg.rl.width)
    n_img, n_txt = grid[0] * grid[1], text.text_len
    update_forwards = recipe.forwards(cfg) - cfg.rl.sample_steps
    flops = update_forwards * lens_forward_flops(t, n_img, n_txt, images)["total"]
    return {"rollout_s": med["rollout_s"], "rollout_images_per_s": images / med["rollout_s"],
            "reward_s": med["reward_s"], "update_ms": 1e3 * med["update_s"],
            "update_tflops": flops / med["update_s"] / 1e12, "step_s": sum(med.values()),
            "first_steps": phases.steps[:args.warmup],
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}


def run_case(args, layers, device, cpu, work) -> dict:
    cfg = make_config(args, layers, cpu, os.path.join(work, f"policy_{layers}"), True)
    info = model_once(cfg.model.pretrained, dict(cfg.model.transformer), device)
    paths = {name: run_path(args, layers, device, cpu, cfg.model.pretrained, fast)
             for name, fast in (("fast", True), ("reference", False))}
    t = cfg.model.transformer
    return {"layers": t["num_layers"], "prompts": args.prompts, "images_per_prompt": args.images,
            "area": cfg.rl.height, "sample_steps": args.sample_steps, "timesteps_per_sample": args.times,
            "world": info.world, "paths": paths,
            "fast_rollout_speedup": paths["fast"]["rollout_images_per_s"] / paths["reference"]["rollout_images_per_s"],
            "tflops": paths["fast"]["update_tflops"]}


def main(argv=None) -> int:
    p = bench_parser(__doc__.splitlines()[0], batch=0, area=512, steps=3, warmup=2, ac="full")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (groups)")
    p.add_argument("--images", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--times", type=int, default=2, help="training times per rollout")
    p.add_argument("--rollout-batch", type=int, default=16)
    p.add_argument("--work", help="folder for the policy checkpoints (default: a temporary folder)")
    args = p.parse_args(argv)
    found = setup_device(args)
    if found is None:
        return 2
    cpu, device, name, measured = found
    if args.dry_run:
        args.steps, args.warmup, args.prompts, args.images, args.sample_steps = 2, 1, 2, 2, 3
    # Per block (85M parameters): policy fp32 weights + grads + Adam + EMA (20 B/param), old, reference and
    # the engine's rollout copy in bf16 (6 B) = ~2.2 GB, + checkpointed activations of the update.
    per_block = 2.2 + 0.4 * args.prompts * args.images * args.times * (args.area // 16) ** 2 / 16384
    case, tried = largest_case(args, device, cpu, per_block, lambda layers, work: run_case(args, layers, device, cpu,
                                                                                          work))
    if case is None:
        print(f"every layer count OOMed: {tried}", file=sys.stderr)
        return 1
    finish(case, name, measured, tried, args.dry_run, args.out)
    fast, ref = case["paths"]["fast"], case["paths"]["reference"]
    print(f"rl_step {name} layers={case['layers']} {case['prompts']}x{case['images_per_prompt']} images "
          f"at {case['area']}^2: rollouts {fast['rollout_images_per_s']:.2f} img/s fast path, "
          f"{ref['rollout_images_per_s']:.2f} img/s reference ({case['fast_rollout_speedup']:.2f}x); update "
          f"{fast['update_ms']:.1f} ms ({fast['update_tflops']:.2f} TFLOP/s); step {fast['step_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
