"""Distillation-update benchmark of the ``distill`` recipe at the official width.

One update = ``distill.fake_updates`` fake-score updates + one student update (the
trainer's own ``train_step``): dim 1536 (24 heads x 64), SwiGLU 4096, text features
2880 x 4 layers, as many blocks as fit one card (``--layers auto``: the largest count
that runs, from an estimate downwards), FSDP2 with the student and the fake score in
fp32 masters (bf16 compute, fp32 reduction, AdamW, activation checkpointing) and the
frozen teacher stored in bf16 (no grads, no optimiser), student EMA. The teacher folder
is written once with the trainer's init rule (bf16 safetensors); data are random
tokens already on the device, so the update is measured alone.

Model TFLOP/s counts every model forward of the update (``DistillRecipe.forwards``:
backward = 2 forwards, activation recomputation not counted) over the update's time.

    python bench/distill_step.py --out bench/results/distill_step_h100.json
    torchrun --nproc_per_node 8 bench/distill_step.py --layers 48 --batch 4 --area 1024
    python bench/distill_step.py --dry-run --out /tmp/distill_step.json    # CPU, tiny model
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

from lens_fast.train import load_config
from lens_fast.train.checkpoint import export_transformer
from lens_fast.train.distill import DistillRecipe
from lens_fast.train.parallel import barrier, init_distributed, init_rule
from train_step import OFFICIAL_WIDTH, bench_parser, finish, largest_fit, setup_device, timed_run  # bench/


def write_teacher(folder: str, model_config: dict, seed: int = 1) -> str:
    """A teacher folder holding the init rule's weights in bf16 (one tensor at a time)."""
    from lens_fast.models.transformer import LensTransformer2DModel

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LensTransformer2DModel(**model_config).state_dict().items()}
    sd = {k: init_rule(k, shape, seed).to(torch.bfloat16) for k, shape in shapes.items()}
    export_transformer(os.path.join(folder, "transformer"), model_config, sd)
    return folder


def make_config(args, layers, cpu, teacher_root):
    cfg = load_config("tiny-cpu" if cpu else "distill")
    cfg.recipe = "distill"
    if not cpu:
        cfg.model.transformer.update(OFFICIAL_WIDTH, num_layers=layers)
        cfg.parallel.activation_checkpointing = args.ac
        cfg.parallel.compile = not args.no_compile
    cfg.distill.teacher = teacher_root
    cfg.distill.fake_updates = args.fake_updates
    cfg.distill.teacher_dtype = "bfloat16"
    cfg.train.max_steps = args.warmup + args.steps
    cfg.optim.warmup_steps = 1
    cfg.logging.progress_bar = False
    cfg.logging.every = args.warmup + args.steps
    cfg.checkpoint.every = 10 ** 9
    cfg.validate()
    return cfg


def model_once(folder: str, model_config: dict, device):
    """Join the process group (under torchrun) and write ``folder`` once, on the main rank;
    returns the group's DistInfo."""
    info = init_distributed(str(device), need_group=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    if not os.path.isdir(folder) and info.is_main:
        write_teacher(folder, model_config)
    barrier(info)
    return info


def largest_case(args, device, cpu, per_block_gb: float, run):
    """``run(layers, work)`` at the largest layer count that fits one card (``--layers
    auto``: from ``per_block_gb`` per block and 8 GB of headroom downwards), checkpoints in a
    temporary folder under ``--work``: (the case or None, the counts that ran out of memory)."""
    if args.layers == "auto" and not cpu:
        free = torch.cuda.mem_get_info(device)[1] / 2 ** 30
        candidates = list(range(min(48, int((free - 8) / per_block_gb)), 0, -2))
    else:
        candidates = [int(args.layers)] if args.layers != "auto" else [2]
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        return largest_fit(candidates, lambda layers: run(layers, work))


def run_case(args, layers, device, cpu, work):
    cfg = make_config(args, layers, cpu, os.path.join(work, f"teacher_{layers}"))
    info = model_once(cfg.distill.teacher, dict(cfg.model.transformer), device)
    forwards = DistillRecipe().forwards(cfg)
    case = timed_run(cfg, args, device, cpu, forwards)
    for old, new in (("median_ms", "update_ms_median"), ("p20_ms", "update_ms_p20"), ("p80_ms", "update_ms_p80"),
                     ("model_tflop", "model_tflop_per_update")):
        case[new] = case.pop(old)
    case.update(fake_updates=cfg.distill.fake_updates, forwards_per_update=forwards, world=info.world)
    return case


def main(argv=None) -> int:
    p = bench_parser(__doc__.splitlines()[0], batch=4, area=1024, steps=5, warmup=2, ac="full")
    p.add_argument("--fake-updates", type=int, default=5)
    p.add_argument("--work", help="folder for the teacher checkpoints (default: a temporary folder)")
    args = p.parse_args(argv)
    found = setup_device(args)
    if found is None:
        return 2
    cpu, device, name, measured = found
    if args.dry_run:
        args.steps, args.warmup, args.fake_updates = 2, 2, 2
    # Per block (85M parameters): student fp32 weights + grads + Adam + EMA (20 B/param), fake (16 B),
    # teacher bf16 (2 B) = ~3.2 GB, + ~0.4 GB of checkpointed activations at 16K image tokens.
    per_block = 3.2 + 0.4 * args.batch * (args.area // 16) ** 2 / 16384
    case, tried = largest_case(args, device, cpu, per_block,
                               lambda layers, work: run_case(args, layers, device, cpu, work))
    if case is None:
        print(f"every layer count OOMed: {tried}", file=sys.stderr)
        return 1
    finish(case, name, measured, tried, args.dry_run, args.out)
    line = (f"distill_step {name} layers={case['layers']} batch={case['batch']} tokens={case['image_tokens']} "
            f"fake_updates={case['fake_updates']} update {case['update_ms_median']:.1f} ms "
            f"(p20 {case['update_ms_p20']:.1f}, p80 {case['update_ms_p80']:.1f}) {case['tflops']:.2f} TFLOP/s")
    if case["peak_memory_gb"] is not None:
        line += f", peak {case['peak_memory_gb']:.1f} GiB"
    if measured:
        line += f", MFU {100 * case['mfu_vs_measured_matmul']:.1f}% of measured {measured:.0f} TFLOP/s"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
