"""FP8 (e4m3) activation quantisation fused into the kernels that produce the activation.

Design trade-off. The FP8 linear layers of lens_fast take activations in float8_e4m3fn
with one float32 scale per token (row-wise, ``scale = amax / 448``). Quantising a bf16
activation on its own costs a full extra read and write of it (two reads with a separate
amax pass), which at Lens shapes eats a large part of what the FP8 GEMM saves. So the
quantisation happens inside the kernel that already holds the activation in registers:
- ``rms_norm_modulate_fp8``: the adaLN entry ``rmsnorm(x) * (1 + scale) + shift`` that
  feeds the fused QKV GEMM;
- ``gated_residual_rms_norm_modulate_fp8``: ``x += gate * y`` (written back in x's dtype)
  then the next adaLN entry: the MLP's (feeding w13, or w1 and w3) or, when the model
  chains blocks, the next block's attention entry;
- ``silu_mul_fp8``: SwiGLU's ``silu(a) * b`` feeding w2 (a and b may be the two halves
  of the fused w13 output: rows are read through their stride);
- ``quantize_rows_fp8``: a plain tensor (the attention output feeding ``to_out``, read
  through its strides as the [B, N, C] slice of the joint sequence it is).
A program owns ``ROWS`` whole rows (the per-token amax needs the full row before the
first store), so a row is read exactly once; the bf16 activation is never written.
All math is float32 and each value is rounded once, to e4m3. The rounding is done in
float32 (round-to-nearest-even onto the e4m3 grid, with the mantissa carry handled by
integer arithmetic on the bits) before the final cast, which is then exact: this keeps
the GPU result identical to ``tensor.to(torch.float8_e4m3fn)`` and also sidesteps the
Triton interpreter's fp8 cast, which drops the carry when rounding up to the next
binade (7.9 -> 4.0; checked on Triton 3.9). It costs a few integer ops per element in a
memory-bound kernel.

Each kernel's float32 torch reference (``*_ref``, same name) lives in
``lens_fast.quant.fp8`` (torch only, so CPU installs without Triton have it); tests, the
CPU path and the benchmark use them.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

# The format's largest value and the amax floor of the references in lens_fast.quant.fp8
# (tests hold the kernels to them, the floor included). Spelled out here, not imported:
# kernel modules import nothing of lens_fast, they sit below the code that launches them.
E4M3_MAX = tl.constexpr(torch.finfo(torch.float8_e4m3fn).max)
AMAX_FLOOR = tl.constexpr(1e-12)
# Below 2**-6 e4m3 is subnormal: a fixed grid of 2**-9. Adding and subtracting
# 1.5 * 2**14 rounds a float32 to that grid (round-to-nearest-even).
E4M3_MIN_NORMAL = tl.constexpr(0.015625)
SUBNORMAL_ROUNDER = tl.constexpr(24576.0)


# ------------------------------------------------------------------------------------
# Shared device helpers
# ------------------------------------------------------------------------------------
@triton.jit
def _round_to_e4m3_grid(v):
    """Round float32 v (already clamped to +-448) to the nearest e4m3 value, ties even."""
    bits = v.to(tl.int32, bitcast=True)
    # Keep 3 of 23 mantissa bits: add half an ulp (minus one when the kept lsb is 0) and
    # clear the dropped bits; a carry out of the mantissa bumps the exponent correctly.
    bits = (bits + (0x7FFFF + ((bits >> 20) & 1))) & -1048576
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (v + SUBNORMAL_ROUNDER) - SUBNORMAL_ROUNDER
    return tl.where(tl.abs(v) < E4M3_MIN_NORMAL, subnormal, normal)


@triton.jit
def _store_quantized(y, rows, cols, mask, row_ok, Q, SCALE, stride_q):
    """Quantise the float32 tile y [ROWS, BLOCK] row-wise and store e4m3 + scales."""
    amax = tl.maximum(tl.max(tl.abs(tl.where(mask, y, 0.0)), 1), AMAX_FLOOR)
    inv = E4M3_MAX / amax
    q = tl.minimum(tl.maximum(y * inv[:, None], -E4M3_MAX), E4M3_MAX)
    q = _round_to_e4m3_grid(q)
    tl.store(Q + rows[:, None] * stride_q + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
    tl.store(SCALE + rows, amax / E4M3_MAX, mask=row_ok)


@triton.jit
def _rms_modulate(x, mask, W, SHIFT, SCALE_MOD, b, cols, col_ok, stride_shift, stride_scale, C, eps):
    """rmsnorm(x) * w * (1 + scale[b]) + shift[b] on a float32 tile, per-row batch b."""
    rstd = tl.rsqrt(tl.sum(x * x, 1) / C + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    sh = tl.load(SHIFT + b[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE_MOD + b[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return (x * rstd[:, None] * w[None, :]) * (1.0 + sc) + sh


# ------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------
@triton.jit
def quantize_rows_fp8_kernel(X, Q, SCALE, M, L, C, stride_xb, stride_xl, stride_q,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < C)
    b = rows // L
    src = b * stride_xb + (rows - b * L) * stride_xl
    x = tl.load(X + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _store_quantized(x, rows, cols, mask, row_ok, Q, SCALE, stride_q)


@triton.jit
def rms_norm_modulate_fp8_kernel(X, W, SHIFT, SCALE_MOD, Q, SCALE, M, L, C,
                                 stride_xb, stride_xl, stride_shift, stride_scale, stride_q, eps,
                                 ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    b = rows // L
    src = b * stride_xb + (rows - b * L) * stride_xl
    x = tl.load(X + src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = _rms_modulate(x, mask, W, SHIFT, SCALE_MOD, b, cols, col_ok, stride_shift, stride_scale, C, eps)
    _store_quantized(y, rows, cols, mask, row_ok, Q, SCALE, stride_q)


@triton.jit
def gated_residual_rms_norm_modulate_fp8_kernel(X, Y, GATE, W, SHIFT, SCALE_MOD, X_OUT, Q, SCALE, M, L, C,
                                                stride_xb, stride_xl, stride_yb, stride_yl, stride_gate,
                                                stride_shift, stride_scale, stride_q, eps,
                                                ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    b = rows // L
    t = rows - b * L
    x = tl.load(X + (b * stride_xb + t * stride_xl)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + (b * stride_yb + t * stride_yl)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + b[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # The residual stream is stored in its own dtype and normalised as stored, so the
    # next block and this MLP input see the same values.
    x_new = (x + g * y).to(X_OUT.dtype.element_ty)
    tl.store(X_OUT + rows[:, None] * C + cols[None, :], x_new, mask=mask)
    h = _rms_modulate(x_new.to(tl.float32), mask, W, SHIFT, SCALE_MOD, b, cols, col_ok, stride_shift,
                      stride_scale, C, eps)
    _store_quantized(h, rows, cols, mask, row_ok, Q, SCALE, stride_q)


@triton.jit
def silu_mul_fp8_kernel(A, B, Q, SCALE, M, C, stride_a, stride_b, stride_q,
                        ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < C)
    a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    bv = tl.load(B + rows[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * bv
    _store_quantized(y, rows, cols, mask, row_ok, Q, SCALE, stride_q)


# ------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------
def launch_config(c: int) -> Tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for rows of c elements: a whole row per program, small
    rows batched so a program holds at least ~2K elements."""
    block = triton.next_power_of_2(c)
    rows = max(1, min(32, 2048 // block))
    return block, rows, 4 if block * rows <= 2048 else 8


def _outputs(shape, device, out):
    if out is None:
        return (torch.empty(shape, device=device, dtype=torch.float8_e4m3fn),
                torch.empty((*shape[:-1], 1), device=device, dtype=torch.float32))
    q, s = out
    if q.dtype != torch.float8_e4m3fn or tuple(q.shape) != tuple(shape) or not q.is_contiguous():
        raise ValueError(f"out[0] must be a contiguous float8_e4m3fn tensor of shape {tuple(shape)}, "
                         f"got {q.dtype} {tuple(q.shape)}")
    if s.dtype != torch.float32 or tuple(s.shape) != (*shape[:-1], 1) or not s.is_contiguous():
        raise ValueError(f"out[1] must be a contiguous float32 tensor of shape {(*shape[:-1], 1)}, "
                         f"got {s.dtype} {tuple(s.shape)}")
    return q, s


def _rows_view(t: torch.Tensor, name: str) -> torch.Tensor:
    """[..., C] -> a [M, C] view with unit column stride (copied only when impossible)."""
    t2 = t.reshape(-1, t.shape[-1])
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    if t2.shape[0] > 0 and t2.stride(0) < t2.shape[1]:
        raise ValueError(f"{name} rows overlap (stride {t2.stride(0)} < {t2.shape[1]} columns)")
    return t2


def _check_mod(name, t, b, c):
    if t.dim() != 2 or tuple(t.shape) != (b, c) or t.stride(-1) != 1:
        raise ValueError(f"{name} must be [B={b}, C={c}] with unit column stride, got {tuple(t.shape)} "
                         f"strides {t.stride()}")


def _token_strides(x: torch.Tensor, name: str):
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, L, C], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, x.stride(0), x.stride(1)


def quantize_rows_fp8(x: torch.Tensor, out=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [..., C]; a [B, L, C] view (e.g. the image rows of the joint attention output) is
    read through its strides, without a copy."""
    x3 = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1]) if x.dim() < 3 else x.reshape(-1, *x.shape[-2:])
    x3, sxb, sxl = _token_strides(x3, "x")
    bsz, length, c = x3.shape
    q, s = _outputs(x.shape, x.device, out)
    m = bsz * length
    block, rows, warps = launch_config(c)
    if m:
        quantize_rows_fp8_kernel[(triton.cdiv(m, rows),)](x3, q, s, m, length, c, sxb, sxl, c,
                                                          ROWS=rows, BLOCK=block, num_warps=warps)
    return q, s


def rms_norm_modulate_fp8(x, weight, shift, scale, eps: float, out=None):
    x, sxb, sxl = _token_strides(x, "x")
    bsz, length, c = x.shape
    _check_mod("shift", shift, bsz, c)
    _check_mod("scale", scale, bsz, c)
    q, s = _outputs(x.shape, x.device, out)
    m = bsz * length
    block, rows, warps = launch_config(c)
    if m:
        rms_norm_modulate_fp8_kernel[(triton.cdiv(m, rows),)](
            x, weight.contiguous(), shift, scale, q, s, m, length, c, sxb, sxl, shift.stride(0), scale.stride(0),
            c, eps, ROWS=rows, BLOCK=block, num_warps=warps)
    return q, s


def gated_residual_rms_norm_modulate_fp8(x, y, gate, weight, shift, scale, eps: float, out=None):
    x, sxb, sxl = _token_strides(x, "x")
    y, syb, syl = _token_strides(y, "y")
    bsz, length, c = x.shape
    if tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        _check_mod(name, t, bsz, c)
    x_out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    q, s = _outputs(x.shape, x.device, out)
    m = bsz * length
    block, rows, warps = launch_config(c)
    if m:
        gated_residual_rms_norm_modulate_fp8_kernel[(triton.cdiv(m, rows),)](
            x, y, gate, weight.contiguous(), shift, scale, x_out, q, s, m, length, c, sxb, sxl, syb, syl,
            gate.stride(0), shift.stride(0), scale.stride(0), c, eps, ROWS=rows, BLOCK=block, num_warps=warps)
    return x_out, q, s


def silu_mul_fp8(a: torch.Tensor, b: torch.Tensor, out=None):
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a2, b2 = _rows_view(a, "a"), _rows_view(b, "b")
    m, c = a2.shape
    q, s = _outputs(a.shape, a.device, out)
    block, rows, warps = launch_config(c)
    if m:
        silu_mul_fp8_kernel[(triton.cdiv(m, rows),)](a2, b2, q, s, m, c, a2.stride(0), b2.stride(0), c,
                                                     ROWS=rows, BLOCK=block, num_warps=warps)
    return q, s



def aot_compile(arch: int, c: int, dtype: str = "bf16") -> dict:
    """Every kernel compiled ahead of time for sm_<arch> at its launch config for rows of
    ``c`` elements of ``dtype`` (CI checks registers, spills and the e4m3 conversion
    without a GPU). Needs TRITON_INTERPRET unset. Returns {kernel name: compiled}."""
    from . import aot

    t, q = f"*{dtype}", dict(Q="*fp8e4nv", SCALE="*fp32")
    specs = {
        "quantize_rows": (quantize_rows_fp8_kernel, dict(X=t, **q), ()),
        "rms_norm_modulate": (rms_norm_modulate_fp8_kernel, dict(X=t, W=t, SHIFT=t, SCALE_MOD=t, **q), ("eps",)),
        "gated_residual_rms_norm_modulate": (gated_residual_rms_norm_modulate_fp8_kernel,
                                             dict(X=t, Y=t, GATE=t, W=t, SHIFT=t, SCALE_MOD=t, X_OUT=t, **q), ("eps",)),
        "silu_mul": (silu_mul_fp8_kernel, dict(A=t, B=t, **q), ()),
    }
    block, rows, warps = launch_config(c)
    return {name: aot.compile_for(fn, arch, ptrs, {"ROWS": rows, "BLOCK": block}, floats, num_warps=warps)
            for name, (fn, ptrs, floats) in specs.items()}
