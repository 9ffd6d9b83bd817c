"""Profile one denoise step of the inference engine: where the time goes, kernel by kernel.

The step is the engine's own (``LensEngine.prepare``: compiled ``LensTransformerBlock.body``
for every block, the model's fused adaLN ops between them, CFG and Euler on the device), at
Lens's default case: the official 48-block configuration with random weights, bf16,
1024^2 (4096 image tokens), CFG batch 2 (the uncond half the empty negative prompt), 256
text tokens. ``--cuda-graphs`` profiles graph replays (as served; CUPTI records the kernels
inside a replay on current drivers) instead of the eagerly launched step.

Reported per step: every kernel (device time, calls, class), the share of each class
(``gemm``, ``attention``, ``norm/elementwise`` — the fused adaLN, RoPE, SwiGLU and
inductor's pointwise kernels —, ``other``), and the achieved TFLOP/s of the GEMMs and of
attention against ``lens_fast.flops`` (matmul FLOPs of one forward at this batch; attention
counted densely over the bucketed text length), with the card's bf16 peak where known.

    python bench/profile_step.py --out bench/results/<card>_<date>/profile_step.json
    python bench/profile_step.py --dry-run --out /tmp/profile_step.json   # tiny model, CPU

``--dry-run``: the tiny test model on the CPU with ``compile`` off (a functional check of the
script: CPU operator names stand in for kernels; no speed claim). Writes the JSON and a
markdown table beside it (same name, ``.md``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from lens_fast import LensPipeline, LensTransformer2DModel, LensVAE
from lens_fast.engine import enable_fast_path
from lens_fast.flops import lens_forward_flops, peak_bf16_tflops

CLASSES = ("gemm", "attention", "norm/elementwise", "other")
# Substrings of kernel (CUDA) or operator (CPU) names, checked in this order.
RULES = (
    ("attention", ("flash", "fmha", "attention", "_attn_", "attn_fwd", "sdpa", "softmax")),
    ("gemm", ("gemm", "xmma", "cutlass", "cublas", "nvjet", "wgmma", "matmul", "addmm", "aten::mm", "aten::bmm",
              "triton_tem_fused", "sm90_", "sm80_")),
    ("norm/elementwise", ("norm", "modulate", "rope", "swiglu", "silu", "gelu", "triton_poi", "triton_red",
                          "triton_per", "elementwise", "vectorized", "reduce", "copy", "cat", "fill", "aten::add",
                          "aten::mul", "aten::sub", "aten::div", "aten::rsqrt", "aten::pow", "aten::mean",
                          "aten::to", "aten::clone", "aten::stack", "aten::index", "aten::where", "aten::exp")),
)


def classify(name: str) -> str:
    low = name.lower()
    for cls, keys in RULES:
        if any(k in low for k in keys):
            return cls
    return "other"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write (a .md table is written beside it)")
    p.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: a check of the script")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=256, help="real prompt tokens of the cond half")
    p.add_argument("--guidance", type=float, default=5.0, help="!= 1: CFG, batch 2 through the denoiser")
    p.add_argument("--layers", type=int, default=None, help="fewer blocks than the official 48 (quick looks)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the block (the engine's own default on CUDA is "
                        "max-autotune-no-cudagraphs, which autotunes for minutes)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true", help="profile graph replays")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after the warm-up ones)")
    p.add_argument("--top", type=int, default=25, help="kernels listed in the markdown table")
    args = p.parse_args(argv)
    if args.dry_run:
        args.height = args.width = 64
        args.text_len = min(args.text_len, 20)
        args.no_compile, args.cuda_graphs, args.steps = True, False, 2
    return args


def build_pipeline(args, device, dtype):
    from lens_fast.tiny import SCHEDULER, TINY_TRANSFORMER, make_tiny_vae

    if args.dry_run:
        config = dict(TINY_TRANSFORMER)
    else:
        config = dict(LensTransformer2DModel.config_class.defaults)
    if args.layers is not None:
        config["num_layers"] = args.layers
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LensTransformer2DModel(**config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in name else 0.0)
            else:
                param.normal_(0.0, 0.02)
    model = model.to(dtype).eval()
    # The VAE is never run here (the step ends at the latents); the tiny one keeps it cheap.
    pipe = LensPipeline(SCHEDULER, LensVAE(make_tiny_vae(0).to(device, dtype)), transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe, config


def step_inputs(model, args, device, dtype, grid):
    g = torch.Generator().manual_seed(0)
    cfg = args.guidance != 1.0
    rows = 2 if cfg else 1
    feats = [torch.randn(rows, args.text_len, model.config.enc_hidden_dim, generator=g).to(device, dtype)
             for _ in range(model.num_text_layers)]
    mask = torch.ones(rows, args.text_len, dtype=torch.bool, device=device)
    if cfg:
        feats = [torch.cat([f[:1], torch.zeros_like(f[:1])]) for f in feats]  # empty negative prompt
        mask[1] = False
    latents = torch.randn(1, grid[0] * grid[1], model.config.in_channels, generator=g).to(device, dtype)
    return latents, feats, mask


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_table(prof, device, steps: int):
    """[(name, class, ms per step, calls per step)] of device kernels (CPU: leaf operators)."""
    totals, calls = defaultdict(float), defaultdict(int)
    for e in prof.key_averages():
        us = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if us <= 0 or (device.type != "cuda" and not e.key.startswith("aten::")):
            continue
        totals[e.key] += us
        calls[e.key] += e.count
    rows = [(name, classify(name), us / 1e3 / steps, calls[name] / steps) for name, us in totals.items()]
    return sorted(rows, key=lambda r: -r[2])


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:
        torch.set_num_threads(1)  # the shared 2-core CI machine: no oversubscribed BLAS threads
    pipe, config = build_pipeline(args, device, dtype)
    engine = enable_fast_path(pipe, compile=not args.no_compile, cuda_graphs=args.cuda_graphs,
                              compile_mode=args.compile_mode)
    grid = pipe.latent_codec.latent_grid(args.height, args.width)
    latents, feats, mask = step_inputs(pipe.transformer, args, device, dtype, grid)
    t0 = time.perf_counter()
    with torch.no_grad():
        run, buffers, _ = engine.prepare(latents, feats, mask, grid, 20, args.guidance)
        for _ in range(2):  # compile / autotune / capture happen here
            run()
        sync(device)
    warmup_s = time.perf_counter() - t0
    wall = []
    with torch.no_grad():
        for _ in range(max(5, args.steps)):
            t = time.perf_counter()
            run()
            sync(device)
            wall.append((time.perf_counter() - t) * 1e3)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                run()
            sync(device)
    kernels = kernel_table(prof, device, args.steps)
    n_img, n_txt, batch = grid[0] * grid[1], buffers.txt.shape[1], buffers.txt.shape[0]
    flops = lens_forward_flops(config, n_img, n_txt, batch)
    by_class = {c: sum(r[2] for r in kernels if r[1] == c) for c in CLASSES}
    total_ms = sum(by_class.values())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_bf16_tflops(gpu)
    tflops = {cls: flops[key] / (by_class[cls] * 1e-3) / 1e12 if by_class[cls] else None
              for cls, key in (("gemm", "linear"), ("attention", "attention"))}
    result = dict(
        config=dict(height=args.height, width=args.width, image_tokens=n_img, text_tokens=args.text_len,
                    text_bucket=n_txt, batch=batch, layers=config["num_layers"], dtype=str(dtype),
                    compile=not args.no_compile, compile_mode=args.compile_mode, cuda_graphs=args.cuda_graphs,
                    dry_run=args.dry_run),
        machine=dict(gpu=gpu, torch=torch.__version__, python=platform.python_version(),
                     date=time.strftime("%Y-%m-%d")),
        warmup_s=warmup_s, step_wall_ms=statistics.median(wall), kernel_ms_per_step=total_ms,
        shares={c: (by_class[c] / total_ms if total_ms else 0.0) for c in CLASSES}, class_ms=by_class,
        flops_per_step=flops, tflops=tflops, bf16_peak_tflops=peak,
        kernels=[dict(name=n, cls=c, ms_per_step=ms, calls_per_step=k) for n, c, ms, k in kernels])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    md = markdown(result, args.top)
    with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    return 0


def markdown(r, top: int) -> str:
    c, m = r["config"], r["machine"]
    device = m["gpu"] or "CPU (dry run: operators, not kernels)"
    lines = [f"## One denoise step: {c['layers']} blocks, {c['height']}x{c['width']} ({c['image_tokens']} image "
             f"tokens), text {c['text_tokens']} -> bucket {c['text_bucket']}, batch {c['batch']}, {c['dtype']}",
             "", f"{device}, torch {m['torch']}, {m['date']}; compile={c['compile']} ({c['compile_mode']}), "
             f"cuda_graphs={c['cuda_graphs']}; warm-up {r['warmup_s']:.1f} s.", "",
             f"Step wall time {r['step_wall_ms']:.3f} ms (median); profiled kernel time {r['kernel_ms_per_step']:.3f} "
             "ms per step.", "", "| class | ms per step | share | TFLOP/s |", "|---|---|---|---|"]
    for cls in CLASSES:
        tf = r["tflops"].get(cls)
        pct = f" ({100 * tf / r['bf16_peak_tflops']:.0f}% of bf16 peak)" if tf and r["bf16_peak_tflops"] else ""
        lines.append(f"| {cls} | {r['class_ms'][cls]:.3f} | {100 * r['shares'][cls]:.1f}% | "
                     f"{'' if tf is None else f'{tf:.3g}'}{pct} |")
    lines += ["", f"Top {top} kernels:", "", "| kernel | class | ms per step | calls per step |", "|---|---|---|---|"]
    for k in r["kernels"][:top]:
        lines.append(f"| `{k['name'][:90]}` | {k['cls']} | {k['ms_per_step']:.4f} | {k['calls_per_step']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
