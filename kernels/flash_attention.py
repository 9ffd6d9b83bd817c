"""Flash attention over Lens's joint sequence [image ; text], forward and backward, in Triton.

Design trade-off. Lens attends over image tokens (always valid) followed by text tokens
whose validity is an arbitrary per-sample mask. Instead of a dense [L, L] bias we pass the
[B, S] text mask (uint8) plus a per-sample key bound ``key_len[b] = n_img + 1 + last valid
text index``, computed on the device (no host sync, so the op is graph- and
compile-friendly). Each program walks its keys in two loops: full image blocks with no
masking code at all, then the few tail blocks (image remainder + text, up to
``key_len[b]``) where the bounds check and the mask bytes are applied. When the valid text
keys are a prefix of every row (right padding, the inference engine's text buckets) the
bound alone describes them: ``BOUNDED`` without ``HAS_MASK`` reads no mask bytes and runs
every full key block below the bound unchecked. Padding after the
last valid token therefore costs no FLOPs (an empty negative prompt only touches the
image keys), while holes inside the text are masked exactly. The price is a second copy of
the inner loop in the binary and a mask byte load per tail block, both negligible at Lens
shapes (4096 image keys, ~256 text keys). Softmax runs online in fp32 in the log2 domain;
the forward saves log2-sum-exp so the backward recomputes P without a second max pass.
The backward is FlashAttention-2 style and deterministic (no atomics): a preprocess for
delta = rowsum(dO * O), one kernel owning a key block (dK, dV) and one owning a query
block (dQ); the QK^T recompute this costs is the same as the fused single-kernel variant.
FP8: with ``QK_FP8`` the q/k tiles arrive in e4m3 with per-(batch, head) scales folded
into the softmax scale; P@V stays in the value dtype (fp16/bf16) for accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

HEAD_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Shipped launch configs, keyed (arch family, head_dim). 90 = Hopper (sm_90), 80 = Ampere
# and Ada. Chosen from the Triton flash-attention practice on these cards and checked
# spill-free by the AOT test (tests/test_attention.py); bench/attention.py --sweep times
# SWEEP_CONFIGS on a GPU to retune them. NOTE: not yet timed on a GPU. AOT (Triton 3.9,
# bf16, D=64): sm_90 fwd 246 regs / 112 KiB smem, dK/dV 196 / 64 KiB, dQ 148 / 64 KiB, all
# on wgmma; sm_80 fwd 255 / 48 KiB, dK/dV 255 / 56 KiB, dQ 247 / 56 KiB; no spills anywhere.
FWD_CONFIGS = {
    (90, 16): Config(128, 128, 8, 3), (90, 32): Config(128, 128, 8, 3),
    (90, 64): Config(128, 128, 8, 3), (90, 128): Config(128, 128, 8, 2),
    (80, 16): Config(128, 64, 4, 3), (80, 32): Config(128, 64, 4, 3),
    (80, 64): Config(128, 64, 4, 3), (80, 128): Config(128, 64, 8, 2),
}
# Backward dK/dV: a program owns block_n keys and steps over block_m queries.
DKDV_CONFIGS = {
    (90, 16): Config(64, 128, 8, 2), (90, 32): Config(64, 128, 8, 2),
    (90, 64): Config(64, 128, 8, 2), (90, 128): Config(64, 128, 8, 2),
    (80, 16): Config(64, 128, 8, 2), (80, 32): Config(64, 128, 8, 2),
    (80, 64): Config(64, 128, 8, 2), (80, 128): Config(64, 64, 8, 2),
}
# Backward dQ: a program owns block_m queries and steps over block_n keys.
DQ_CONFIGS = {
    (90, 16): Config(128, 64, 8, 2), (90, 32): Config(128, 64, 8, 2),
    (90, 64): Config(128, 64, 8, 2), (90, 128): Config(128, 64, 8, 2),
    (80, 16): Config(128, 64, 8, 2), (80, 32): Config(128, 64, 8, 2),
    (80, 64): Config(128, 64, 8, 2), (80, 128): Config(64, 64, 8, 2),
}
CONFIG_TABLES = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}
SWEEP_CONFIGS = [Config(m, n, w, s) for m, n in ((128, 128), (128, 64), (64, 64), (64, 128))
                 for w in (4, 8) for s in (2, 3)]
FP32_CONFIG = Config(64, 64, 4, 2)        # fp32 tiles are twice the bytes: keep them small
INTERPRETER_CONFIG = Config(64, 64, 4, 1)  # few, large numpy steps under TRITON_INTERPRET=1


def arch_family(device: torch.device) -> int:
    """90 for Hopper and datacenter Blackwell (228 KiB shared memory per SM), 80 for
    Ampere, Ada and consumer Blackwell (<= 164 KiB), 0 for the CPU interpreter."""
    if device.type != "cuda":
        return 0
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major in (9, 10) else 80


def pick_config(kind: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> Config:
    if kind not in CONFIG_TABLES:
        raise ValueError(f"config kind {kind!r}; expected one of {sorted(CONFIG_TABLES)}")
    family = arch_family(device)
    if family == 0:
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return FP32_CONFIG
    return CONFIG_TABLES[kind][(family, head_dim)]


@triton.jit
def _key_valid(mask_row, kpos, n_img, key_len, HAS_MASK: tl.constexpr):
    """Validity of key positions ``kpos``: inside the sample's key bound and, for text keys,
    set in the text mask (image keys are always valid)."""
    valid = kpos < key_len
    if HAS_MASK:
        tpos = kpos - n_img
        txt = tl.load(mask_row + tpos, mask=valid & (tpos >= 0), other=1)
        valid = valid & (txt != 0)
    return valid


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, start_n, offs_n, offs_d,
              mask_row, n_img, key_len, qk_scale,
              TAIL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    kpos = start_n + offs_n
    if TAIL:
        # Masked keys are never read, so garbage (even NaN) in padded rows cannot leak.
        valid = _key_valid(mask_row, kpos, n_img, key_len, HAS_MASK)
        k = tl.load(k_base + kpos[:, None] * stride_kl + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_vl + offs_d[None, :], mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_base + kpos[:, None] * stride_kl + offs_d[None, :])
        v = tl.load(v_base + kpos[:, None] * stride_vl + offs_d[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if TAIL:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, MASK, KEY_LEN, Q_SCALE, K_SCALE, sm_scale, n_img, L, H,
                     stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                     stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh, stride_mb,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BOUNDED: tl.constexpr, HAS_MASK: tl.constexpr, QK_FP8: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    if QK_FP8:
        qk_scale = qk_scale * tl.load(Q_SCALE + pid_bh) * tl.load(K_SCALE + pid_bh)
    if BOUNDED:
        key_len = tl.load(KEY_LEN + b)
    else:
        key_len = L
    if HAS_MASK:  # holes in the text: only the image blocks run unchecked
        full_end = (n_img // BLOCK_N) * BLOCK_N
    else:
        full_end = (key_len // BLOCK_N) * BLOCK_N
    mask_row = MASK + b * stride_mb
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, start_n,
                                  offs_n, offs_d, mask_row, n_img, key_len, qk_scale,
                                  False, HAS_MASK, DOT_PREC)
    for start_n in range(full_end, key_len, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, start_n,
                                  offs_n, offs_d, mask_row, n_img, key_len, qk_scale,
                                  True, HAS_MASK, DOT_PREC)
    acc = acc / l_i[:, None]
    tl.store(LSE + pid_bh * L + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, L, H, stride_ob, stride_ol, stride_oh,
                      stride_db, stride_dl, stride_dh,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_m < L)[:, None]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                mask=row_ok, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dl + offs_d[None, :],
                 mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, MASK, KEY_LEN, sm_scale, n_img, L, H,
                     stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                     stride_vb, stride_vl, stride_vh, stride_db, stride_dl, stride_dh,
                     stride_gb, stride_gl, stride_gh, stride_mb,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BOUNDED: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program owns BLOCK_N keys of one (batch, head) and loops over every query.
    dK and dV share the strides (stride_g*) of their contiguous [B, L, H, D] buffers."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = (offs_n < L)[:, None]
    if BOUNDED:
        key_len = tl.load(KEY_LEN + b)
    else:
        key_len = L
    # Masked keys load as zeros: their dK, dV come out exactly 0 whatever the padding holds.
    valid = _key_valid(MASK + b * stride_mb, offs_n, n_img, key_len, HAS_MASK)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :],
                mask=valid[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :],
                mask=valid[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    # Key blocks past the sample's last valid key get no gradient: skip the whole loop.
    hi = tl.where(pid_n * BLOCK_N < key_len, L, 0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_db + h * stride_dh
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < L
        q = tl.load(q_base + rows[:, None] * stride_ql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dl + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + pid_bh * L + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * L + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        if BOUNDED:
            p_t = tl.where(valid[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    dk = dk * sm_scale
    out_off = b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gl + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=key_ok)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kl, stride_vl, start_n, offs_n, offs_d,
             mask_row, n_img, key_len, qk_scale,
             TAIL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    kpos = start_n + offs_n
    if TAIL:
        valid = _key_valid(mask_row, kpos, n_img, key_len, HAS_MASK)
        k = tl.load(k_base + kpos[:, None] * stride_kl + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_vl + offs_d[None, :], mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_base + kpos[:, None] * stride_kl + offs_d[None, :])
        v = tl.load(v_base + kpos[:, None] * stride_vl + offs_d[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if TAIL:
        p = tl.where(valid[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, MASK, KEY_LEN, sm_scale, n_img, L, H,
                   stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                   stride_vb, stride_vl, stride_vh, stride_db, stride_dl, stride_dh,
                   stride_gb, stride_gl, stride_gh, stride_mb,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BOUNDED: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program owns BLOCK_M queries and walks the keys like the forward does."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dl + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh * L + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * L + offs_m, mask=row_ok, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    if BOUNDED:
        key_len = tl.load(KEY_LEN + b)
    else:
        key_len = L
    if HAS_MASK:  # holes in the text: only the image blocks run unchecked
        full_end = (n_img // BLOCK_N) * BLOCK_N
    else:
        full_end = (key_len // BLOCK_N) * BLOCK_N
    mask_row = MASK + b * stride_mb
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kl, stride_vl, start_n, offs_n,
                      offs_d, mask_row, n_img, key_len, qk_scale, False, HAS_MASK, DOT_PREC)
    for start_n in range(full_end, key_len, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kl, stride_vl, start_n, offs_n,
                      offs_d, mask_row, n_img, key_len, qk_scale, True, HAS_MASK, DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gl + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------- launchers

def key_lengths(txt_mask: torch.Tensor, n_img: int) -> torch.Tensor:
    """int32 [B]: n_img + 1 + index of the last valid text token (n_img when none is valid).
    Keys at or past this bound are never attended; computed on the device, no host sync."""
    s = txt_mask.shape[1]
    pos = torch.arange(1, s + 1, device=txt_mask.device, dtype=torch.int32)
    last = torch.where(txt_mask.bool(), pos, torch.zeros_like(pos)).amax(dim=1)
    return (last + n_img).to(torch.int32)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_inputs(q, k, v, txt_mask, n_img):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, L, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, L, H, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported by the Triton kernel; expected one of {HEAD_DIMS}")
    if not 0 <= n_img <= L:
        raise ValueError(f"n_img={n_img} must lie in [0, L={L}]")
    if txt_mask is not None and tuple(txt_mask.shape) != (B, L - n_img):
        raise ValueError(f"txt_mask has shape {tuple(txt_mask.shape)}; expected [B, S] = "
                         f"{[B, L - n_img]}")


def _prepare_mask(txt_mask: Optional[torch.Tensor], n_img: int, key_len: Optional[torch.Tensor],
                  like: torch.Tensor):
    """(mask as contiguous uint8, key_len int32, bounded, has_mask) with dummies for what is
    absent. A ``key_len`` without a mask bounds each row's keys (a text prefix) by itself."""
    if txt_mask is None or txt_mask.shape[1] == 0:
        if key_len is None:
            return like, like, False, False
        return like, key_len.to(torch.int32).contiguous(), True, False
    mask = txt_mask.to(torch.uint8) if txt_mask.dtype != torch.uint8 else txt_mask
    mask = mask.contiguous()
    if key_len is None:
        key_len = key_lengths(mask, n_img)
    return mask, key_len.to(torch.int32).contiguous(), True, True


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      txt_mask: Optional[torch.Tensor] = None, *, n_img: int,
                      key_len: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                      lse: Optional[torch.Tensor] = None, config: Optional[Config] = None,
                      q_scale: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Joint attention forward. q, k, v: [B, L, H, D] (any strides); txt_mask [B, S] or None;
    ``key_len`` [B] int: row b attends to keys [0, key_len[b]) (computed from the mask when
    one is given; given alone it is the whole rule: the valid text keys are a prefix).
    Returns (out [B, L, H, D] contiguous, lse [B, H, L] float32 in log2 units).
    FP8 mode: q, k in float8_e4m3fn with q_scale, k_scale [B, H] float32 dequant scales; the
    output then takes v's dtype. ``out``/``lse`` may be given (tests pre-fill them with NaN)."""
    _check_inputs(q, k, v, txt_mask, n_img)
    B, L, H, D = q.shape
    qk_fp8 = q_scale is not None
    if qk_fp8 != (k_scale is not None):
        raise ValueError("q_scale and k_scale must be given together (FP8 mode) or not at all")
    out_dtype = v.dtype if qk_fp8 else q.dtype
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if out is None:
        out = torch.empty((B, L, H, D), device=q.device, dtype=out_dtype)
    if lse is None:
        lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    if not out.is_contiguous() or out.shape != q.shape or out.dtype != out_dtype:
        raise ValueError(f"out must be a contiguous {tuple(q.shape)} {out_dtype} tensor; got "
                         f"{tuple(out.shape)} {out.dtype} contiguous={out.is_contiguous()}")
    mask, klen, bounded, has_mask = _prepare_mask(txt_mask, n_img, key_len, q)
    cfg = config or pick_config("fwd", D, v.dtype, q.device)
    scales = (q_scale.float().contiguous(), k_scale.float().contiguous()) if qk_fp8 else (lse, lse)
    grid = (triton.cdiv(L, cfg.block_m), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, mask, klen, scales[0], scales[1], D ** -0.5, n_img, L, H,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        mask.stride(0) if has_mask else 0,
        HEAD_DIM=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BOUNDED=bounded, HAS_MASK=has_mask,
        QK_FP8=qk_fp8, DOT_PREC=_dot_precision(v.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, txt_mask: Optional[torch.Tensor] = None,
                       *, n_img: int, key_len: Optional[torch.Tensor] = None,
                       grads: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                       dkdv_config: Optional[Config] = None, dq_config: Optional[Config] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each [B, L, H, D] contiguous in q's dtype, from the forward's out and lse.
    ``grads`` may supply the three output buffers (tests pre-fill them with NaN)."""
    _check_inputs(q, k, v, txt_mask, n_img)
    B, L, H, D = q.shape
    q, k, v, do, out = (_last_dim_contiguous(t) for t in (q, k, v, do, out))
    if grads is None:
        grads = tuple(torch.empty((B, L, H, D), device=q.device, dtype=q.dtype) for _ in range(3))
    dq, dk, dv = grads
    for name, g in zip(("dq", "dk", "dv"), grads):
        if not g.is_contiguous() or g.shape != q.shape or g.dtype != q.dtype:
            raise ValueError(f"{name} must be a contiguous {tuple(q.shape)} {q.dtype} tensor; got "
                             f"{tuple(g.shape)} {g.dtype} contiguous={g.is_contiguous()}")
    mask, klen, bounded, has_mask = _prepare_mask(txt_mask, n_img, key_len, q)
    delta = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(L, 64), B * H)](
        out, do, delta, L, H, out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2), HEAD_DIM=D, BLOCK_M=64, num_warps=4)
    common = (D ** -0.5, n_img, L, H,
              q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
              dq.stride(0), dq.stride(1), dq.stride(2), mask.stride(0) if has_mask else 0)
    prec = _dot_precision(q.dtype)
    cfg = dkdv_config or pick_config("dkdv", D, q.dtype, q.device)
    _bwd_dkdv_kernel[(triton.cdiv(L, cfg.block_n), B * H)](
        q, k, v, do, dk, dv, lse, delta, mask, klen, *common, HEAD_DIM=D, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BOUNDED=bounded, HAS_MASK=has_mask, DOT_PREC=prec, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    cfg = dq_config or pick_config("dq", D, q.dtype, q.device)
    _bwd_dq_kernel[(triton.cdiv(L, cfg.block_m), B * H)](
        q, k, v, do, dq, lse, delta, mask, klen, *common, HEAD_DIM=D, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BOUNDED=bounded, HAS_MASK=has_mask, DOT_PREC=prec, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return dq, dk, dv


# ----------------------------------------------------------------------------- AOT checks

_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_compile(kind: str, head_dim: int, dtype: torch.dtype, arch: int, config: Config,
                has_mask: bool = True, qk_fp8: bool = False, bounded: Optional[bool] = None):
    """Compile one kernel ahead of time for sm_<arch> without a GPU (TRITON_INTERPRET unset).
    Pointers and strides are marked 16-divisible as the launcher sees them at Lens shapes.
    Returns (compiled kernel, dict(regs, spill_bytes, shared_bytes)) read off cuobjdump."""
    from triton.backends.compiler import GPUTarget

    from .aot import resource_usage
    fn = _KERNELS[kind]
    elem = _TRITON_DTYPES[dtype]
    ptr_types = {"LSE": "*fp32", "DELTA": "*fp32", "Q_SCALE": "*fp32", "K_SCALE": "*fp32",
                 "MASK": "*u8", "KEY_LEN": "*i32"}
    for name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"):
        ptr_types[name] = f"*{elem}"
    if qk_fp8:
        ptr_types.update(Q="*fp8e4nv", K="*fp8e4nv")
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
                  "BOUNDED": has_mask if bounded is None else bounded, "HAS_MASK": has_mask,
                  "DOT_PREC": _dot_precision(dtype)}
    if kind == "fwd":
        constexprs["QK_FP8"] = qk_fp8
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptr_types:
            signature[name] = ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "sm_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and name != "stride_mb":
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return compiled, resource_usage(compiled)
