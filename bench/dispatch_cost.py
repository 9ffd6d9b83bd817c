"""Per-call host cost of the fused-op layer on this machine's CPU: what choosing a
backend and entering an op cost before any arithmetic, the overhead a GPU step pays
on the host for every op call when it is not replayed from a CUDA graph.

Cases (tiny tensors, so the numbers are the fixed per-call cost; median of ``--repeats``
timed batches of ``--calls`` calls each, with p20-p80):
- ``select <op>``: the backend decision alone, auto and with ``LENS_FAST_BACKEND=torch`` or
  ``triton`` (the Triton interpreter: the CPU stand-in for a kernel path, where every
  candidate backend's rules are checked);
- ``attention select``: the joint-attention backend decision;
- ``entry <op>`` vs ``reference <op>``: the public entry point the model calls (on CPU
  tensors it runs the reference) against calling the reference directly; the difference
  is what the entry adds;
- ``custom op <op>``: the ``torch.library`` op that kernel backends run in, here with the
  torch backend inside (what a compiled graph or a CUDA kernel backend pays on the host);
- ``block fwd``: one small LensTransformerBlock forward, eager, auto backends;
- ``selects per block``: how many backend decisions one block forward and one
  forward+backward make when every op takes its kernel path (``LENS_FAST_BACKEND=triton``
  through the interpreter; counted, not timed).

Run: ``python bench/dispatch_cost.py [--out results.json]`` (one thread; measure on an
idle machine, or say it was shared).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from lens_fast.models.embeddings import rope_table  # noqa: E402
from lens_fast.models.transformer import LensTransformerBlock  # noqa: E402
from lens_fast.ops import attention as A  # noqa: E402
from lens_fast.ops import dispatch  # noqa: E402
from lens_fast.ops import norm_modulate as NM  # noqa: E402
from lens_fast.ops.norm_modulate import rms_norm_modulate, rms_norm_modulate_ref  # noqa: E402
from lens_fast.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref  # noqa: E402
from lens_fast.ops.swiglu import silu_mul_ref, swiglu  # noqa: E402
B, L, C, H, D = 2, 8, 64, 2, 32


def per_call_us(fn, calls: int, repeats: int):
    """(median, p20, p80) microseconds per call of ``fn()``."""
    for _ in range(max(10, calls // 10)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter_ns() - t0) / calls / 1e3)
    q = statistics.quantiles(times, n=5)
    return statistics.median(times), q[0], q[-1]


def norm_inputs():
    x = torch.randn(B, L, C)
    mods = torch.randn(B, 6 * C)
    return x, torch.ones(C), mods[:, :C], mods[:, C:2 * C]


def qk_inputs():
    img, txt = torch.randn(B, L, 3 * H * D), torch.randn(B, 5, 3 * H * D)
    ws = [torch.rand(D) + 0.5 for _ in range(4)]
    return img, txt, ws, rope_table(2, 4, 5, (8, 12, 12))


def cases():
    x, w, shift, scale = norm_inputs()
    img, txt, ws, rope = qk_inputs()
    h = torch.randn(B * L, 2 * C)
    q = torch.randn(B, L + 5, H, D)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[-1, 3:] = False
    yield "select rms_norm_modulate", None, lambda: dispatch.select("rms_norm_modulate", x, None, None, w, shift,
                                                                     scale)
    yield "select rms_norm_modulate", "torch", lambda: dispatch.select("rms_norm_modulate", x, None, None, w,
                                                                        shift, scale)
    yield "select rms_norm_modulate", "triton", lambda: dispatch.select("rms_norm_modulate", x, None, None, w,
                                                                         shift, scale)
    yield "select qk_norm_rope", None, lambda: dispatch.select("qk_norm_rope", img, txt, H, *ws)
    yield "select swiglu", None, lambda: dispatch.select("swiglu", h)
    yield "attention select", None, lambda: A.select_backend(q, q, q, mask)
    yield "reference rms_norm_modulate", None, lambda: rms_norm_modulate_ref(x, w, shift, scale, 1e-6)
    yield "entry rms_norm_modulate", None, lambda: rms_norm_modulate(x, w, shift, scale, 1e-6)
    yield "custom op rms_norm_modulate", None, lambda: NM.rms_norm_modulate_op(x, w, shift, scale, 1e-6)
    yield "reference qk_norm_rope", None, lambda: qk_norm_rope_ref(img, txt, H, *ws, rope, 1e-6)
    yield "entry qk_norm_rope", None, lambda: qk_norm_rope(img, txt, H, *ws, rope, 1e-6)
    yield "reference swiglu", None, lambda: silu_mul_ref(*h.chunk(2, dim=-1))
    yield "entry swiglu", None, lambda: swiglu(h)
    block, args = small_block()
    yield "block fwd", None, lambda: block(*args)


def small_block():
    torch.manual_seed(0)
    block = LensTransformerBlock(C, H, D, True, True).eval()
    n, s = 8, 5
    img, txt, temb = torch.randn(B, n, C), torch.randn(B, s, C), torch.randn(B, C)
    rope = rope_table(2, 4, s, (8, 12, 12))
    mask = torch.ones(B, s, dtype=torch.bool)
    mask[-1, 3:] = False
    return block, (img, txt, temb, rope, mask)


def selects_per_block():
    """Backend decisions per block forward and forward+backward on the kernel paths."""
    counted = []
    real = dispatch.select

    def counting(op, *a, **k):
        counted.append(op)
        return real(op, *a, **k)

    block, (img, txt, temb, rope, mask) = small_block()
    os.environ[dispatch.ENV_VAR] = "triton"
    dispatch.select = counting
    try:
        img = img.requires_grad_()
        out = block(img, txt, temb, rope, mask)
        fwd = len(counted)
        (out[0].square().mean() + out[1].square().mean()).backward()
        both = len(counted)
    finally:
        dispatch.select = real
        os.environ.pop(dispatch.ENV_VAR)
    return fwd, both


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'case':34s} {'LENS_FAST_BACKEND':>17s} {'median us':>10s} {'p20-p80 us':>16s}")
    with torch.no_grad():
        for name, forced, fn in cases():
            if forced is None:
                os.environ.pop(dispatch.ENV_VAR, None)
            else:
                os.environ[dispatch.ENV_VAR] = forced
            med, p20, p80 = per_call_us(fn, args.calls if not name.startswith("block") else args.calls // 20,
                                        args.repeats)
            os.environ.pop(dispatch.ENV_VAR, None)
            rows.append(dict(case=name, backend=forced or "auto", median_us=med, p20_us=p20, p80_us=p80))
            print(f"{name:34s} {forced or 'auto':>17s} {med:10.2f} {p20:7.2f}-{p80:<8.2f}")
    fwd, both = selects_per_block()
    print(f"backend decisions per block (kernel paths): forward {fwd}, forward+backward {both}")
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                processor=platform.processor() or platform.machine(), threads=1, calls=args.calls,
                repeats=args.repeats, selects_per_block_fwd=fwd, selects_per_block_fwd_bwd=both)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
