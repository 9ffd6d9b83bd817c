"""QK-norm + 3-axis RoPE + joint layout for Lens attention, forward and backward, in Triton.

Design trade-off. One launch covers both streams: a program owns BLOCK_T tokens of the
joint sequence [image ; text] for one (head, sample) and picks each row's source tensor
(img_qkv or txt_qkv) and its RMSNorm weights per row with a select, so there is no
separate launch per stream, no torch.cat and no transpose; q, k, v land directly in the
[B, N + S, H, D] layout attention reads. The price is that both streams' weight vectors
are loaded by every program (2 x D values, cached) and one block straddles the
image/text seam. Rows are loaded whole (D contiguous elements, vectorised) and split
into the interleaved (even, odd) RoPE pairs in registers with reshape + split rather
than loaded with stride 2. All math is float32, rounded once on store. The backward
recomputes rstd from the input (a head row is only D values: recomputing is free, and
nothing but the inputs is saved); a backward program walks several token tiles of one
(head, sample), accumulating the norm-weight gradient products in registers, and writes
one partial row [4, D] that the launcher reduces (deterministic, no atomics; at Lens
shapes about 8 programs per SM: ~1 MB of partials against ~210 MB of gradient traffic).
"""
from __future__ import annotations

import triton
import triton.language as tl

NUM_WARPS = 4


def block_t(interpreted: bool, backward: bool = False) -> int:
    """Tokens per program tile. GPU forward: 16 (a [16, 64] tile over 4 warps, one 16-byte
    vector per thread and tensor; 91 registers on sm_90, 152 at 32 tokens). GPU backward:
    8 (100 registers on sm_90 with its eight accumulators, against 185 at 16 tokens: five
    programs per SM instead of two). The interpreter, whose cost is per program, gets 256.
    NOTE: register counts from the AOT compile (tests/test_cuda_sources.py), not timed."""
    if interpreted:
        return 256
    return 8 if backward else 16


@triton.jit
def _pairs(ptrs, mask, BLOCK_T: tl.constexpr, HALF: tl.constexpr):
    """Load [BLOCK_T, 2*HALF] contiguous values as float32 and split into (even, odd)."""
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(x, (BLOCK_T, HALF, 2)))


@triton.jit
def _unpairs(even, odd, BLOCK_T: tl.constexpr, HALF: tl.constexpr):
    return tl.reshape(tl.join(even, odd), (BLOCK_T, 2 * HALF))


@triton.jit
def _select_w(w_img, w_txt, is_img):
    return tl.where(is_img[:, None], w_img[None, :], w_txt[None, :])


@triton.jit
def qk_norm_rope_fwd_kernel(IMG, TXT, W_Q, W_K, W_AQ, W_AK, ROPE, Q, K, V,
                            N, S, H, D, stride_ib, stride_in, stride_tb, stride_tn, eps,
                            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    HALF: tl.constexpr = BLOCK_D // 2
    L = N + S
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_ok = t < L
    is_img = t < N
    mask = row_ok[:, None] & (cols[None, :] < D)
    hd = H * D
    # Row base of token t inside its own stream's [B, rows, 3*H*D] projection.
    src = tl.where(is_img, IMG + b * stride_ib + t.to(tl.int64) * stride_in,
                   TXT + b * stride_tb + (t - N).to(tl.int64) * stride_tn)
    src = src[:, None] + h * D + cols[None, :]
    dst = (b * L + t.to(tl.int64))[:, None] * hd + h * D + cols[None, :]

    cos, sin = _pairs(ROPE + t.to(tl.int64)[:, None] * D + cols[None, :], mask, BLOCK_T, HALF)
    for part in tl.static_range(2):
        if part == 0:
            w_img_ptr, w_txt_ptr, out = W_Q, W_AQ, Q
        else:
            w_img_ptr, w_txt_ptr, out = W_K, W_AK, K
        w_ie, w_io = tl.split(tl.reshape(tl.load(w_img_ptr + cols, mask=cols < D, other=0.0).to(tl.float32),
                                         (HALF, 2)))
        w_te, w_to = tl.split(tl.reshape(tl.load(w_txt_ptr + cols, mask=cols < D, other=0.0).to(tl.float32),
                                         (HALF, 2)))
        xe, xo = _pairs(src + part * hd, mask, BLOCK_T, HALF)
        rstd = tl.rsqrt((tl.sum(xe * xe, 1) + tl.sum(xo * xo, 1)) / D + eps)
        ne = xe * rstd[:, None] * _select_w(w_ie, w_te, is_img)
        no = xo * rstd[:, None] * _select_w(w_io, w_to, is_img)
        re = ne * cos - no * sin
        im = ne * sin + no * cos
        tl.store(out + dst, _unpairs(re, im, BLOCK_T, HALF).to(out.dtype.element_ty), mask=mask)
    v = tl.load(src + 2 * hd, mask=mask, other=0.0)
    tl.store(V + dst, v.to(V.dtype.element_ty), mask=mask)


@triton.jit
def _part_bwd(x_ptrs, g_ptrs, dx_ptrs, mask, cos, sin, w_ie, w_io, w_te, w_to, is_img, D, eps,
              BLOCK_T: tl.constexpr, HALF: tl.constexpr):
    """Backward of RoPE and the per-stream RMSNorm for one of q / k on a token tile: stores
    dx and returns the tile's (dn * xhat) products (even, odd) for the weight gradients."""
    xe, xo = _pairs(x_ptrs, mask, BLOCK_T, HALF)
    rstd = tl.rsqrt((tl.sum(xe * xe, 1) + tl.sum(xo * xo, 1)) / D + eps)[:, None]
    he = xe * rstd
    ho = xo * rstd
    ge, go = _pairs(g_ptrs, mask, BLOCK_T, HALF)
    # Inverse rotation: gradient with respect to the normalised, weighted pair.
    dne = ge * cos + go * sin
    dno = go * cos - ge * sin
    dhe = dne * _select_w(w_ie, w_te, is_img)
    dho = dno * _select_w(w_io, w_to, is_img)
    c = ((tl.sum(dhe * he, 1) + tl.sum(dho * ho, 1)) / D)[:, None]
    dx = _unpairs(rstd * (dhe - he * c), rstd * (dho - ho * c), BLOCK_T, HALF)
    tl.store(dx_ptrs, dx.to(dx_ptrs.dtype.element_ty), mask=mask)
    return dne * he, dno * ho


@triton.jit
def _store_sums(ptrs, acc_even, acc_odd, BLOCK_D: tl.constexpr):
    """Store the token sums of an (even, odd) accumulator pair interleaved back to [D]."""
    tl.store(ptrs, tl.reshape(tl.join(tl.sum(acc_even, 0), tl.sum(acc_odd, 0)), (BLOCK_D,)))


@triton.jit
def _weight_pairs(W, cols, D, HALF: tl.constexpr):
    return tl.split(tl.reshape(tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32), (HALF, 2)))


@triton.jit
def qk_norm_rope_bwd_kernel(DQ, DK, DV, IMG, TXT, W_Q, W_K, W_AQ, W_AK, ROPE, DIMG, DTXT, DW_PART,
                            N, S, H, D, stride_ib, stride_in, stride_tb, stride_tn,
                            stride_gb, stride_gl, stride_gh, tiles_per_prog, eps,
                            BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program owns ``tiles_per_prog`` consecutive token tiles of one (head, sample) and
    accumulates the weight-gradient products over them in registers: DW_PART holds one
    [4, BLOCK_D] row per program (q image, k image, q text, k text)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    HALF: tl.constexpr = BLOCK_D // 2
    L = N + S
    hd = H * D
    cols = tl.arange(0, BLOCK_D)
    wq_ie, wq_io = _weight_pairs(W_Q, cols, D, HALF)
    wq_te, wq_to = _weight_pairs(W_AQ, cols, D, HALF)
    wk_ie, wk_io = _weight_pairs(W_K, cols, D, HALF)
    wk_te, wk_to = _weight_pairs(W_AK, cols, D, HALF)
    acc_qie = tl.zeros((BLOCK_T, HALF), tl.float32)
    acc_qio = tl.zeros((BLOCK_T, HALF), tl.float32)
    acc_qte = tl.zeros((BLOCK_T, HALF), tl.float32)
    acc_qto = tl.zeros((BLOCK_T, HALF), tl.float32)
    acc_kie = tl.zeros((BLOCK_T, HALF), tl.float32)
    acc_kio = tl.zeros((BLOCK_T, HALF), tl.float32)
    acc_kte = tl.zeros((BLOCK_T, HALF), tl.float32)
    acc_kto = tl.zeros((BLOCK_T, HALF), tl.float32)
    for i in range(tiles_per_prog):
        t = (pid * tiles_per_prog + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        t64 = t.to(tl.int64)
        row_ok = t < L
        is_img = t < N
        mask = row_ok[:, None] & (cols[None, :] < D)
        src = tl.where(is_img, IMG + b * stride_ib + t64 * stride_in, TXT + b * stride_tb + (t64 - N) * stride_tn)
        src = src[:, None] + h * D + cols[None, :]
        # Gradients of the projections are allocated contiguous [B, rows, 3*H*D].
        gdst = tl.where(is_img, DIMG + (b * N + t64) * 3 * hd, DTXT + (b * S + t64 - N) * 3 * hd)
        gdst = gdst[:, None] + h * D + cols[None, :]
        gsrc = (b * stride_gb + t64 * stride_gl + h * stride_gh)[:, None] + cols[None, :]
        cos, sin = _pairs(ROPE + t64[:, None] * D + cols[None, :], mask, BLOCK_T, HALF)
        img_f = (is_img & row_ok).to(tl.float32)[:, None]
        txt_f = ((~is_img) & row_ok).to(tl.float32)[:, None]
        pe, po = _part_bwd(src, DQ + gsrc, gdst, mask, cos, sin, wq_ie, wq_io, wq_te, wq_to, is_img, D, eps,
                           BLOCK_T, HALF)
        acc_qie += pe * img_f
        acc_qio += po * img_f
        acc_qte += pe * txt_f
        acc_qto += po * txt_f
        pe, po = _part_bwd(src + hd, DK + gsrc, gdst + hd, mask, cos, sin, wk_ie, wk_io, wk_te, wk_to, is_img, D,
                           eps, BLOCK_T, HALF)
        acc_kie += pe * img_f
        acc_kio += po * img_f
        acc_kte += pe * txt_f
        acc_kto += po * txt_f
        dv = tl.load(DV + gsrc, mask=mask, other=0.0)
        tl.store(gdst + 2 * hd, dv.to(DIMG.dtype.element_ty), mask=mask)
    base = DW_PART + ((b * H + h) * tl.num_programs(0) + pid) * 4 * BLOCK_D + cols
    _store_sums(base, acc_qie, acc_qio, BLOCK_D)
    _store_sums(base + BLOCK_D, acc_kie, acc_kio, BLOCK_D)
    _store_sums(base + 2 * BLOCK_D, acc_qte, acc_qto, BLOCK_D)
    _store_sums(base + 3 * BLOCK_D, acc_kte, acc_kto, BLOCK_D)
