"""FP8 vs bf16 on the GPU: linear layers, the fused quantising kernels, the denoise step,
with the FP8 quality report alongside.

1. GEMMs at Lens shapes, M = 2 x 4352 tokens (CFG batch 2, 4096 image + 256 text), K and
   N in {1536, 4608, 8192}, plus the four real layer shapes of a block. FLOPs 2*M*N*K.
   Variants: ``bf16`` (F.linear, the baseline), ``fp8`` (torch._scaled_mm, row-wise
   scales, fast accumulation: what FP8Linear runs), ``fp8_exact_accum``, and
   ``fp8+quant`` (the GEMM plus quantising a bf16 activation with the Triton kernel:
   the cost for layers whose producer is not fused). Target: fp8 >= 1.5x bf16.
2. The quantising kernels at Lens shapes against the bf16 kernels they replace and a
   device-to-device copy of the same bytes (GB/s and % of copy).
3. The denoise step: one forward of the 48-layer official-shape model (random weights)
   at 1024^2, CFG batch 2, 256 text tokens (uncond row fully masked), bf16 vs FP8
   (``apply_quantization(model, "fp8")``, default layer filter). Target >= 1.35x.
   Between the two timings ``lens_fast.quant.report.model_quality_report`` measures
   per-layer errors on the real activations and end-to-end latent agreement (cosine,
   PSNR) over fixed prompts/seeds, then quantises the model in place. On CUDA each
   variant is timed twice: eager (as a Python caller runs it) and replayed from a CUDA
   graph (``+graph``, ratio against ``bf16+graph``), which removes host-side launch and
   dispatch costs and leaves the GPU's own time.
Prints a line per case (median ms with p20-p80, TFLOP/s or GB/s, ratio to its baseline
in the same run, peak memory, GPU) and writes fp8.json + fp8.md to --out (default $OUT).
``--dry-run`` does all of it with tiny shapes on the CPU (FP8 through the CPU
``torch._scaled_mm`` and the emulation): a smoke test for CI, not a measurement.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from lens_fast import LensTransformer2DModel  # noqa: E402
from lens_fast.engine.graphs import CapturedStep  # noqa: E402
from lens_fast.ops.norm_modulate import rms_norm_modulate  # noqa: E402
from lens_fast.ops.swiglu import silu_mul  # noqa: E402
from lens_fast.quant import fp8 as Q  # noqa: E402
from lens_fast.quant.report import model_quality_report  # noqa: E402
from _timing import timer  # noqa: E402  (bench/ is sys.path[0] when run as a script)

GEMM_TARGET, STEP_TARGET = 1.5, 1.35
OFFICIAL = dict(num_layers=48, num_attention_heads=24, attention_head_dim=64, enc_hidden_dim=2880,
                axes_dims_rope=(8, 28, 28), selected_layer_index=(5, 11, 17, 23))
TINY = dict(num_layers=4, num_attention_heads=2, attention_head_dim=48, enc_hidden_dim=40,
            axes_dims_rope=(8, 20, 20), selected_layer_index=(0, 1, 2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for fp8.json and fp8.md (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI smoke test)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench budget per GEMM/kernel measurement")
    p.add_argument("--step-rep-ms", type=int, default=1500, help="do_bench budget per denoise-step measurement")
    p.add_argument("--quality-steps", type=int, default=4, help="sampling steps of the end-to-end comparison")
    p.add_argument("--skip-step", action="store_true", help="only the GEMM and kernel sections")
    p.add_argument("--checkpoint", default=None, help="a Lens checkpoint folder: also report FP8 quality through "
                                                      "the full pipeline (text encoder, VAE, decoded images)")
    return p.parse_args(argv)


def _peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _line(kind, name, med, p20, p80, rate, unit, ratio, base, peak, gpu):
    peak_s = "n/a" if peak is None else f"{peak:.1f} GiB"
    print(f"{kind:20s} {name:34s} {med:9.3f} ms ({p20:.3f}-{p80:.3f}) {rate:8.1f} {unit} "
          f"{ratio:5.2f}x vs {base} | peak {peak_s} | {gpu}", flush=True)


def bench_gemms(device, gpu, bench, shapes, m):
    """shapes: list of (label, K, N)."""
    rows = []
    for label, k, n in shapes:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        fast = Q.FP8Linear.from_linear(lin, backend="scaled_mm", fast_accum=True)
        exact = Q.FP8Linear.from_linear(lin, backend="scaled_mm", fast_accum=False)
        qa = Q.quantize_rows(x)
        flops = 2 * m * n * k
        variants = {"bf16": lambda: F.linear(x, lin.weight), "fp8": lambda: fast(qa),
                    "fp8_exact_accum": lambda: exact(qa), "fp8+quant": lambda: fast(x)}
        with torch.no_grad():
            base = None
            for variant, fn in variants.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                med, p20, p80 = bench(fn)
                base = med if variant == "bf16" else base
                row = dict(section="gemm", case=label, M=m, K=k, N=n, variant=variant, median_ms=med, p20_ms=p20,
                           p80_ms=p80, tflops=flops / med * 1e-9, speedup_vs_bf16=base / med,
                           peak_gib=_peak_gib(device), gpu=gpu)
                rows.append(row)
                _line("gemm " + variant, f"{label} M{m} K{k} N{n}", med, p20, p80, row["tflops"], "TFLOP/s",
                      row["speedup_vs_bf16"], "bf16", row["peak_gib"], gpu)
    return rows


def bench_quant_kernels(device, gpu, bench, m, dim, hidden, b):
    """Fused quantising kernels vs the bf16 kernels they replace, and a copy of equal bytes."""
    bf = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(b, m // b, dim, **bf)
    w = torch.ones(dim, **bf)
    shift, scale = torch.randn(b, dim, **bf), torch.randn(b, dim, **bf)
    a1, a3 = torch.randn(m, hidden, **bf), torch.randn(m, hidden, **bf)
    # (name, bytes the FP8 kernel moves, the bf16 kernel it replaces or None, the FP8 kernel)
    cases = [
        ("rms_norm_modulate", x.numel() * (2 + 1), lambda: rms_norm_modulate(x, w, shift, scale, 1e-6),
         lambda: Q.rms_norm_modulate_fp8(x, w, shift, scale, 1e-6)),
        ("silu_mul", a1.numel() * (2 + 2 + 1), lambda: silu_mul(a1, a3), lambda: Q.silu_mul_fp8(a1, a3)),
        ("quantize_rows", x.numel() * (2 + 1), None, lambda: Q.quantize_rows(x)),
    ]
    rows = []
    with torch.no_grad():
        for name, moved, base_fn, q_fn in cases:
            src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy_ms = bench(lambda: dst.copy_(src))[0]  # moves `moved` bytes: read + write
            base_ms = bench(base_fn)[0] if base_fn is not None else None
            med, p20, p80 = bench(q_fn)
            gbs = moved / med * 1e-6
            copy_gbps = moved / copy_ms * 1e-6
            row = dict(section="kernel", case=name, shape=[m, hidden if name == "silu_mul" else dim], median_ms=med,
                       p20_ms=p20, p80_ms=p80, gbps=gbs, copy_gbps=copy_gbps, pct_of_copy=100 * gbs / copy_gbps,
                       bf16_kernel_ms=base_ms, gpu=gpu)
            rows.append(row)
            _line("kernel fp8", f"{name} [{m}x{row['shape'][1]}]", med, p20, p80, gbs, "GB/s",
                  base_ms / med if base_ms else 1.0, "bf16 kernel" if base_ms else "itself", None, gpu)
    return rows


def step_inputs(model, b, h, w, text_len, device):
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    x = torch.randn(b, h * w, cfg.in_channels, generator=g).to(device, torch.bfloat16)
    feats = [torch.randn(b, text_len, cfg.enc_hidden_dim, generator=g).to(device, torch.bfloat16)
             for _ in range(model.num_text_layers)]
    mask = torch.ones(b, text_len, dtype=torch.bool, device=device)
    mask[b // 2:] = False  # the uncond half: empty negative prompt
    t = torch.full((b,), 0.6, device=device, dtype=torch.bfloat16)
    return lambda: model(x, feats, mask, t, [(1, h, w)])


def bench_graphed(step_bench, forward, device, variant, base, rows, config, size, text_len, gpu):
    """The same step replayed from a CUDA graph (CUDA only; a capture failure is reported)."""
    if device.type != "cuda":
        return None
    try:
        replay = CapturedStep(forward).replay  # the engine's capture: warm-up on a side stream, then capture
    except Exception as e:  # noqa: BLE001 - report, do not hide: the eager rows stand
        print(f"step {variant}+graph    capture failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        rows.append(dict(section="step", variant=f"{variant}+graph", error=f"{type(e).__name__}: {str(e)[:200]}"))
        return None
    res = step_bench(replay)
    ratio = 1.0 if base is None else base / res[0]
    rows.append(dict(section="step", variant=f"{variant}+graph", size=list(size), text_len=text_len, batch=2,
                     median_ms=res[0], p20_ms=res[1], p80_ms=res[2], speedup_vs_bf16=ratio,
                     baseline="bf16+graph", peak_gib=_peak_gib(device), gpu=gpu))
    _line(f"step {variant}+graph", f"{config['num_layers']}L {size[0]}x{size[1]} B2 S{text_len}", *res,
          1e3 / res[0], "it/s", ratio, "bf16+graph", rows[-1]["peak_gib"], gpu)
    del replay
    torch.cuda.synchronize(device)
    return res[0]


def bench_step(device, gpu, args, config, size, text_len):
    torch.manual_seed(0)
    with torch.device(device):
        model = LensTransformer2DModel(**config)
    model = model.to(torch.bfloat16).eval().fuse_projections()  # the fastest bf16 layout is the baseline
    h, w = size[0] // 16, size[1] // 16
    step_bench = timer(device, args.step_rep_ms)
    forward = step_inputs(model, 2, h, w, text_len, device)
    rows = []
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bf16 = step_bench(forward)
        rows.append(dict(section="step", variant="bf16", size=list(size), text_len=text_len, batch=2,
                         median_ms=bf16[0], p20_ms=bf16[1], p80_ms=bf16[2], speedup_vs_bf16=1.0,
                         peak_gib=_peak_gib(device), gpu=gpu))
        _line("step bf16", f"{config['num_layers']}L {size[0]}x{size[1]} B2 S{text_len}", *bf16, 1e3 / bf16[0],
              "it/s", 1.0, "bf16", rows[-1]["peak_gib"], gpu)
        bf16_graph = bench_graphed(step_bench, forward, device, "bf16", None, rows, config, size, text_len, gpu)
    t0 = time.perf_counter()
    quality = model_quality_report(model, height=size[0], width=size[1], steps=args.quality_steps,
                                   text_len=text_len, prompts=("a red cube on a wooden table",
                                                               "a black cat sitting under a tree at night"),
                                   seeds=(0,))
    quality["seconds"] = time.perf_counter() - t0
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        f8 = step_bench(forward)
        rows.append(dict(section="step", variant="fp8", size=list(size), text_len=text_len, batch=2,
                         median_ms=f8[0], p20_ms=f8[1], p80_ms=f8[2], speedup_vs_bf16=bf16[0] / f8[0],
                         peak_gib=_peak_gib(device), gpu=gpu, quantization=quality["quantization"]))
        _line("step fp8", f"{config['num_layers']}L {size[0]}x{size[1]} B2 S{text_len}", *f8, 1e3 / f8[0],
              "it/s", bf16[0] / f8[0], "bf16", rows[-1]["peak_gib"], gpu)
        bench_graphed(step_bench, forward, device, "fp8", bf16_graph, rows, config, size, text_len, gpu)
    ls, cs = quality["layer_summary"], quality["summary"]
    print(f"quality              {ls['layers']} FP8 layers: mean rel err {ls['mean_fp8_vs_model']:.4f}, max "
          f"{ls['max_fp8_vs_model']:.4f} ({ls['worst_layer']}); bf16 own error {ls['mean_model_vs_fp32']:.4f}; "
          f"latents over {len(quality['cases'])} cases: min cosine {cs['min_latent_cosine']:.5f}, min PSNR "
          f"{cs['min_latent_psnr_db']:.1f} dB ({quality['steps']} steps)", flush=True)
    return rows, quality


def run_pipeline_report(args, device):
    from lens_fast import LensPipeline
    from lens_fast.quant.report import pipeline_quality_report

    pipe = LensPipeline.from_pretrained(args.checkpoint, torch_dtype=torch.float32 if args.dry_run else torch.bfloat16,
                                        device=str(device))
    pipe.set_progress_bar_config(disable=True)
    size = (64, 64) if args.dry_run else (1024, 1024)
    rep = pipeline_quality_report(pipe, height=size[0], width=size[1])
    cs = rep["summary"]
    print(f"pipeline quality     {args.checkpoint}: {rep['quantization']}; min latent cosine "
          f"{cs['min_latent_cosine']:.5f}, min image PSNR {cs['min_image_psnr_db']:.1f} dB", flush=True)
    del pipe
    return rep


def write_markdown(path, result):
    dry = " (DRY RUN: CPU smoke test, not a measurement)" if result["dry_run"] else ""
    lines = [f"# FP8 vs bf16 -- {result['gpu']}", "",
             f"{result['date']}, torch {result['torch']}, triton {result['triton']}, "
             f"capability {result['capability']}{dry}",
             "", "## Linear layers (M x K @ K x N, FLOPs 2MNK)", "",
             "| case | M | K | N | variant | median ms | TFLOP/s | vs bf16 |", "|---|---|---|---|---|---|---|---|"]
    for r in result["gemm"]:
        lines.append(f"| {r['case']} | {r['M']} | {r['K']} | {r['N']} | {r['variant']} | {r['median_ms']:.3f} | "
                     f"{r['tflops']:.1f} | {r['speedup_vs_bf16']:.2f}x |")
    lines += ["", "## Quantising kernels", "", "| kernel | shape | median ms | GB/s | % of copy | bf16 kernel ms |",
              "|---|---|---|---|---|---|"]
    for r in result["kernels"]:
        base = "-" if r["bf16_kernel_ms"] is None else f"{r['bf16_kernel_ms']:.3f}"
        lines.append(f"| {r['case']} | {r['shape']} | {r['median_ms']:.3f} | {r['gbps']:.0f} | "
                     f"{r['pct_of_copy']:.0f}% | {base} |")
    if result["step"]:
        lines += ["", "## Denoise step", "", "| variant | median ms | vs bf16 | peak GiB |", "|---|---|---|---|"]
        for r in result["step"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | capture failed: {r['error']} | - | - |")
                continue
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            base = f" (vs {r['baseline']})" if r.get("baseline") else ""
            lines.append(f"| {r['variant']} | {r['median_ms']:.2f} | {r['speedup_vs_bf16']:.2f}x{base} | {peak} |")
        q = result["quality"]
        lines += ["", f"## Quality ({q['quantization']})", "",
                  f"Per layer (real activations): {json.dumps(q['layer_summary'])}", "",
                  f"End to end ({q['steps']} steps, guidance {q['guidance']}): {json.dumps(q['summary'])}"]
    if result.get("pipeline_quality"):
        q = result["pipeline_quality"]
        lines += ["", f"## Pipeline quality ({q['quantization']})", "", f"{json.dumps(q['summary'])}"]
    if result["errors"]:
        lines += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in result["errors"].items()]
    lines += ["", "## Targets", ""] + [f"- {k}: {v}" for k, v in result["targets"].items()]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        m, grid, layer_shapes = 64, (32, 64), [("qkv", 32, 96), ("mlp_down", 64, 32)]
        config, size, text_len, kdims = TINY, (128, 128), 8, (64, 96, 256, 2)
        args.quality_steps = min(args.quality_steps, 2)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/fp8.py needs a CUDA GPU (use --dry-run on a CPU)")
        device = torch.device("cuda")
        Q.check_fp8_device(device)
        m, grid = 2 * 4352, (1536, 4608, 8192)
        layer_shapes = [("img_qkv", 1536, 4608), ("to_out", 1536, 1536), ("mlp_w1/w3", 1536, 4096),
                        ("mlp_w2", 4096, 1536)]
        config, size, text_len, kdims = OFFICIAL, (1024, 1024), 256, (2 * 4352, 1536, 4096, 2)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = dict(gpu=gpu, capability=list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                  cuda=torch.version.cuda, triton=triton_version, dry_run=args.dry_run, gemm=[], kernels=[], step=[],
                  quality=None, pipeline_quality=None, errors={}, targets={})
    print(f"device               {gpu}, capability {result['capability']}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, triton {triton_version}", flush=True)
    bench = timer(device, args.rep_ms)
    shapes = [(f"grid K{k} N{n}", k, n) for k in grid for n in grid] + layer_shapes
    result["gemm"] = bench_gemms(device, gpu, bench, shapes, m)
    fp8_rows = [r for r in result["gemm"] if r["variant"] == "fp8"]
    result["targets"] = {"gemm_min_speedup": min(r["speedup_vs_bf16"] for r in fp8_rows), "gemm_target": GEMM_TARGET,
                         "gemm_target_met": all(r["speedup_vs_bf16"] >= GEMM_TARGET for r in fp8_rows)}
    # A failing later section (e.g. out of memory) is recorded and the rest still written.
    sections = [("kernels", lambda: bench_quant_kernels(device, gpu, bench, *kdims))]
    if not args.skip_step:
        sections.append(("step", lambda: bench_step(device, gpu, args, config, size, text_len)))
    if args.checkpoint:
        sections.append(("pipeline_quality", lambda: run_pipeline_report(args, device)))
    for name, run in sections:
        try:
            out = run()
        except Exception as e:  # noqa: BLE001 - reported in the results, the run goes on
            result["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"error                {name}: {result['errors'][name]}", flush=True)
            if args.dry_run:
                raise
            continue
        if name == "step":
            result["step"], result["quality"] = out
            by_variant = {r["variant"]: r for r in out[0] if "error" not in r}
            speedup = by_variant["fp8"]["speedup_vs_bf16"]
            result["targets"].update(step_speedup=speedup, step_target=STEP_TARGET,
                                     step_target_met=speedup >= STEP_TARGET)
            if "fp8+graph" in by_variant:  # both replayed from CUDA graphs: launch cost removed
                result["targets"]["step_speedup_graphed"] = by_variant["fp8+graph"]["speedup_vs_bf16"]
        else:
            result[name] = out
    print("targets              " + json.dumps(result["targets"]), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fp8.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        write_markdown(os.path.join(args.out, "fp8.md"), result)
        print(f"wrote {os.path.join(args.out, 'fp8.json')} and fp8.md")
    return result

if __name__ == "__main__":
    main()
