"""Training-step benchmark of the Lens trainer at the official width.

dim 1536 (24 heads x 64), SwiGLU 4096, enc_hidden_dim 2880 x 4 layers, with as many
blocks as fit one card (``--layers auto``: the largest count that runs without OOM,
from an estimate downwards), the 512^2 bucket (1024 image tokens) at batch 24 (~24K
image tokens per step) and 256 text tokens, FSDP2 bf16 / fp32 reduce, fused AdamW, EMA,
the trainer's own ``train_step``. Data are random tokens already on the device, so the
step is measured alone.

MFU = model FLOPs (3 x forward: linear layers + attention, ``lens_fast.flops``) per
second over (a) the card's datasheet bf16 peak and (b) its bf16 matmul rate measured
in the same run (8192^3 matmuls). Activation recomputation is not counted.

    python bench/train_step.py --out bench/results/train_step_h100.json
    python bench/train_step.py --dry-run --out /tmp/train_step.json    # CPU, tiny model
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

from lens_fast.flops import lens_forward_flops, peak_bf16_tflops  # noqa: E402
from lens_fast.train import Batch, Callback, Trainer, load_config  # noqa: E402

OFFICIAL_WIDTH = dict(patch_size=2, in_channels=128, out_channels=32, attention_head_dim=64, num_attention_heads=24,
                      inner_dim=1536, enc_hidden_dim=2880, axes_dims_rope=[8, 28, 28],
                      selected_layer_index=[5, 11, 17, 23])


class DeviceTokens:
    """A DataSource of fixed random tokens and text features on the device."""

    def __init__(self, batch, grid, channels, text_len, enc_dim, layers, device):
        g = torch.Generator().manual_seed(0)
        self.b = Batch(torch.randn(batch, grid[0] * grid[1], channels, generator=g).to(device),
                       [torch.randn(batch, text_len, enc_dim, generator=g).to(device) for _ in range(layers)],
                       torch.ones(batch, text_len, dtype=torch.bool, device=device), grid)

    def batch(self, step, data_rank, data_world):
        return self.b

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class StepTimer(Callback):
    def __init__(self, device):
        self.device, self.times, self.t = device, [], None

    def on_train_start(self, trainer):
        self._sync()
        self.t = time.perf_counter()

    def on_step_end(self, trainer, step):
        self._sync()
        now = time.perf_counter()
        self.times.append(now - self.t)
        self.t = now

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def matmul_tflops(device, n=8192, reps=20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def make_config(args, layers, cpu):
    cfg = load_config("tiny-cpu" if cpu else "stage1")
    if not cpu:
        cfg.model.transformer.update(OFFICIAL_WIDTH, num_layers=layers)
        cfg.parallel.activation_checkpointing = args.ac
        cfg.parallel.compile = not args.no_compile
    cfg.train.max_steps = args.warmup + args.steps
    cfg.optim.warmup_steps = 1
    cfg.logging.progress_bar = False
    cfg.logging.every = args.warmup + args.steps
    cfg.validate()
    return cfg


def timed_run(cfg, args, device, cpu, forwards: float = 3.0) -> dict:
    """Train ``cfg`` on fixed random tokens, timing every step: the shape, the steady
    step time (``timing``), the model TFLOP/s of ``forwards`` forwards per sample and
    step, the last loss and the peak GPU memory."""
    t = cfg.model.transformer
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
    finally:
        trainer.close()
    times = timing(timer.times, args.warmup)
    n_txt = data.b.text_mask.shape[1]
    flops = forwards * lens_forward_flops(t, grid[0] * grid[1], n_txt, batch)["total"]
    return dict(layers=t["num_layers"], batch=batch, image_tokens=batch * grid[0] * grid[1], text_tokens=n_txt,
                **times, model_tflop=flops / 1e12, tflops=flops / (times["median_ms"] / 1e3) / 1e12,
                final_loss=result.losses[-1] if result.losses else None,
                peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
                activation_checkpointing=cfg.parallel.activation_checkpointing, compile=cfg.parallel.compile)


def run_case(args, layers, device, cpu):
    case = timed_run(make_config(args, layers, cpu), args, device, cpu)
    for old, new in (("median_ms", "step_ms_median"), ("p20_ms", "step_ms_p20"), ("p80_ms", "step_ms_p80"),
                     ("model_tflop", "model_tflop_per_step")):
        case[new] = case.pop(old)
    return case


def timing(times, warmup: int) -> dict:
    """First (warm-up) step times and the steady steps' median / p20 / p80 in ms."""
    steady = sorted(times[warmup:])
    return dict(first_steps_s=times[:warmup], median_ms=1e3 * statistics.median(steady),
                p20_ms=1e3 * steady[len(steady) // 5], p80_ms=1e3 * steady[4 * len(steady) // 5])


def largest_fit(candidates, run):
    """``run(layers)`` for each candidate layer count, largest first, until one does not
    run out of GPU memory: (its result or None, the counts that did)."""
    tried = []
    for layers in candidates:
        try:
            return run(layers), tried
        except torch.cuda.OutOfMemoryError:
            tried.append(layers)
            gc.collect()
            torch.cuda.empty_cache()
    return None, tried


def finish(case: dict, name: str, measured, tried, dry_run: bool, out) -> dict:
    """Add the device, the peaks, MFU and the date to ``case``; write it to ``out``."""
    peak = peak_bf16_tflops(name) if name != "cpu" else None
    case.update(device=name, torch=torch.__version__, oom_layer_counts=tried, datasheet_bf16_tflops=peak,
                measured_bf16_matmul_tflops=measured,
                mfu_vs_datasheet=None if peak is None else case["tflops"] / peak,
                mfu_vs_measured_matmul=None if measured is None else case["tflops"] / measured,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), dry_run=bool(dry_run))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(case, f, indent=1)
    return case


def setup_device(args):
    """(cpu, device, its name, its measured bf16 matmul rate) or None without CUDA and --dry-run."""
    cpu = args.dry_run or not torch.cuda.is_available()
    if cpu and not args.dry_run:
        print("no CUDA device: use --dry-run for the CPU smoke run", file=sys.stderr)
        return None
    device = torch.device("cpu") if cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    name = "cpu" if cpu else torch.cuda.get_device_name(device)
    return cpu, device, name, None if cpu else matmul_tflops(device)


def bench_parser(description: str, batch: int, area: int, steps: int, warmup: int, ac: str):
    """The options both trainer benchmarks take, with their own defaults."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 + 2 steps (CI)")
    p.add_argument("--layers", default="auto", help="number of blocks, or auto (as many as fit)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--area", type=int, default=area)
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--ac", default=ac, choices=["none", "selective", "full"])
    p.add_argument("--no-compile", action="store_true")
    return p


def main(argv=None) -> int:
    args = bench_parser(__doc__.splitlines()[0], batch=24, area=512, steps=10, warmup=3, ac="none").parse_args(argv)
    found = setup_device(args)
    if found is None:
        return 2
    cpu, device, name, measured = found
    if args.dry_run:
        args.steps, args.warmup = 2, 2
    if args.layers == "auto" and not cpu:
        free = torch.cuda.mem_get_info(device)[1] / 2 ** 30
        # ~1.4 GB of fp32 weights + grads + Adam + EMA per block, + ~2.3 GB activations at 24K tokens without AC.
        per_block = 1.6 + (2.6 * args.batch * (args.area // 16) ** 2 / 24576 if args.ac == "none" else 0.2)
        candidates = list(range(min(48, int((free - 8) / per_block)), 0, -2))
    else:
        candidates = [int(args.layers)] if args.layers != "auto" else [2]
    case, tried = largest_fit(candidates, lambda layers: run_case(args, layers, device, cpu))
    if case is None:
        print(f"every layer count OOMed: {tried}", file=sys.stderr)
        return 1
    finish(case, name, measured, tried, args.dry_run, args.out)
    peak = case["datasheet_bf16_tflops"]
    line = (f"train_step {name} layers={case['layers']} batch={case['batch']} tokens={case['image_tokens']} "
            f"step {case['step_ms_median']:.1f} ms (p20 {case['step_ms_p20']:.1f}, p80 {case['step_ms_p80']:.1f}) "
            f"{case['tflops']:.2f} TFLOP/s")
    if measured:
        line += f", MFU {100 * case['mfu_vs_measured_matmul']:.1f}% of measured {measured:.0f} TFLOP/s"
    if peak:
        line += f", {100 * case['mfu_vs_datasheet']:.1f}% of datasheet {peak:.0f}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
