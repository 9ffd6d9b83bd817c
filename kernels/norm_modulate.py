"""The adaLN chain of the Lens block in Triton: (gated residual +) RMSNorm/LayerNorm
(+ weight) (+ per-sample shift/scale modulation), forward and backward.

Design trade-off. One kernel pair, specialised by constexpr flags, serves rms_norm,
rms_norm_modulate, gated_residual_rms_norm_modulate and layer_norm_modulate, so every
variant reads the stream once and writes each output once. A forward program holds
ROWS whole rows in registers (the row is padded to a power of two: at dim 1536 a quarter
of the lanes idle, which costs issue slots but no memory traffic) and keeps float32
statistics; it saves mean/rstd in float32 for the backward. The backward is
"persistent per sample": a grid of (P, B) programs each walks a contiguous run of rows of
one sample, accumulating the token reductions (dweight, dshift, dscale, dgate) in float32
registers, and writes one partial row per program; the launcher sums the [B, P, C]
partials (deterministic, no atomics). P trades the partials' extra traffic
(4 x B x P x C x 4 bytes) against enough programs to fill the card.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def norm_modulate_fwd_kernel(X, Y, GATE, W, SHIFT, SCALE, RES_OUT, OUT, MEAN, RSTD,
                             L, C, stride_xb, stride_xl, stride_yb, stride_yl,
                             stride_gate, stride_shift, stride_scale, eps,
                             BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
                             HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                             HAS_MOD: tl.constexpr, LAYER: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < L
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(X + (b * stride_xb + r64 * stride_xl)[:, None] + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    out_off = (b * L + r64)[:, None] * C + cols[None, :]
    if HAS_RESIDUAL:
        y = tl.load(Y + (b * stride_yb + r64 * stride_yl)[:, None] + cols[None, :], mask=mask, other=0.0)
        gate = tl.load(GATE + b * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
        x = x + gate[None, :] * y.to(tl.float32)
        x_q = x.to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + out_off, x_q, mask=mask)
        # The stream is stored in its own dtype; normalise what was stored, as the
        # reference normalises the rounded sum.
        x = x_q.to(tl.float32)
    if LAYER:
        mean = tl.sum(x, 1) / C
        x = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(MEAN + b * L + rows, mean, mask=row_ok)
    rstd = tl.rsqrt(tl.sum(x * x, 1) / C + eps)
    tl.store(RSTD + b * L + rows, rstd, mask=row_ok)
    n = x * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        n = n * w[None, :]
    if HAS_MOD:
        shift = tl.load(SHIFT + b * stride_shift + cols, mask=col_ok, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + b * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
        n = n * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(OUT + out_off, n.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def norm_modulate_bwd_kernel(DOUT, DRES, XN, Y, GATE, W, SCALE, MEAN, RSTD, DX, DY,
                             DW_PART, DSHIFT_PART, DSCALE_PART, DGATE_PART,
                             L, C, rows_per_prog, stride_xb, stride_xl, stride_yb, stride_yl,
                             stride_gate, stride_scale,
                             BLOCK_C: tl.constexpr, ROWS: tl.constexpr, HAS_DRES: tl.constexpr,
                             HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MOD: tl.constexpr,
                             LAYER: tl.constexpr):
    """XN is the tensor that was normalised (the residual output when HAS_RESIDUAL);
    DOUT, DRES, DX, DY are contiguous [B, L, C]. Partials are [B, P, C] float32.
    ``rows_per_prog`` is a multiple of ROWS."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    num_p = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        w = tl.full((1, BLOCK_C), 1.0, tl.float32)
    if HAS_MOD:
        scale1 = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        scale1 = tl.full((1, BLOCK_C), 1.0, tl.float32)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * stride_gate + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc_w = tl.zeros((ROWS, BLOCK_C), tl.float32)
    acc_shift = tl.zeros((ROWS, BLOCK_C), tl.float32)
    acc_scale = tl.zeros((ROWS, BLOCK_C), tl.float32)
    acc_gate = tl.zeros((ROWS, BLOCK_C), tl.float32)
    row0 = pid * rows_per_prog
    row1 = tl.minimum(row0 + rows_per_prog, L)
    for r0 in range(row0, row1, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < row1
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)
        off = (b * L + r64)[:, None] * C + cols[None, :]
        x = tl.load(XN + (b * stride_xb + r64 * stride_xl)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        rstd = tl.load(RSTD + b * L + rows, mask=row_ok, other=0.0)[:, None]
        if LAYER:
            x = x - tl.load(MEAN + b * L + rows, mask=row_ok, other=0.0)[:, None]
        xhat = tl.where(mask, x * rstd, 0.0)
        g = tl.load(DOUT + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_MOD:
            acc_shift += g
            acc_scale += g * xhat * w
        dn = g * scale1
        acc_w += dn * xhat
        dxh = dn * w
        proj = (tl.sum(dxh * xhat, 1) / C)[:, None]
        if LAYER:
            dx = rstd * (dxh - (tl.sum(dxh, 1) / C)[:, None] - xhat * proj)
        else:
            dx = rstd * (dxh - xhat * proj)
        if HAS_DRES:
            dx += tl.load(DRES + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            y = tl.load(Y + (b * stride_yb + r64 * stride_yl)[:, None] + cols[None, :], mask=mask, other=0.0)
            acc_gate += dx * y.to(tl.float32)
            tl.store(DY + off, (dx * gate).to(DY.dtype.element_ty), mask=mask)
    part = (b * num_p + pid) * C + cols
    if HAS_WEIGHT:
        tl.store(DW_PART + part, tl.sum(acc_w, 0), mask=col_ok)
    if HAS_MOD:
        tl.store(DSHIFT_PART + part, tl.sum(acc_shift, 0), mask=col_ok)
        tl.store(DSCALE_PART + part, tl.sum(acc_scale, 0), mask=col_ok)
    if HAS_RESIDUAL:
        tl.store(DGATE_PART + part, tl.sum(acc_gate, 0), mask=col_ok)
