"""FP8 quality report: per-layer error on real activations and end-to-end agreement.

Per layer: forward hooks on the unquantised model capture each selected linear's input
on a real forward (whatever the caller runs) and compare, on that very input, the FP8
layer's output with the layer's own output (the model dtype, e.g. bf16) and both with a
float32 truth. Errors are relative L2 norms accumulated over every call of the layer
(so a CFG batch or several steps count once each). Nothing is stored but the sums, so
it runs on the full 48-layer model at 1024^2.

End to end: the same fixed cases (prompt -> seed -> text features and noise, or real
prompts through a pipeline) are sampled with the unquantised model, then the model is
quantised in place and sampled again; latents are compared by cosine similarity and
PSNR (peak = the reference's peak-to-peak range), decoded images (when a pipeline with
a VAE is given) by PSNR with peak 1 on [0, 1] images.

Works the same on a tiny random model on the CPU (FP8 emulated) and on the real model on
a GPU (``torch._scaled_mm``).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sampling import cfg_combine, lens_sigmas
from . import apply_quantization, fp8_shape_ok, resolve_backend, select_layers
from .fp8 import FP8Linear

DEFAULT_PROMPTS = ("a red cube on a wooden table", "a black cat sitting under a tree at night",
                   "a city street with tall houses and a blue sky", "a yellow flower next to the sea")
DEFAULT_SEEDS = (0, 1)


@dataclass
class LayerError:
    name: str
    in_features: int
    out_features: int
    calls: int
    rows: int
    fp8_vs_model: float     # ||y_fp8 - y_model|| / ||y_model||, y_model in the model's dtype
    fp8_vs_fp32: float      # ||y_fp8 - y_fp32|| / ||y_fp32||
    model_vs_fp32: float    # the model dtype's own error, for scale


def _rel(num_sq: float, den_sq: float) -> float:
    return math.sqrt(num_sq / den_sq) if den_sq > 0 else 0.0


@torch.no_grad()
def layer_errors(model: nn.Module, run_forward: Callable[[], object], *, layer_filter=None,
                 backend: str = "auto") -> List[LayerError]:
    """Per-layer FP8 errors on the activations ``run_forward()`` produces in ``model``
    (which must not be quantised yet). Layers: those ``apply_quantization`` would
    quantise with the same filter."""
    param = next(model.parameters())
    resolved = resolve_backend(backend, param.device)
    layer_backend = "emulate" if resolved == "emulate" else "auto"  # TE layers are judged by the native GEMM
    names = [n for n in select_layers(model, layer_filter) if fp8_shape_ok(model.get_submodule(n))]
    sums: Dict[str, List[float]] = {n: [0.0] * 6 + [0, 0] for n in names}
    handles = []

    def make_hook(name):
        def hook(mod, inputs, output):
            x = inputs[0]
            q = FP8Linear.from_linear(mod, layer_backend)
            y8, y = q(x).float(), output.float()
            truth = F.linear(x.float(), mod.weight.float(), None if mod.bias is None else mod.bias.float())
            s = sums[name]
            for i, v in enumerate(((y8 - y).norm() ** 2, y.norm() ** 2, (y8 - truth).norm() ** 2,
                                   truth.norm() ** 2, (y - truth).norm() ** 2)):
                s[i] += float(v)
            s[6] += 1
            s[7] += x.numel() // x.shape[-1]
        return hook

    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(make_hook(n)))
        run_forward()
    finally:
        for h in handles:
            h.remove()
    out = []
    for n in names:
        s, m = sums[n], model.get_submodule(n)
        if s[6]:
            out.append(LayerError(n, m.in_features, m.out_features, int(s[6]), int(s[7]), _rel(s[0], s[1]),
                                  _rel(s[2], s[3]), _rel(s[4], s[3])))
    return out


def psnr(ref: torch.Tensor, test: torch.Tensor, peak: Optional[float] = None) -> float:
    """PSNR in dB; ``peak`` defaults to the reference's peak-to-peak range."""
    ref, test = ref.float(), test.float()
    mse = (ref - test).pow(2).mean().item()
    peak = (ref.max() - ref.min()).item() if peak is None else peak
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def agreement(ref: torch.Tensor, test: torch.Tensor, peak: Optional[float] = None) -> Dict[str, float]:
    """Cosine similarity (per sample, then the minimum), PSNR, relative L2, max abs diff."""
    if ref.shape != test.shape:
        raise ValueError(f"shapes differ: reference {tuple(ref.shape)} vs test {tuple(test.shape)}")
    r, t = ref.float().flatten(1), test.float().flatten(1)
    return {"cosine": F.cosine_similarity(r, t, dim=1).min().item(), "psnr_db": psnr(r, t, peak),
            "rel_l2": ((r - t).norm() / r.norm().clamp_min(1e-30)).item(), "max_abs": (r - t).abs().max().item()}


def synthetic_case(model: nn.Module, prompt: str, seed: int, height: int, width: int, text_len: int = 32,
                   feature_std: float = 1.0) -> Dict[str, object]:
    """A fixed case for a bare denoiser: text features from the prompt (hashed), noise from
    the seed, on the model's device and dtype. ``height``/``width`` are in pixels."""
    param = next(model.parameters())
    cfg = model.config
    h, w = height // 16, width // 16
    g_text = torch.Generator().manual_seed(zlib.crc32(prompt.encode("utf-8")))
    feats = [(torch.randn(1, text_len, cfg.enc_hidden_dim, generator=g_text) * feature_std)
             for _ in range(model.num_text_layers)]
    noise = torch.randn(1, h * w, cfg.in_channels, generator=torch.Generator().manual_seed(seed))
    to = dict(device=param.device, dtype=param.dtype)
    return {"prompt": prompt, "seed": seed, "grid": (h, w), "feats": [f.to(**to) for f in feats],
            "mask": torch.ones(1, text_len, dtype=torch.bool, device=param.device), "noise": noise.to(**to)}


@torch.no_grad()
def sample_latents(model: nn.Module, case: Dict[str, object], steps: int, guidance: float) -> torch.Tensor:
    """The Lens sampler on a case: CFG as [cond; uncond] with the empty negative prompt
    (zero features, all-False mask), norm-rescaled combination, float32 Euler steps."""
    h, w = case["grid"]
    feats, mask, latents = case["feats"], case["mask"], case["noise"].float()
    use_cfg = guidance != 1.0
    if use_cfg:
        feats = [torch.cat([f, torch.zeros_like(f)]) for f in feats]
        mask = torch.cat([mask, torch.zeros_like(mask)])
    sigmas, _ = lens_sigmas(steps, h * w, device=latents.device)
    dtype = case["noise"].dtype
    for i in range(steps):
        x = latents.to(dtype)
        x = torch.cat([x, x]) if use_cfg else x
        out = model(x, feats, mask, sigmas[i].expand(x.shape[0]).to(dtype), [(1, h, w)]).sample.float()
        v = cfg_combine(out[:1], out[1:], guidance) if use_cfg else out
        latents = latents + (sigmas[i + 1] - sigmas[i]) * v
    return latents


def _summarise_layers(layers: List[LayerError]) -> Dict[str, float]:
    if not layers:
        return {}
    worst = max(layers, key=lambda e: e.fp8_vs_model)
    return {"layers": len(layers), "mean_fp8_vs_model": sum(e.fp8_vs_model for e in layers) / len(layers),
            "max_fp8_vs_model": worst.fp8_vs_model, "worst_layer": worst.name,
            "mean_model_vs_fp32": sum(e.model_vs_fp32 for e in layers) / len(layers)}


def _summarise_cases(cases: List[Dict[str, object]]) -> Dict[str, float]:
    keys = [k for k in ("latent_cosine", "latent_psnr_db", "image_psnr_db") if k in cases[0]]
    out = {}
    for k in keys:
        vals = [c[k] for c in cases]
        out[f"mean_{k}"] = sum(vals) / len(vals)
        out[f"min_{k}"] = min(vals)
    return out


def model_quality_report(model: nn.Module, *, prompts: Sequence[str] = DEFAULT_PROMPTS,
                         seeds: Sequence[int] = DEFAULT_SEEDS, height: int = 1024, width: int = 1024,
                         steps: int = 4, guidance: float = 5.0, text_len: int = 32, layer_filter=None,
                         backend: str = "auto") -> Dict[str, object]:
    """Report on a bare denoiser. QUANTISES ``model`` IN PLACE after measuring it (so the
    caller can go on timing the FP8 model without a second copy in memory)."""
    cases = [synthetic_case(model, p, s, height, width, text_len) for p in prompts for s in seeds]
    layers = layer_errors(model, lambda: sample_latents(model, cases[0], 1, guidance),
                          layer_filter=layer_filter, backend=backend)
    refs = [sample_latents(model, c, steps, guidance) for c in cases]
    result = apply_quantization(model, "fp8", layer_filter=layer_filter, backend=backend)
    rows = []
    for c, ref in zip(cases, refs):
        a = agreement(ref, sample_latents(model, c, steps, guidance))
        rows.append({"prompt": c["prompt"], "seed": c["seed"], "latent_cosine": a["cosine"],
                     "latent_psnr_db": a["psnr_db"], "latent_rel_l2": a["rel_l2"]})
    return {"quantization": result.summary(), "backend": result.backend, "steps": steps, "guidance": guidance,
            "size": [height, width], "layers": [asdict(e) for e in layers], "layer_summary": _summarise_layers(layers),
            "cases": rows, "summary": _summarise_cases(rows)}


def pipeline_quality_report(pipe, *, prompts: Sequence[str] = DEFAULT_PROMPTS, seeds: Sequence[int] = DEFAULT_SEEDS,
                            height: int = 1024, width: int = 1024, steps: Optional[int] = None,
                            guidance: Optional[float] = None, layer_filter=None,
                            backend: str = "auto") -> Dict[str, object]:
    """Report through a ``LensPipeline`` (real text encoder and VAE): latents and decoded
    images. QUANTISES ``pipe.transformer`` IN PLACE after measuring it."""
    steps_d, guidance_d = pipe.recommended
    steps = steps_d if steps is None else steps
    guidance = guidance_d if guidance is None else guidance

    def run(prompt, seed, n):
        gen = torch.Generator(device=pipe.device).manual_seed(seed)
        return pipe(prompt, height=height, width=width, num_inference_steps=n, guidance_scale=guidance,
                    generator=gen, output_type="latent").images

    layers = layer_errors(pipe.transformer, lambda: run(prompts[0], seeds[0], 1), layer_filter=layer_filter,
                          backend=backend)
    refs = {(p, s): run(p, s, steps) for p in prompts for s in seeds}
    result = apply_quantization(pipe, "fp8", layer_filter=layer_filter, backend=backend)
    rows = []
    for (p, s), ref in refs.items():
        test = run(p, s, steps)
        a = agreement(ref, test)
        img_ref = pipe.postprocess(ref, height, width, "pt")
        img_test = pipe.postprocess(test, height, width, "pt")
        rows.append({"prompt": p, "seed": s, "latent_cosine": a["cosine"], "latent_psnr_db": a["psnr_db"],
                     "image_psnr_db": psnr(img_ref, img_test, peak=1.0)})
    return {"quantization": result.summary(), "backend": result.backend, "steps": steps, "guidance": guidance,
            "size": [height, width], "layers": [asdict(e) for e in layers], "layer_summary": _summarise_layers(layers),
            "cases": rows, "summary": _summarise_cases(rows)}
