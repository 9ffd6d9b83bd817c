"""GPU microbenchmark of the fused block ops and of one whole Lens block.

Shapes: Lens at 1024x1024 -- batch 2 (CFG), 4096 image + 256 text tokens, 24 heads x 64,
dim 1536, SwiGLU hidden 4096, txt_norm width 2880 -- in bf16.

Per op (forward and backward) and backend (the PyTorch reference ``torch``, that
reference under ``torch.compile`` ``compile``, and each kernel backend present:
``triton``, ``cuda``), one line: median ms (p20-p80), achieved GB/s = the op's ideal
bytes (each input read once, each output written once; listed in OPS below) / time, % of
the copy bandwidth measured on the same card in the same run, speedup over ``torch`` and
over ``compile``, peak memory. Kernel backends are called through ``lens_fast.ops``
(the custom op and its dispatch included); CUDA C++ has forward kernels only.

Whole block: forward and forward+backward of ``LensTransformerBlock`` (one CFG batch:
sample 1's text fully masked) as the PyTorch reference (``reference_block``: the
reference ops in eager), ``torch.compile`` of that reference, and lens_fast's block
(auto backends); all three use the same attention (SDPA) so the ratios measure the fused
ops; ``lens_fast+attn`` adds lens_fast's auto attention choice.

The card's ceilings are measured once: device-to-device copy GB/s (read + write), bf16
and fp8 (e4m3, ``torch._scaled_mm``) matmul TFLOP/s at 8192^3 (FLOPs = 2 M N K).
Writes ops.json and ops.md to --out (default $OUT). ``--dry-run``: tiny shapes on the
CPU with the torch backend (and an eager stand-in for compile), a CI smoke test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

from lens_fast.models.embeddings import rope_table  # noqa: E402
from lens_fast.ops import dispatch, optional  # noqa: E402
from lens_fast.ops.attention import joint_attention  # noqa: E402
from lens_fast.ops.norm_modulate import (gated_residual_rms_norm_modulate,  # noqa: E402
                                         gated_residual_rms_norm_modulate_ref, layer_norm_modulate,
                                         layer_norm_modulate_ref, rms_norm, rms_norm_modulate, rms_norm_modulate_ref,
                                         rms_norm_ref)
from lens_fast.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref  # noqa: E402
from lens_fast.ops.swiglu import silu_mul, silu_mul_ref, swiglu  # noqa: E402

LENS = dict(batch=2, n_img=4096, h=64, w=64, n_txt=256, heads=24, head_dim=64, dim=1536, hidden=4096,
            enc=2880, axes=(8, 28, 28))
TINY = dict(batch=2, n_img=15, h=3, w=5, n_txt=7, heads=2, head_dim=32, dim=64, hidden=96, enc=40,
            axes=(8, 12, 12))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for ops.json and ops.md (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, torch backend (CI smoke test)")
    p.add_argument("--rep-ms", type=int, default=50, help="do_bench budget per measurement")
    p.add_argument("--ceilings-json", help="reuse ceilings measured earlier in this run (bench/gpu_check.sh)")
    p.add_argument("--only-ceilings", action="store_true", help="measure the card's ceilings, write them, stop")
    p.add_argument("--no-block", action="store_true", help="skip the whole-block section")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- timing

def make_timer(device: torch.device, rep_ms: int):
    """fn -> (median, p20, p80) ms: triton's do_bench on CUDA, wall clock on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        def run(fn):
            return tuple(do_bench(fn, warmup=10, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
        return run

    def run(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return statistics.median(times), times[0], times[-1]
    return run


def peak_mb(device, fn) -> float:
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**20


def measure_ceilings(device, timer, dry: bool) -> dict:
    n = (1 << 20) if dry else (1 << 29)  # 1 GiB of bf16 on a GPU
    src = torch.randn(n, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))[0]
    out = {"copy_gbps": 2 * src.numel() * 2 / ms / 1e6}
    m = 256 if dry else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    out["bf16_tflops"] = 2 * m ** 3 / timer(lambda: a @ b)[0] / 1e9
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()  # column-major second operand
        one = torch.ones((), device=device)
        torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16)
        out["fp8_tflops"] = 2 * m ** 3 / timer(lambda: torch._scaled_mm(a8, b8, one, one,
                                                                        out_dtype=torch.bfloat16))[0] / 1e9
    except (RuntimeError, TypeError) as e:
        out["fp8_tflops"] = None
        out["fp8_error"] = str(e).splitlines()[0][:200]
    return out


# ----------------------------------------------------------------------------- op cases

def op_cases(s: dict, device, dtype):
    """name -> (reference fn, fused fn, inputs, bytes forward, bytes backward)."""
    b, n, t, hh, d, c, f, e = s["batch"], s["n_img"], s["n_txt"], s["heads"], s["head_dim"], s["dim"], s["hidden"], 2
    hd, L = hh * d, n + t
    g = lambda *shape, scale=1.0, shift=0.0: (torch.randn(*shape, device=device) * scale + shift).to(dtype)  # noqa
    rope = rope_table(s["h"], s["w"], t, s["axes"], device=device)
    mods = g(b, 6 * c, scale=0.5)
    sh, sc, gt = mods[:, :c], mods[:, c:2 * c], mods[:, 2 * c:3 * c]
    w = g(c, scale=0.1, shift=1.0)
    x, y = g(b, n, c), g(b, n, c)
    qk_w = [g(d, scale=0.1, shift=1.0) for _ in range(4)]
    rows, unit = b * n, b * n * c * e
    cases = {
        "qk_norm_rope": (lambda i, tx, *ws: qk_norm_rope_ref(i, tx, hh, *ws, rope, 1e-6),
                         lambda i, tx, *ws: qk_norm_rope(i, tx, hh, *ws, rope, 1e-6),
                         [g(b, n, 3 * hd), g(b, t, 3 * hd)] + qk_w,
                         6 * b * L * hd * e + L * d * 4, 8 * b * L * hd * e + L * d * 4),
        "rms_norm_modulate": (lambda *a: rms_norm_modulate_ref(*a, 1e-6),
                              lambda *a: rms_norm_modulate(*a, 1e-6), [x, w, sh, sc], 2 * unit, 3 * unit),
        "gated_residual_rms_norm_modulate": (lambda *a: gated_residual_rms_norm_modulate_ref(*a, 1e-6),
                                             lambda *a: gated_residual_rms_norm_modulate(*a, 1e-6),
                                             [x, y, gt, w, sh, sc], 4 * unit, 6 * unit),
        "layer_norm_modulate": (lambda *a: layer_norm_modulate_ref(*a, 1e-6),
                                lambda *a: layer_norm_modulate(*a, 1e-6), [x, sh, sc], 2 * unit, 3 * unit),
        "rms_norm(txt_norm)": (lambda *a: rms_norm_ref(*a, 1e-5), lambda *a: rms_norm(*a, 1e-5),
                               [g(b, t, s["enc"]), g(s["enc"], scale=0.1, shift=1.0)],
                               2 * b * t * s["enc"] * e, 3 * b * t * s["enc"] * e),
        "silu_mul": (silu_mul_ref, silu_mul, [g(rows, f, scale=2.0), g(rows, f)],
                     3 * rows * f * e, 5 * rows * f * e),
        "swiglu": (lambda h: silu_mul_ref(*h.chunk(2, dim=-1)), swiglu, [g(rows, 2 * f, scale=2.0)],
                   3 * rows * f * e, 5 * rows * f * e),
    }
    return cases


# The CUDA extension function behind each op's ``cuda`` backend (forward only).
CUDA_FUNCTIONS = {"qk_norm_rope": "qk_norm_rope_fwd", "rms_norm_modulate": "norm_modulate_fwd",
                  "gated_residual_rms_norm_modulate": "norm_modulate_fwd",
                  "layer_norm_modulate": "norm_modulate_fwd", "rms_norm(txt_norm)": "norm_modulate_fwd"}


def kernel_backends(op: str, device) -> list:
    """Kernel backends to time for ``op`` on this machine (none on the CPU)."""
    if device.type != "cuda":
        return []
    found = ["triton"] if optional.triton_usable() else []
    ext = optional.cuda_extension()
    if op in CUDA_FUNCTIONS and ext is not None and hasattr(ext, CUDA_FUNCTIONS[op]):
        found.insert(0, "cuda")
    return found


def bench_op(name, ref, fn, inputs, fwd_bytes, bwd_bytes, timer, device, compile_backend, args_backends):
    rows = []
    leaves = [t.detach().requires_grad_() for t in inputs]
    variants = [("torch", ref, "torch"), ("compile", torch.compile(ref, backend=compile_backend), "torch")]
    variants += [(b, fn, b) for b in args_backends]
    for label, f, forced in variants:
        os.environ[dispatch.ENV_VAR] = forced
        with torch.no_grad():
            fwd = timer(lambda: f(*inputs))
        outs = f(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.randn_like(o) for o in outs]
        try:
            bwd = timer(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True))
            derived = False
        except RuntimeError:  # a compiled graph that cannot retain: forward+backward minus forward
            both = timer(lambda: torch.autograd.grad(f(*leaves), leaves, grads, allow_unused=True))
            bwd, derived = tuple(max(both[i] - fwd[i], 1e-6) for i in range(3)), True
        mem = peak_mb(device, lambda: torch.autograd.grad(f(*leaves), leaves, grads, allow_unused=True))
        for phase, ms, nbytes in (("fwd", fwd, fwd_bytes), ("bwd", bwd, bwd_bytes)):
            rows.append(dict(op=name, phase=phase, backend=label, median_ms=ms[0], p20_ms=ms[1], p80_ms=ms[2],
                             gbps=nbytes / ms[0] / 1e6, bytes=nbytes, peak_mb=mem,
                             derived=derived if phase == "bwd" else False))
    os.environ.pop(dispatch.ENV_VAR, None)
    return rows


# ----------------------------------------------------------------------------- whole block

def reference_block(block, img, txt, temb, rope, mask):
    """``LensTransformerBlock.forward`` written with the reference ops only (what
    ``LENS_FAST_BACKEND=torch`` computes), attention through SDPA."""
    n, eps, attn = img.shape[1], block.eps, block.attn
    i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = block.img_mod(temb).chunk(6, dim=-1)
    t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = block.txt_mod(temb).chunk(6, dim=-1)
    xi = rms_norm_modulate_ref(img, block.img_norm1.weight, i_sh1, i_sc1, eps)
    xt = rms_norm_modulate_ref(txt, block.txt_norm1.weight, t_sh1, t_sc1, eps)
    q, k, v = qk_norm_rope_ref(attn.img_qkv(xi), attn.txt_qkv(xt), attn.heads, attn.norm_q.weight,
                               attn.norm_k.weight, attn.norm_added_q.weight, attn.norm_added_k.weight, rope, eps)
    out = joint_attention(q, k, v, mask, n_img=n, backend="sdpa").flatten(2).to(q.dtype)
    img, hi = gated_residual_rms_norm_modulate_ref(img, attn.to_out[0](out[:, :n]), i_g1, block.img_norm2.weight,
                                                   i_sh2, i_sc2, eps)
    txt, ht = gated_residual_rms_norm_modulate_ref(txt, attn.to_add_out(out[:, n:]), t_g1, block.txt_norm2.weight,
                                                   t_sh2, t_sc2, eps)
    mi, mt = block.img_mlp, block.txt_mlp
    img = img + i_g2.unsqueeze(1) * mi.w2(silu_mul_ref(mi.w1(hi), mi.w3(hi)))
    txt = txt + t_g2.unsqueeze(1) * mt.w2(silu_mul_ref(mt.w1(ht), mt.w3(ht)))
    return img, txt


def bench_block(s, device, dtype, timer, compile_backend):
    from lens_fast.models.transformer import LensTransformerBlock
    torch.manual_seed(0)
    block = LensTransformerBlock(s["dim"], s["heads"], s["head_dim"], True, True).to(device, dtype)
    b = s["batch"]
    img = torch.randn(b, s["n_img"], s["dim"], device=device, dtype=dtype)
    txt = torch.randn(b, s["n_txt"], s["dim"], device=device, dtype=dtype)
    temb = torch.randn(b, s["dim"], device=device, dtype=dtype)
    rope = rope_table(s["h"], s["w"], s["n_txt"], s["axes"], device=device)
    mask = torch.ones(b, s["n_txt"], dtype=torch.bool, device=device)
    mask[-1] = False  # the uncond row: empty negative prompt
    with torch.no_grad():
        os.environ[dispatch.ENV_VAR] = "torch"
        want = reference_block(block, img, txt, temb, rope, mask)
        got = block(img, txt, temb, rope, mask)
        os.environ.pop(dispatch.ENV_VAR)
    agree = max(((a - w).abs().max() / w.abs().max()).item() for a, w in zip(got, want))
    variants = [("reference", lambda *a: reference_block(block, *a), None),
                ("reference+compile", torch.compile(lambda *a: reference_block(block, *a), backend=compile_backend),
                 None),
                ("lens_fast", block, "sdpa"), ("lens_fast+attn", block, None)]
    rows = []
    for label, f, attention in variants:
        if attention:
            os.environ["LENS_FAST_ATTENTION"] = attention
        leaves = [img.detach().requires_grad_(), txt.detach().requires_grad_()]

        def step():
            oi, ot = f(leaves[0], leaves[1], temb, rope, mask)
            (oi.float().square().mean() + ot.float().square().mean()).backward()
            for p in [*block.parameters(), *leaves]:
                p.grad = None
        with torch.no_grad():
            fwd = timer(lambda: f(img, txt, temb, rope, mask))
        both = timer(step)
        mem = peak_mb(device, step)
        os.environ.pop("LENS_FAST_ATTENTION", None)
        for phase, ms in (("fwd", fwd), ("fwd+bwd", both)):
            rows.append(dict(variant=label, phase=phase, median_ms=ms[0], p20_ms=ms[1], p80_ms=ms[2], peak_mb=mem))
    return rows, agree


# ----------------------------------------------------------------------------- report

def add_ratios(rows, key, base_labels, label_key):
    base = {(r[key], r["phase"], r[label_key]): r["median_ms"] for r in rows}
    for r in rows:
        for b in base_labels:
            ref = base.get((r[key], r["phase"], b))
            r[f"speedup_vs_{b.replace('+', '_')}"] = ref / r["median_ms"] if ref else None


def markdown(result) -> str:
    env, ceil = result["env"], result["ceilings"]
    lines = [f"# Fused ops on {env['device']} ({env['date']})", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, dtype {env['dtype']}, "
             f"shapes {json.dumps(result['shapes'])}", "",
             f"Ceilings (same run): copy {ceil['copy_gbps']:.0f} GB/s, bf16 matmul {ceil['bf16_tflops']:.0f} TFLOP/s, "
             f"fp8 matmul {ceil['fp8_tflops'] if ceil['fp8_tflops'] is None else round(ceil['fp8_tflops'])} "
             "TFLOP/s", "",
             "| op | pass | backend | median ms (p20-p80) | GB/s | % copy BW | vs torch | vs compile | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in result["ops"]:
        lines.append(f"| {r['op']} | {r['phase']}{'*' if r['derived'] else ''} | {r['backend']} | "
                     f"{r['median_ms']:.4f} ({r['p20_ms']:.4f}-{r['p80_ms']:.4f}) | {r['gbps']:.0f} | "
                     f"{r['pct_copy']:.0f}% | {fmt(r['speedup_vs_torch'])} | {fmt(r['speedup_vs_compile'])} | "
                     f"{r['peak_mb']:.0f} |")
    if result.get("block"):
        lines += ["", f"Whole block (reference vs lens_fast agree to {result['block_agreement']:.1e} of scale):", "",
                  "| variant | pass | median ms (p20-p80) | vs reference | vs reference+compile | peak MB |",
                  "|---|---|---|---|---|---|"]
        for r in result["block"]:
            lines.append(f"| {r['variant']} | {r['phase']} | {r['median_ms']:.3f} ({r['p20_ms']:.3f}-"
                         f"{r['p80_ms']:.3f}) | {fmt(r['speedup_vs_reference'])} | "
                         f"{fmt(r['speedup_vs_reference_compile'])} | {r['peak_mb']:.0f} |")
    lines += ["", "(* backward derived as forward+backward minus forward)"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        sys.exit("bench/ops.py needs a CUDA GPU (use --dry-run on the CPU)")
    timer = make_timer(device, args.rep_ms)
    if args.ceilings_json and os.path.isfile(args.ceilings_json):
        with open(args.ceilings_json, encoding="utf-8") as fh:
            ceilings = json.load(fh)
    else:
        ceilings = measure_ceilings(device, timer, dry)
    print("ceilings " + json.dumps(ceilings), flush=True)
    if args.only_ceilings:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "ceilings.json"), "w", encoding="utf-8") as fh:
                json.dump(ceilings, fh, indent=1)
        return 0
    shapes, dtype = (TINY, torch.float32) if dry else (LENS, torch.bfloat16)
    compile_backend = "eager" if dry else "inductor"
    env = dict(device=torch.cuda.get_device_name() if not dry else "cpu (dry run)", torch=torch.__version__,
               triton=getattr(sys.modules.get("triton"), "__version__", None) if optional.has_module("triton")
               else None, cuda=torch.version.cuda, dtype=str(dtype).replace("torch.", ""),
               date=datetime.datetime.now().isoformat(timespec="seconds"),
               cuda_extension=optional.cuda_extension() is not None)
    result = dict(env=env, shapes=shapes, ceilings=ceilings, ops=[])
    for name, (ref, fn, inputs, fb, bb) in op_cases(shapes, device, dtype).items():
        rows = bench_op(name, ref, fn, inputs, fb, bb, timer, device, compile_backend, kernel_backends(name, device))
        for r in rows:
            r["pct_copy"] = 100 * r["gbps"] / ceilings["copy_gbps"]
        add_ratios(rows, "op", ("torch", "compile"), "backend")
        for r in rows:
            print(f"{r['op']:34s} {r['phase']:3s} {r['backend']:7s} {r['median_ms']:9.4f} ms "
                  f"({r['p20_ms']:.4f}-{r['p80_ms']:.4f}) {r['gbps']:7.0f} GB/s {r['pct_copy']:5.1f}% copy  "
                  f"x{r['speedup_vs_torch'] or 0:.2f} vs torch  x{r['speedup_vs_compile'] or 0:.2f} vs compile  "
                  f"{r['peak_mb']:.0f} MB  {env['device']}", flush=True)
        result["ops"] += rows
        save(result, args.out)  # after every op: a run cut short still leaves its numbers
    if not args.no_block:
        block, agree = bench_block(shapes, device, dtype, timer, compile_backend)
        add_ratios(block, "phase", ("reference", "reference+compile"), "variant")
        result.update(block=block, block_agreement=agree)
        for r in block:
            print(f"block {r['variant']:18s} {r['phase']:7s} {r['median_ms']:9.3f} ms ({r['p20_ms']:.3f}-"
                  f"{r['p80_ms']:.3f})  x{r['speedup_vs_reference'] or 0:.2f} vs reference  "
                  f"x{r['speedup_vs_reference_compile'] or 0:.2f} vs compile  {r['peak_mb']:.0f} MB", flush=True)
        save(result, args.out)
    if args.out:
        print(f"wrote {os.path.join(args.out, 'ops.json')} and ops.md")
    return 0


def save(result, out):
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ops.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(out, "ops.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown(result))


if __name__ == "__main__":
    sys.exit(main())
