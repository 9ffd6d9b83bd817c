"""GPU benchmark of the joint attention backends at Lens shapes.

Every backend present (flash_attn, sdpa, triton, torch) runs forward and backward on
B=2, H=24, D=64, L = 4096+256 and 8100+256 (1024^2 and ~1440^2 images with 256 text
tokens), bf16, once without padding and once CFG-style (cond row: full text; uncond row:
text all masked). FLOPs are counted dense, padding included, as usual for attention:
forward 4*B*H*L^2*D (QK^T and PV, 2 FLOPs per multiply-add), backward 2.5x that. A
backend that skips padding therefore shows a higher equivalent TFLOP/s on padded cases.
Prints one line per (case, backend): median ms (p20-p80), TFLOP/s, % of the best backend
in the same run, peak memory, GPU name; then checks that the auto pick is within 5% of the
best and that triton reaches >= 70% of the best, and writes everything as JSON to --out
(or $OUT/attention.json). ``--sweep`` also times the Triton launch configs
(kernels/flash_attention.py SWEEP_CONFIGS) to retune the shipped table; ``--dry-run`` runs
tiny shapes on the CPU through the torch and sdpa backends (a smoke test for CI).

Key limits (section ``key_limits``): the CFG-padded case again, the text keys given as
per-row limits (``txt_len``: cond rows all text, uncond rows none) instead of a mask, what
the inference engine passes; forward only, eager and inside ``torch.compile`` (where the
engine runs it: SDPA can take a limit only as a broadcast mask there, Triton bounds its key
loop), per backend.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from lens_fast.ops import attention as A  # noqa: E402
from lens_fast.ops import dispatch  # noqa: E402
from _timing import timer  # noqa: E402  (bench/ is sys.path[0] when run as a script)

BACKENDS = ("flash_attn", "sdpa", "triton", "torch")
TORCH_MATH_MAX_BYTES = 8 << 30  # the math backend materialises fp32 [B, H, L, L] scores


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON output path (default: $OUT/attention.json if $OUT is set)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU via the torch and sdpa backends")
    p.add_argument("--shapes", default="4096+256,8100+256", help="comma list of n_img+n_txt")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition budget per measurement")
    p.add_argument("--sweep", action="store_true", help="also time every Triton config in SWEEP_CONFIGS")
    p.add_argument("--no-fp8", action="store_true", help="skip the opt-in FP8 forward entry")
    return p.parse_args(argv)


def make_case(B, n_img, n_txt, H, D, dtype, device, padded):
    L = n_img + n_txt
    qkv = torch.randn(B, L, 3, H, D, device=device, dtype=dtype)
    q, k, v = (t.detach().requires_grad_() for t in qkv.unbind(2))
    mask = None
    if padded:
        mask = torch.zeros(B, n_txt, dtype=torch.bool, device=device)
        mask[: (B + 1) // 2] = True  # cond rows: full text; uncond rows: empty prompt
    return q, k, v, mask


def can_run(backend, q, k, v, mask, max_math_bytes):
    try:
        A.select_backend(q, k, v, mask, backend=backend)
    except (dispatch.BackendUnavailableError, ValueError):
        return False
    B, L, H, _ = q.shape
    return backend != "torch" or B * H * L * L * 4 <= max_math_bytes


def measure(backend, q, k, v, mask, n_img, bench, device):
    def fwd():
        with torch.no_grad():
            return A.joint_attention(q, k, v, mask, n_img=n_img, backend=backend)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    f = bench(fwd)
    out = A.joint_attention(q, k, v, mask, n_img=n_img, backend=backend)
    dout = torch.randn_like(out)
    b = bench(lambda: out.backward(dout, retain_graph=True), grad_to_none=[q, k, v])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return f, b, peak


def run_key_limits(args, device, dtype, bench, shapes, backends, gpu):
    rows = []
    for n_img, n_txt in shapes:
        q, k, v, _ = make_case(args.batch, n_img, n_txt, args.heads, args.head_dim, dtype, device, False)
        q, k, v = (t.detach() for t in (q, k, v))
        lengths = torch.zeros(args.batch, dtype=torch.int32, device=device)
        lengths[: (args.batch + 1) // 2] = n_txt
        flops = 4 * args.batch * args.heads * (n_img + n_txt) ** 2 * args.head_dim
        for backend in backends:
            if not can_run(backend, q, k, v, None, TORCH_MATH_MAX_BYTES):
                continue
            def eager(q, k, v, n, b=backend):
                return A.joint_attention(q, k, v, n_img=n_img, txt_len=n, backend=b)
            for mode, fn in (("eager", eager), ("compiled", torch.compile(eager, fullgraph=True, dynamic=False))):
                with torch.no_grad():
                    fn(q, k, v, lengths)  # compiles
                    f = bench(lambda: fn(q, k, v, lengths))
                rows.append(dict(section="key_limits", backend=backend, mode=mode, shape=f"{n_img}+{n_txt}",
                                 median_ms=f[0], p20_ms=f[1], p80_ms=f[2], tflops=flops / f[0] * 1e-9, gpu=gpu))
                print(f"{backend:10s} key limits {mode:8s} L={n_img}+{n_txt} fwd {f[0]:8.3f} ms "
                      f"({f[1]:.3f}-{f[2]:.3f}) {flops / f[0] * 1e-9:7.1f} TFLOP/s | {gpu}", flush=True)
    return rows


def run_sweep(args, device, dtype, bench, shapes):
    fa = A._kernels()
    rows = []
    for n_img, n_txt in shapes:
        q, k, v, mask = make_case(args.batch, n_img, n_txt, args.heads, args.head_dim, dtype, device, True)
        q, k, v = (t.detach() for t in (q, k, v))
        flops = 4 * args.batch * args.heads * (n_img + n_txt) ** 2 * args.head_dim
        for cfg in fa.SWEEP_CONFIGS:
            try:
                f = bench(lambda: fa.attention_forward(q, k, v, mask, n_img=n_img, config=cfg))
                out, lse = fa.attention_forward(q, k, v, mask, n_img=n_img, config=cfg)
                do = torch.randn_like(out)
                b = bench(lambda: fa.attention_backward(do, q, k, v, out, lse, mask, n_img=n_img,
                                                        dkdv_config=cfg, dq_config=cfg))
            except Exception as exc:  # noqa: BLE001 - a config that does not fit is a result too
                print(f"sweep {cfg} L={n_img}+{n_txt}: failed ({type(exc).__name__}: {exc})".splitlines()[0])
                continue
            row = dict(config=cfg.__dict__, shape=f"{n_img}+{n_txt}", fwd_ms=f[0], bwd_ms=b[0],
                       fwd_tflops=flops / f[0] * 1e-9, bwd_tflops=2.5 * flops / b[0] * 1e-9)
            rows.append(row)
            print(f"sweep {cfg} L={n_img}+{n_txt}: fwd {f[0]:.3f} ms {row['fwd_tflops']:.1f} TFLOP/s | "
                  f"bwd {b[0]:.3f} ms {row['bwd_tflops']:.1f} TFLOP/s", flush=True)
    return rows


def run_fp8(args, device, dtype, bench, shapes):
    from lens_fast.kernels import fp8_attention as f8
    if device.type != "cuda" or not f8.fp8_supported(device):
        return []
    rows = []
    for n_img, n_txt in shapes:
        q, k, v, mask = make_case(args.batch, n_img, n_txt, args.heads, args.head_dim, dtype, device, True)
        q, k, v = (t.detach() for t in (q, k, v))
        flops = 4 * args.batch * args.heads * (n_img + n_txt) ** 2 * args.head_dim
        f = bench(lambda: f8.fp8_attention(q, k, v, mask, n_img=n_img))
        err = f8.fp8_attention_error(q, k, v, mask, n_img=n_img)
        rows.append(dict(shape=f"{n_img}+{n_txt}", fwd_ms=f[0], fwd_tflops=flops / f[0] * 1e-9, **err))
        print(f"fp8-qk     L={n_img}+{n_txt} fwd {f[0]:.3f} ms ({f[1]:.3f}-{f[2]:.3f}) "
              f"{flops / f[0] * 1e-9:6.1f} TFLOP/s  rel err vs fp32 {err['fp8_vs_fp32']:.2e} "
              f"(16-bit: {err['16bit_vs_fp32']:.2e})", flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        args.batch, args.heads, args.head_dim, args.shapes = 2, 2, 32, "64+16"
        backends, max_math = ("torch", "sdpa"), TORCH_MATH_MAX_BYTES
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/attention.py needs a CUDA GPU (use --dry-run on a CPU)")
        device = torch.device("cuda")
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
        backends, max_math = BACKENDS, TORCH_MATH_MAX_BYTES
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    shapes = [tuple(int(x) for x in s.split("+")) for s in args.shapes.split(",")]
    bench = timer(device, args.rep_ms)
    cases, checks = [], []
    for n_img, n_txt in shapes:
        for padded in (False, True):
            q, k, v, mask = make_case(args.batch, n_img, n_txt, args.heads, args.head_dim, dtype, device, padded)
            L = n_img + n_txt
            flops = 4 * args.batch * args.heads * L * L * args.head_dim
            name = f"B{args.batch} H{args.heads} D{args.head_dim} L={n_img}+{n_txt} {'cfg-pad' if padded else 'no-pad'}"
            rows = []
            for backend in backends:
                if not can_run(backend, q, k, v, mask, max_math):
                    print(f"{backend:10s} {name}: not available or skipped here")
                    continue
                f, b, peak = measure(backend, q, k, v, mask, n_img, bench, device)
                rows.append(dict(backend=backend, case=name, median_ms=f[0], p20_ms=f[1], p80_ms=f[2],
                                 tflops=flops / f[0] * 1e-9, bwd_median_ms=b[0], bwd_p20_ms=b[1],
                                 bwd_p80_ms=b[2], bwd_tflops=2.5 * flops / b[0] * 1e-9,
                                 peak_gib=peak, gpu=gpu))
            best_f = max(r["tflops"] for r in rows)
            best_b = max(r["bwd_tflops"] for r in rows)
            for r in rows:
                r["pct_of_best"] = 100.0 * (r["tflops"] / best_f)
                r["bwd_pct_of_best"] = 100.0 * (r["bwd_tflops"] / best_b)
                print(f"{r['backend']:10s} {name}  fwd {r['median_ms']:8.3f} ms ({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) "
                      f"{r['tflops']:7.1f} TFLOP/s {r['pct_of_best']:5.1f}% | bwd {r['bwd_median_ms']:8.3f} ms "
                      f"({r['bwd_p20_ms']:.3f}-{r['bwd_p80_ms']:.3f}) {r['bwd_tflops']:7.1f} TFLOP/s "
                      f"{r['bwd_pct_of_best']:5.1f}% | peak {_gib(r['peak_gib'])} | {gpu}", flush=True)
            cases += rows
            auto = A.select_backend(q, k, v, mask)
            by_name = {r["backend"]: r for r in rows}
            check = dict(case=name, auto=auto, best=max(rows, key=lambda r: r["tflops"])["backend"],
                         auto_within_5pct=auto in by_name and by_name[auto]["pct_of_best"] >= 95.0,
                         triton_pct_of_best=by_name["triton"]["pct_of_best"] if "triton" in by_name else None)
            check["triton_ge_70pct"] = (None if check["triton_pct_of_best"] is None
                                        else check["triton_pct_of_best"] >= 70.0)
            checks.append(check)
            print(f"check      {name}: auto={auto} best={check['best']} auto within 5%: "
                  f"{check['auto_within_5pct']}; triton >= 70% of best: "
                  f"{'n/a' if check['triton_ge_70pct'] is None else check['triton_ge_70pct']}", flush=True)
    key_limits = run_key_limits(args, device, dtype, bench, shapes, backends, gpu)
    sweep = run_sweep(args, device, dtype, bench, shapes) if args.sweep and device.type == "cuda" else []
    fp8 = [] if args.no_fp8 or args.dry_run else run_fp8(args, device, dtype, bench, shapes)
    result = dict(gpu=gpu, date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                  triton=_triton_version(), dtype=str(dtype), flops="fwd 4*B*H*L^2*D, bwd 2.5x fwd (dense)",
                  cases=cases, checks=checks, key_limits=key_limits, sweep=sweep, fp8=fp8)
    out = args.out or (os.path.join(os.environ["OUT"], "attention.json") if os.environ.get("OUT") else None)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {out}")
    return result


def _gib(value):
    return "n/a" if value is None else f"{value:.1f} GiB"


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
