"""SwiGLU activation ``silu(a) * b`` in Triton, forward and backward.

Design trade-off. ``a`` and ``b`` are addressed as two row-strided [R, F] operands, so the
same kernels serve separate w1/w3 GEMM outputs and the two halves of one fused [R, 2F]
w1|w3 GEMM output (row stride 2F) without a split copy; in the fused case the backward
writes da and db straight into the halves of one [R, 2F] gradient, which is what the
fused GEMM's backward consumes. The price: one extra stride argument per operand and a
unit-stride last dimension (the launcher makes it so). A program owns a [ROWS, BLOCK_F]
tile (grid: row tiles x column tiles; 2048 elements on a GPU, 16 per thread at 4 warps).
The sigmoid is recomputed in the backward instead of saved: the op is memory-bound, and
recomputing costs no bytes.
"""
from __future__ import annotations

import triton
import triton.language as tl


def config(f: int, interpreted: bool):
    """(ROWS, BLOCK_F, num_warps) for rows of ``f`` columns. The interpreter gets large
    tiles (its cost is per program, not per element)."""
    block_f = min(triton.next_power_of_2(max(f, 1)), 1024)
    rows = max(1, (16384 if interpreted else 2048) // block_f)
    return rows, block_f, 4


@triton.jit
def silu_mul_fwd_kernel(A, B, OUT, R, F, stride_a, stride_b, stride_o,
                        ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F))[None, :]
    mask = (row < R) & (cols < F)
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul_bwd_kernel(G, A, B, DA, DB, R, F, stride_g, stride_a, stride_b, stride_da, stride_db,
                        ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F))[None, :]
    mask = (row < R) & (cols < F)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    da = g * b * sig * (1.0 + a * (1.0 - sig))
    tl.store(DA + row * stride_da + cols, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + row * stride_db + cols, (g * silu).to(DB.dtype.element_ty), mask=mask)
