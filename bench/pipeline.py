"""End-to-end Lens benchmark: seconds per image split into text encoding / denoising /
decoding, for three implementations measured in the same run on the same weights:

- ``reference``:     the eager ``LensPipeline`` (lens_fast's reference path);
- ``torch_compile``: ``pipe.transformer = torch.compile(pipe.transformer)``, what a user
                     tries first (whole-model compile, default mode);
- ``lens_fast``:     ``enable_fast_path(pipe)`` (fused ops, compiled blocks, CUDA graphs,
                     precomputed step constants, tiled compiled decode).

Opt-in extra impl ``lens_fast_fp8``: the same fast path on a copy of the denoiser quantised
with ``apply_quantization(copy, "fp8")`` (changes numerics; see ``lens_fast.quant``).

Cases: Lens (20 steps, CFG 5, batch 2 through the denoiser) and Turbo (4 steps,
guidance 1, batch 1) at each resolution (default 1024^2, 1440^2, 1248x832 and 2080x1040).
Each case runs once untimed (``first_s``: includes compilation / graph capture), then
``--repeats`` timed runs; the median of each phase is reported, with the denoiser's
achieved TFLOP/s (``lens_fast.flops``: steps x forward FLOPs at the run's batch) and the
peak GPU memory of the timed runs. Every run uses a new prompt (repeat index appended)
so text encoding is measured, never served from the engine's prompt cache.

Without ``--checkpoint`` the weights are random in the official shapes: the 48-layer
denoiser, a GPT-OSS-20B-shaped text encoder (24 layers, 32 experts, bf16, ~42 GB; leave
it out with ``--no-text-encoder``, then random prompt features of the right shape are
passed in and text_s is the cost of handing them over) and a FLUX.2-shaped VAE
(``AutoencoderKLFlux2()`` defaults). ``--tiny`` runs the whole thing on the CPU with the
tiny test configuration: a functional test, not a speed claim.

    python bench/pipeline.py --out bench/results/pipeline_h100.json
    python bench/pipeline.py --tiny --out /tmp/pipeline_tiny.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

from lens_fast import LensPipeline, LensTransformer2DModel, LensVAE  # noqa: E402
from lens_fast.engine import (disable_fast_path, disable_text_encoder_offload, enable_fast_path,  # noqa: E402
                              enable_text_encoder_offload)
from lens_fast.flops import lens_forward_flops, mfu  # noqa: E402

IMPLS = ("reference", "torch_compile", "lens_fast")
# Ablations of the fast path, run only when named in --impls.
ABLATIONS = {"lens_fast_no_graphs": dict(cuda_graphs=False), "lens_fast_no_compile": dict(compile=False),
             "lens_fast_fp8": {}}
_FP8_COPY: dict = {}  # original denoiser id -> its FP8-quantised copy (made once per run)
VARIANTS = {"lens": (20, 5.0), "turbo": (4, 1.0)}
GPU_RESOLUTIONS = "1024x1024,1440x1440,1248x832,2080x1040"
TINY_RESOLUTIONS = "64x64,96x96,96x64,128x64"
WORDS = ("a red cube on a wooden table next to a small blue sphere under a bright sun with a tall tree "
         "and a dark mountain in the sky at night").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a Lens checkpoint folder (default: random weights in the official shapes)")
    p.add_argument("--tiny", action="store_true", help="tiny random config on the CPU (functional check)")
    p.add_argument("--dry-run", action="store_true",
                   help="--tiny at one resolution, one repeat, the eager torch_compile baseline (bench/gpu_check.sh's "
                        "rehearsal)")
    p.add_argument("--no-text-encoder", action="store_true", help="random prompt features instead of a text encoder")
    p.add_argument("--resolutions", help=f"HxW list (default {GPU_RESOLUTIONS}; --tiny: {TINY_RESOLUTIONS})")
    p.add_argument("--variants", default="lens,turbo", help="lens (20 steps, CFG 5), turbo (4 steps, guidance 1)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--prompt-tokens", type=int, default=200, help="approximate prompt length in tokens")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="bf16 (default on CUDA) or fp32 (default on CPU)")
    p.add_argument("--compile-backend", default="inductor", help="backend of the torch_compile baseline")
    p.add_argument("--compile-mode", default=None, help="mode of the torch_compile baseline (default: default)")
    p.add_argument("--fast-compile-mode", default=None,
                   help="lens_fast block compile mode (default: max-autotune-no-cudagraphs on CUDA; 'default' "
                        "compiles much faster for time-boxed runs)")
    p.add_argument("--offload", default="none", choices=("none", "model", "sequential"),
                   help="lens_fast: text-encoder offload mode (timed; the reference paths keep it resident)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; --tiny: 1, steadier on a shared CPU)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.dry_run:
        args.tiny, args.repeats, args.compile_backend = True, 1, "eager"
        args.resolutions = args.resolutions or TINY_RESOLUTIONS.split(",")[0]
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: expected >= 1")
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [i for i in impls if i not in IMPLS and i not in ABLATIONS]
    if bad or not impls:
        p.error(f"--impls {args.impls!r}: expected a subset of {','.join(IMPLS + tuple(ABLATIONS))}")
    variants = [s.strip() for s in args.variants.split(",") if s.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants {args.variants!r}: expected a subset of {','.join(VARIANTS)}")
    args.impls, args.variants = impls, variants
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    args.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, None: None}[args.dtype] \
        if args.dtype in ("bf16", "fp32", "fp16", None) else p.error(f"--dtype {args.dtype!r}: bf16, fp16 or fp32")
    args.dtype = args.dtype or (torch.bfloat16 if args.device.type == "cuda" else torch.float32)
    res = args.resolutions or (TINY_RESOLUTIONS if args.tiny else GPU_RESOLUTIONS)
    try:
        args.resolutions = [tuple(int(v) for v in r.lower().split("x")) for r in res.split(",") if r.strip()]
    except ValueError:
        p.error(f"--resolutions {res!r}: expected HxW[,HxW...], e.g. 1024x1024")
    for h, w in args.resolutions:
        if h % 16 or w % 16 or h <= 0 or w <= 0:
            p.error(f"resolution {h}x{w}: height and width must be positive multiples of 16")
    return args


# -- building the pipeline -----------------------------------------------------------------

def _random_init_(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, std, generator=g)


def official_random_pipeline(device, dtype, text_encoder: bool) -> LensPipeline:
    """Random weights in the official shapes, built directly on ``device``."""
    from diffusers import AutoencoderKLFlux2

    from lens_fast.tiny import SCHEDULER

    with torch.device("meta"):
        transformer = LensTransformer2DModel()
    transformer = transformer.to_empty(device=device)
    _random_init_(transformer, 0)
    transformer = transformer.to(dtype).eval()
    with torch.device(device):
        vae = AutoencoderKLFlux2().to(dtype).eval()
    te = None
    if text_encoder:
        from transformers import GptOssConfig, GptOssForCausalLM

        from lens_fast.testing import build_tiny_tokenizer
        from lens_fast.text_encoder import LensTextEncoder

        cfg = GptOssConfig(num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4, hidden_size=2880,
                           intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                           vocab_size=201088, layer_types=["sliding_attention", "full_attention"] * 12)
        with torch.device(device):
            lm = GptOssForCausalLM._from_config(cfg, dtype=dtype).eval()
        # The tiny harmony tokenizer: same template structure, ids valid in the big vocab.
        te = LensTextEncoder(lm, build_tiny_tokenizer(), transformer.config.selected_layer_index,
                             template_date="2025-01-01")
    return LensPipeline(SCHEDULER, LensVAE(vae), te, transformer=transformer)


def tiny_pipeline(folder: str, text_encoder: bool, dtype) -> LensPipeline:
    from lens_fast.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(folder, text_encoder=text_encoder)
    return LensPipeline.from_pretrained(folder, torch_dtype=dtype, template_date="2025-01-01")


# -- timing --------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Wraps the pipeline's encode_prompt / denoise / postprocess (whatever is bound now,
    fast path included) to time each phase with a device synchronisation around it."""

    PHASES = {"encode_prompt": "text_s", "denoise": "denoise_s", "postprocess": "decode_s"}

    def __init__(self, pipe, device):
        self.pipe, self.device = pipe, device
        self.times: Dict[str, float] = {}
        self.text_len = 0
        self._saved = {name: pipe.__dict__.get(name) for name in self.PHASES}
        for name, key in self.PHASES.items():
            setattr(pipe, name, self._timed(getattr(pipe, name), key))

    def _timed(self, fn, key):
        def run(*a, **k):
            _sync(self.device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            _sync(self.device)
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t0
            if key == "text_s":
                self.text_len = out[1].shape[1]  # (embeds, mask, neg embeds, neg mask): aligned length
            return out
        return run

    def remove(self):
        for name, saved in self._saved.items():
            if saved is None:
                self.pipe.__dict__.pop(name, None)
            else:
                self.pipe.__dict__[name] = saved


def prompt_text(n_tokens: int, salt: int) -> str:
    words = [WORDS[i % len(WORDS)] for i in range(max(1, n_tokens - 1))]
    return " ".join(words) + f" {salt}"


def run_case(pipe, args, impl: str, variant: str, height: int, width: int, salt: List[int]) -> dict:
    steps, guidance = VARIANTS[variant]
    device, model = args.device, pipe.transformer
    n_img = (height // 16) * (width // 16)
    feats = None
    if pipe.prompt_encoder is None:
        g = torch.Generator().manual_seed(0)
        s = args.prompt_tokens
        feats = [torch.randn(1, s, model.config.enc_hidden_dim, generator=g).to(device, args.dtype)
                 for _ in range(model.num_text_layers)]

    def once():
        salt[0] += 1
        kw = dict(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator(device=device).manual_seed(0), output_type="pt")
        if feats is None:
            kw["prompt"] = prompt_text(args.prompt_tokens, salt[0])
        else:
            kw.update(prompt_embeds=feats, prompt_mask=torch.ones(1, feats[0].shape[1], dtype=torch.bool,
                                                                  device=device))
        timer = PhaseTimer(pipe, device)
        try:
            _sync(device)
            t0 = time.perf_counter()
            pipe(**kw)
            _sync(device)
            total = time.perf_counter() - t0
        finally:
            timer.remove()
        return {**timer.times, "total_s": total, "text_len": timer.text_len}

    row = dict(impl=impl, variant=variant, height=height, width=width, steps=steps, guidance=guidance,
               error=None)
    try:
        row["first_s"] = once()["total_s"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = [once() for _ in range(args.repeats)]
        for key in ("text_s", "denoise_s", "decode_s", "total_s"):
            row[key] = statistics.median(r.get(key, 0.0) for r in runs)
        row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        text_len = row["text_len"] = runs[-1]["text_len"]
        flops = steps * lens_forward_flops(model.config, n_img, text_len, 2 if guidance != 1.0 else 1)["total"]
        row["denoise_tflops"] = flops / row["denoise_s"] / 1e12
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        row["denoise_mfu"] = mfu(row["denoise_tflops"], name)
    except Exception as e:  # noqa: BLE001 - one failed case (e.g. out of memory) must not end the run
        row["error"] = f"{type(e).__name__}: {e}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# -- the three implementations ---------------------------------------------------------------

def set_impl(pipe, impl: str, args, original):
    """Put ``pipe`` in the state of ``impl`` (all share the same weights)."""
    disable_fast_path(pipe)
    pipe.transformer = original
    if impl == "torch_compile":
        pipe.transformer = torch.compile(original, backend=args.compile_backend, mode=args.compile_mode)
    elif impl == "lens_fast" or impl in ABLATIONS:
        if impl == "lens_fast_fp8":
            if id(original) not in _FP8_COPY:
                from lens_fast.quant import apply_quantization

                _FP8_COPY[id(original)] = copy.deepcopy(original)
                apply_quantization(_FP8_COPY[id(original)], "fp8")
            pipe.transformer = _FP8_COPY[id(original)]
        options = {"compile_mode": args.fast_compile_mode} if args.fast_compile_mode else {}
        enable_fast_path(pipe, **{**options, **ABLATIONS.get(impl, {})})


def print_table(rows: List[dict]) -> None:
    base = {(r["variant"], r["height"], r["width"]): r for r in rows if r["impl"] == "reference" and not r["error"]}
    head = (f"{'impl':<22}{'variant':<8}{'HxW':>10}{'text_s':>9}{'denoise_s':>11}{'decode_s':>10}{'total_s':>9}"
            f"{'first_s':>9}{'TFLOP/s':>9}{'peak_GB':>9}{'x_ref':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        hw = f"{r['height']}x{r['width']}"
        if r["error"]:
            print(f"{r['impl']:<22}{r['variant']:<8}{hw:>10}  ERROR {r['error'][:90]}")
            continue
        ref = base.get((r["variant"], r["height"], r["width"]))
        speedup = f"{ref['total_s'] / r['total_s']:.2f}" if ref else "-"
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        print(f"{r['impl']:<22}{r['variant']:<8}{hw:>10}{r['text_s']:>9.3f}{r['denoise_s']:>11.3f}"
              f"{r['decode_s']:>10.3f}{r['total_s']:>9.3f}{r['first_s']:>9.2f}{r['denoise_tflops']:>9.2f}"
              f"{peak:>9}{speedup:>7}")


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.tiny else None)
    if threads is not None:
        torch.set_num_threads(threads)
    tmp = None
    if args.checkpoint:
        pipe = LensPipeline.from_pretrained(args.checkpoint, torch_dtype=args.dtype, device=args.device,
                                            template_date="2025-01-01")
    elif args.tiny:
        tmp = tempfile.TemporaryDirectory(prefix="lens_tiny_bench_")
        pipe = tiny_pipeline(tmp.name, not args.no_text_encoder, args.dtype).to(args.device)
    else:
        pipe = official_random_pipeline(args.device, args.dtype, not args.no_text_encoder)
    if args.no_text_encoder:
        pipe.text_encoder = pipe.prompt_encoder = None
    pipe.set_progress_bar_config(disable=True)
    original = pipe.transformer
    rows, salt = [], [0]
    for impl in args.impls:
        set_impl(pipe, impl, args, original)
        offloading = impl.startswith("lens_fast") and pipe.prompt_encoder is not None and args.offload != "none"
        if offloading:
            enable_text_encoder_offload(pipe, mode=args.offload)
        for variant in args.variants:
            for h, w in args.resolutions:
                rows.append(run_case(pipe, args, impl, variant, h, w, salt))
                print(f"# done {impl} {variant} {h}x{w}", file=sys.stderr, flush=True)
        if offloading:
            disable_text_encoder_offload(pipe)
    set_impl(pipe, "reference", args, original)
    device_name = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
                   else platform.processor() or platform.machine())
    print(f"# Lens pipeline benchmark on {device_name} ({args.device}, {str(args.dtype).replace('torch.', '')}), "
          f"torch {torch.__version__}, {'tiny config' if args.tiny else 'official shapes'}, "
          f"repeats {args.repeats}, seconds per image (median)")
    print_table(rows)
    if args.out:
        import triton

        config = dict(device=str(args.device), device_name=device_name, dtype=str(args.dtype), torch=torch.__version__,
                      triton=triton.__version__, tiny=args.tiny, checkpoint=args.checkpoint,
                      text_encoder=pipe.prompt_encoder is not None, resolutions=args.resolutions,
                      variants={v: VARIANTS[v] for v in args.variants}, repeats=args.repeats,
                      prompt_tokens=args.prompt_tokens, compile_backend=args.compile_backend,
                      compile_mode=args.compile_mode, fast_compile_mode=args.fast_compile_mode,
                      offload=args.offload,
                      date=time.strftime("%Y-%m-%d %H:%M:%S"))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"config": config, "results": rows}, f, indent=1)
    if tmp is not None:
        tmp.cleanup()
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
