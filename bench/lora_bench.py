"""LoRA on the fast path: denoising time with adapters fused, unfused (one and two
adapters), against the base model, and the cost of loading, hot-swapping and fusing.

One LensPipeline through ``enable_fast_path`` (compiled blocks and CUDA graphs on a GPU,
eager blocks on the CPU), the tiny VAE, prompt features passed in, latent output: the
timed part is the denoising loop (``--steps`` steps with CFG, batch 2 through the
denoiser). Random weights in a Lens-shaped transformer of ``--layers`` blocks at
``--heads`` x 64 width; random rank-``--rank`` adapters on the attention and MLP
projections (``--targets``). Every case runs on the same pipeline in one process:

- ``base``: no adapter;  ``unfused_1`` / ``unfused_2``: one / two active adapters;
- ``fused``: the adapter added into the weights (``fuse_lora``): the base model's modules;
- ``base_again``: unfused and unloaded, timed last (how much the machine drifted).

Times: median of ``--repeats`` runs after one untimed run (compilation, capture): wall
clock on a GPU, process CPU time on the CPU (``--threads 1`` makes it the compute alone).
Load / hot-swap / fuse / unfuse: median of 5 wall-clock runs.

    python bench/lora_bench.py --out bench/results/lora_cpu2_2026-12-06/bench.json    # CPU defaults
    python bench/lora_bench.py --device cuda --layers 12 --heads 24 --tokens 4096 --out lora_h100.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from lens_fast import LensPipeline, LensTransformer2DModel, LensVAE
from lens_fast.engine import enable_fast_path
from lens_fast.lora import adapters, save_file
from lens_fast.lora.formats import ModuleLora
from lens_fast.lora.trainable import resolve_targets
from lens_fast.tiny import SCHEDULER, make_tiny_vae, randomize_


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256, help="image tokens (a square grid)")
    p.add_argument("--text", type=int, default=64, help="text tokens")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="attn,mlp")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def random_lora(model, names, rank, seed):
    g = torch.Generator().manual_seed(seed)
    where = adapters.targets(model)
    return {n: ModuleLora(torch.randn(rank, where[n].in_features, generator=g) * 0.02,
                          torch.randn(where[n].out_features, rank, generator=g) * 0.02, float(rank)) for n in names}


def wall(fn, repeats=5, clock=time.perf_counter):
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    side = int(round(args.tokens ** 0.5))
    model = randomize_(LensTransformer2DModel(
        patch_size=2, in_channels=128, out_channels=32, num_layers=args.layers, attention_head_dim=64,
        num_attention_heads=args.heads, enc_hidden_dim=256, axes_dims_rope=[16, 24, 24], gate_mlp=True,
        rms_norm=True, multi_layer_encoder_feature=True, selected_layer_index=[0, 1]), 0, std=0.02).eval()
    pipe = LensPipeline(scheduler=SCHEDULER, vae=LensVAE(make_tiny_vae(0)).to(device), transformer=model.to(device, dtype))
    pipe.set_progress_bar_config(disable=True)
    names = resolve_targets(model, args.targets.split(","))
    folder = tempfile.mkdtemp()
    files = {}
    for i in range(3):
        files[i] = os.path.join(folder, f"lora{i}")
        save_file(files[i], random_lora(model, names, args.rank, seed=i))
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, args.text, 256, generator=g).to(device, dtype) for _ in range(2)]
    latents = torch.randn(1, side * side, 128, generator=g).to(device)

    def sample():
        pipe(prompt_embeds=feats, prompt_mask=torch.ones(1, args.text, dtype=torch.bool, device=device),
             height=side * 16, width=side * 16, num_inference_steps=args.steps, guidance_scale=4.0,
             latents=latents, output_type="latent")
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed():
        """Seconds per sample: wall clock on a GPU; on the CPU the process's CPU time, which
        other processes sharing the cores disturb far less than the wall clock."""
        sample()
        return wall(sample, args.repeats, time.perf_counter if device.type == "cuda" else time.process_time)

    enable_fast_path(pipe, compile=None)
    cases = {"base": timed()}
    pipe.enable_lora_hotswap(target_rank=args.rank)
    t0 = time.perf_counter()
    pipe.load_lora_weights(files[0], adapter_name="a")
    load_s = time.perf_counter() - t0
    cases["unfused_1"] = timed()
    hotswap_s = wall(lambda: pipe.load_lora_weights(files[2], adapter_name="a", hotswap=True))
    after_swap = timed()
    pipe.load_lora_weights(files[1], adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    cases["unfused_2"] = timed()
    pipe.set_adapters("a")
    fuse_s = wall(lambda: (pipe.fuse_lora(), pipe.unfuse_lora()))
    pipe.fuse_lora()
    cases["fused"] = timed()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    cases["base_again"] = timed()  # drift of the machine over the run (shared CPUs)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": args.threads, "torch": torch.__version__, "args": vars(args),
        "adapted_modules": len(names), "seconds_per_sample": cases,
        "vs_base": {k: round(v / cases["base"], 3) for k, v in cases.items()},
        "load_s": load_s, "hotswap_s": hotswap_s, "seconds_per_sample_after_hotswap": after_swap,
        "clock": "wall" if device.type == "cuda" else "process CPU time",
        "fuse_plus_unfuse_s": fuse_s,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
