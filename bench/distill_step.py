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

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from lens_fast.flops import lens_forward_flops, peak_bf16_tflops
from lens_fast.train import Trainer, load_config
from lens_fast.train.checkpoint import export_transformer
from lens_fast.train.parallel import init_rule
from train_step import OFFICIAL_WIDTH, DeviceTokens, StepTimer, matmul_tflops  # bench/ (this script's folder)


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


def run_case(args, layers, device, cpu, work):
    cfg = make_config(args, layers, cpu, os.path.join(work, f"teacher_{layers}"))
    t = cfg.model.transformer
    if not os.path.isdir(cfg.distill.teacher):
        if int(os.environ.get("RANK", 0)) == 0:
            write_teacher(cfg.distill.teacher, dict(t))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    grid = (args.area // 16, args.area // 16) if not cpu else (4, 4)
    batch = args.batch if not cpu else 2
    k = len(t["selected_layer_index"])
    data = DeviceTokens(batch, grid, t["in_channels"], args.text_len if not cpu else 5, t["enc_hidden_dim"], k,
                        device)
    timer = StepTimer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(cfg, data=data, callbacks=[timer], device=str(device))
    try:
        result = trainer.train()
        forwards = trainer.recipe.forwards(cfg)
    finally:
        trainer.close()
    steady = sorted(timer.times[args.warmup:])
    step_s = statistics.median(steady)
    n_txt = data.b.text_mask.shape[1]
    flops = forwards * lens_forward_flops(t, grid[0] * grid[1], n_txt, batch)["total"]
    return dict(layers=t["num_layers"], batch=batch, image_tokens=batch * grid[0] * grid[1], text_tokens=n_txt,
                fake_updates=cfg.distill.fake_updates, forwards_per_update=forwards,
                first_steps_s=timer.times[:args.warmup], update_ms_median=1e3 * step_s,
                update_ms_p20=1e3 * steady[len(steady) // 5], update_ms_p80=1e3 * steady[4 * len(steady) // 5],
                model_tflop_per_update=flops / 1e12, tflops=flops / step_s / 1e12,
                final_loss=result.losses[-1] if result.losses else None,
                peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
                activation_checkpointing=cfg.parallel.activation_checkpointing, compile=cfg.parallel.compile,
                world=int(os.environ.get("WORLD_SIZE", 1)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 + 2 updates (CI)")
    p.add_argument("--layers", default="auto", help="number of blocks, or auto (as many as fit)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--area", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--fake-updates", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ac", default="full", choices=["none", "selective", "full"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--work", help="folder for the teacher checkpoints (default: a temporary folder)")
    args = p.parse_args(argv)
    cpu = args.dry_run or not torch.cuda.is_available()
    if cpu and not args.dry_run:
        print("no CUDA device: use --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    if args.dry_run:
        args.steps, args.warmup, args.fake_updates = 2, 2, 2
    device = torch.device("cpu") if cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    name = "cpu" if cpu else torch.cuda.get_device_name(device)
    measured = None if cpu else matmul_tflops(device)
    if args.layers == "auto" and not cpu:
        free = torch.cuda.mem_get_info(device)[1] / 2 ** 30
        # Per block (85M parameters): student fp32 weights + grads + Adam + EMA (20 B/param), fake (16 B),
        # teacher bf16 (2 B) = ~3.2 GB, + ~0.4 GB of checkpointed activations at 16K image tokens.
        per_block = 3.2 + 0.4 * args.batch * (args.area // 16) ** 2 / 16384
        candidates = list(range(min(48, int((free - 8) / per_block)), 0, -2))
    else:
        candidates = [int(args.layers)] if args.layers != "auto" else [2]
    case, tried = None, []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for layers in candidates:
            try:
                case = run_case(args, layers, device, cpu, work)
                break
            except torch.cuda.OutOfMemoryError:
                tried.append(layers)
                gc.collect()
                torch.cuda.empty_cache()
    if case is None:
        print(f"every layer count OOMed: {tried}", file=sys.stderr)
        return 1
    peak = peak_bf16_tflops(name) if not cpu else None
    case.update(device=name, torch=torch.__version__, oom_layer_counts=tried, datasheet_bf16_tflops=peak,
                measured_bf16_matmul_tflops=measured,
                mfu_vs_datasheet=None if peak is None else case["tflops"] / peak,
                mfu_vs_measured_matmul=None if measured is None else case["tflops"] / measured,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), dry_run=bool(args.dry_run))
    line = (f"distill_step {name} layers={case['layers']} batch={case['batch']} tokens={case['image_tokens']} "
            f"fake_updates={case['fake_updates']} update {case['update_ms_median']:.1f} ms "
            f"(p20 {case['update_ms_p20']:.1f}, p80 {case['update_ms_p80']:.1f}) {case['tflops']:.2f} TFLOP/s")
    if case["peak_memory_gb"] is not None:
        line += f", peak {case['peak_memory_gb']:.1f} GiB"
    if measured:
        line += f", MFU {100 * case['mfu_vs_measured_matmul']:.1f}% of measured {measured:.0f} TFLOP/s"
    print(line)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(case, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
