"""``qk_norm_rope``: from both streams' fused QKV projections to the joint attention
inputs q, k, v [B, N + S, H, D] in one pass (per-head RMSNorm on q/k with each stream's
weights, 3-axis RoPE, v carried through), and its backward; top to bottom: the PyTorch
reference, the backends, the custom ops (fake + autograd), the public entry point.

Backends: ``cuda`` (csrc/qk_norm_rope.cu, forward only) -> ``triton``
(kernels/qk_norm_rope.py) -> ``torch`` (``qk_norm_rope_ref`` exactly; its backward is the
reference's autograd). The backward op ``lens_fast::qk_norm_rope_backward`` (triton ->
torch) needs only the forward's inputs, so it pairs with any forward backend. RoPE tables
are float32 ``[L, D/2, 2]`` holding (cos, sin) per interleaved pair
(``lens_fast.models.embeddings.rope_table``); the joint layout is ``[B, L, H, D]`` with L =
image tokens then text tokens.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import dispatch
from .kernel_utils import (KERNEL_DTYPES, aligned16, cuda_ext, cuda_ext_has, empty, next_pow2, no_alias,
                           one_float_dtype, rms_norm_out_dtype, row_major, sm_count, triton_kernels)
from .norm_modulate import rms_norm_ref

OP, BACKWARD_OP = "qk_norm_rope", "qk_norm_rope_backward"


# ----------------------------------------------------------------------------- reference

def apply_rope_ref(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x`` [B, L, H, D] by ``rope`` [L, D/2, 2] in float32."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = rope[..., 0].unsqueeze(1)  # [L, 1, D/2]
    sin = rope[..., 1].unsqueeze(1)
    re = xf[..., 0] * cos - xf[..., 1] * sin
    im = xf[..., 0] * sin + xf[..., 1] * cos
    return torch.stack([re, im], dim=-1).flatten(-2).to(x.dtype)


def qk_norm_rope_ref(img_qkv: Tensor, txt_qkv: Tensor, heads: int, norm_q: Tensor, norm_k: Tensor,
                     norm_added_q: Tensor, norm_added_k: Tensor, rope: Tensor,
                     eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    """From the fused QKV projections of both streams to the joint attention inputs.

    img_qkv [B, N, 3*H*D], txt_qkv [B, S, 3*H*D]; rope [N + S, D/2, 2] (image rows
    first). Returns q, k, v each [B, N + S, H, D]: per-head RMSNorm on q and k with the
    stream's own weights, RoPE on q and k of both streams, v carried through.
    """
    b, n, _ = img_qkv.shape
    s = txt_qkv.shape[1]
    d = img_qkv.shape[-1] // (3 * heads)
    iq, ik, iv = img_qkv.view(b, n, 3, heads, d).unbind(2)
    tq, tk, tv = txt_qkv.view(b, s, 3, heads, d).unbind(2)
    iq, ik = rms_norm_ref(iq, norm_q, eps), rms_norm_ref(ik, norm_k, eps)
    tq, tk = rms_norm_ref(tq, norm_added_q, eps), rms_norm_ref(tk, norm_added_k, eps)
    iq, ik = apply_rope_ref(iq, rope[:n]), apply_rope_ref(ik, rope[:n])
    if s > 0:
        tq, tk = apply_rope_ref(tq, rope[n:n + s]), apply_rope_ref(tk, rope[n:n + s])
    return torch.cat([iq, tq], 1), torch.cat([ik, tk], 1), torch.cat([iv, tv], 1)


def head_dim(img_qkv: Tensor, heads: int) -> int:
    return img_qkv.shape[-1] // (3 * heads)


def check_inputs(img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k, rope):
    """Shape checks with messages naming the bad value and what was expected."""
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads={heads!r}; expected a positive int")
    if img_qkv.dim() != 3 or txt_qkv.dim() != 3:
        raise ValueError(f"img_qkv and txt_qkv must be [B, tokens, 3*H*D]; got {tuple(img_qkv.shape)} and "
                         f"{tuple(txt_qkv.shape)}")
    width = img_qkv.shape[-1]
    if width % (3 * heads) or (width // (3 * heads)) % 2:
        raise ValueError(f"img_qkv last dim {width} must be 3 * heads ({heads}) * an even head_dim")
    if txt_qkv.shape[0] != img_qkv.shape[0] or txt_qkv.shape[-1] != width:
        raise ValueError(f"txt_qkv {tuple(txt_qkv.shape)} must be [B={img_qkv.shape[0]}, S, {width}] like img_qkv")
    d = width // (3 * heads)
    for name, w in (("norm_q", norm_q), ("norm_k", norm_k), ("norm_added_q", norm_added_q),
                    ("norm_added_k", norm_added_k)):
        if tuple(w.shape) != (d,):
            raise ValueError(f"{name} weight has shape {tuple(w.shape)}; expected [head_dim={d}]")
    rows = img_qkv.shape[1] + txt_qkv.shape[1]
    if tuple(rope.shape) != (rows, d // 2, 2) or rope.dtype != torch.float32:
        raise ValueError(f"rope is {rope.dtype} {tuple(rope.shape)}; expected float32 [N + S = {rows}, "
                         f"head_dim/2 = {d // 2}, 2] (cos, sin)")


# ----------------------------------------------------------------------------- backends

def _alloc_qkv(img_qkv, txt_qkv, heads):
    b, n, _ = img_qkv.shape
    d = head_dim(img_qkv, heads)
    shape = (b, n + txt_qkv.shape[1], heads, d)
    return tuple(empty(shape, img_qkv.dtype, img_qkv.device) for _ in range(3))


def _forward_torch(img_qkv, txt_qkv, heads, wq, wk, waq, wak, rope, eps):
    return tuple(t.contiguous() for t in qk_norm_rope_ref(img_qkv, txt_qkv, heads, wq, wk, waq, wak, rope, eps))


def _forward_triton(img_qkv, txt_qkv, heads, wq, wk, waq, wak, rope, eps):
    kern = triton_kernels("qk_norm_rope")
    img_qkv, txt_qkv = row_major(img_qkv), row_major(txt_qkv)
    wq, wk, waq, wak, rope = (t.contiguous() for t in (wq, wk, waq, wak, rope))
    b, n, _ = img_qkv.shape
    s = txt_qkv.shape[1]
    d = head_dim(img_qkv, heads)
    q, k, v = _alloc_qkv(img_qkv, txt_qkv, heads)
    bt = kern.block_t(not img_qkv.is_cuda)
    grid = (max(1, -(-(n + s) // bt)), heads, b)
    kern.qk_norm_rope_fwd_kernel[grid](
        img_qkv, txt_qkv, wq, wk, waq, wak, rope, q, k, v, n, s, heads, d,
        img_qkv.stride(0), img_qkv.stride(1), txt_qkv.stride(0), txt_qkv.stride(1), eps,
        BLOCK_T=bt, BLOCK_D=next_pow2(d), num_warps=kern.NUM_WARPS)
    return q, k, v


def _forward_cuda(img_qkv, txt_qkv, heads, wq, wk, waq, wak, rope, eps):
    q, k, v = _alloc_qkv(img_qkv, txt_qkv, heads)
    cuda_ext().qk_norm_rope_fwd(img_qkv, txt_qkv, wq, wk, waq, wak, rope.contiguous(), q, k, v, heads, float(eps))
    return q, k, v


def _kernel_accepts(device_type, dtype, **_info) -> bool:
    return dtype in KERNEL_DTYPES and dispatch.triton_accepts(device_type)


def _triton_fits(img_qkv, txt_qkv, heads=1, *weights) -> bool:
    return one_float_dtype(img_qkv, txt_qkv, *weights)


def cuda_head_dim_ok(d: int, elem: int) -> bool:
    """The CUDA kernel gives each head row to D / (16 / elem) threads of one warp."""
    lanes = d * elem // 16
    return d * elem % 16 == 0 and lanes <= 32 and lanes & (lanes - 1) == 0


def _cuda_fits(img_qkv, txt_qkv, heads=1, *weights) -> bool:
    return (one_float_dtype(img_qkv, txt_qkv, *weights) and cuda_head_dim_ok(head_dim(img_qkv, heads),
                                                                              img_qkv.element_size())
            and aligned16(img_qkv, txt_qkv, *weights))


_FORWARD = {"cuda": _forward_cuda, "triton": _forward_triton, "torch": _forward_torch}
dispatch.register(OP, "cuda", available=lambda: cuda_ext_has("qk_norm_rope_fwd"),
                  accepts=lambda device_type, dtype, **i: device_type == "cuda" and dtype in KERNEL_DTYPES,
                  fits=_cuda_fits)
dispatch.register(OP, "triton", available=lambda: dispatch.family_available("triton"), accepts=_kernel_accepts,
                  fits=_triton_fits)
dispatch.register(OP, "torch")


def _backward_triton(dq, dk, dv, img_qkv, txt_qkv, heads, wq, wk, waq, wak, rope, eps):
    kern = triton_kernels("qk_norm_rope")
    img_qkv, txt_qkv = row_major(img_qkv), row_major(txt_qkv)
    wq, wk, waq, wak, rope = (t.contiguous() for t in (wq, wk, waq, wak, rope))
    if not (dq.stride() == dk.stride() == dv.stride()) or dq.stride(-1) != 1:
        dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    b, n, width = img_qkv.shape
    s = txt_qkv.shape[1]
    d = head_dim(img_qkv, heads)
    block_d = next_pow2(d)
    d_img = empty((b, n, width), img_qkv.dtype, img_qkv.device)
    d_txt = empty((b, s, width), txt_qkv.dtype, txt_qkv.device)
    bt = kern.block_t(not img_qkv.is_cuda, backward=True)
    tiles = max(1, -(-(n + s) // bt))
    # About eight programs per SM; each walks per_prog tiles of one (head, sample).
    progs = max(1, min(tiles, -(-8 * sm_count(img_qkv.device) // (heads * b))))
    per_prog = -(-tiles // progs)
    grid = (-(-tiles // per_prog), heads, b)
    parts = empty((grid[0] * heads * b, 4, block_d), torch.float32, img_qkv.device)
    kern.qk_norm_rope_bwd_kernel[grid](
        dq, dk, dv, img_qkv, txt_qkv, wq, wk, waq, wak, rope, d_img, d_txt, parts, n, s, heads, d,
        img_qkv.stride(0), img_qkv.stride(1), txt_qkv.stride(0), txt_qkv.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2), per_prog, eps,
        BLOCK_T=bt, BLOCK_D=block_d, num_warps=kern.NUM_WARPS)
    return (d_img, d_txt) + tuple(parts[:, i, :d].sum(0).to(w.dtype) for i, w in enumerate((wq, wk, waq, wak)))


def _backward_torch(dq, dk, dv, img_qkv, txt_qkv, heads, wq, wk, waq, wak, rope, eps):
    """The reference's autograd (``torch.func.vjp`` works inside a custom op)."""
    _, vjp = torch.func.vjp(lambda i, t, *w: qk_norm_rope_ref(i, t, heads, *w, rope, eps),
                            img_qkv, txt_qkv, wq, wk, waq, wak)
    return vjp((dq, dk, dv))


def _backward_fits(dq, dk, dv, img_qkv, txt_qkv, heads=1, *weights) -> bool:
    return one_float_dtype(dq, dk, dv, img_qkv, txt_qkv, *weights)


_BACKWARD = {"triton": _backward_triton, "torch": _backward_torch}
dispatch.register(BACKWARD_OP, "triton", available=lambda: dispatch.family_available("triton"),
                  accepts=_kernel_accepts, fits=_backward_fits)
dispatch.register(BACKWARD_OP, "torch")


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("lens_fast::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(img_qkv: Tensor, txt_qkv: Tensor, heads: int, norm_q: Tensor, norm_k: Tensor,
                    norm_added_q: Tensor, norm_added_k: Tensor, rope: Tensor, eps: float,
                    backend: str = "") -> Tuple[Tensor, Tensor, Tensor]:
    """``backend``: the entry point's decision, or "" (under torch.compile) to decide here."""
    name = backend or dispatch.select(OP, img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k)
    return _FORWARD[name](img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k, rope, eps)


@qk_norm_rope_op.register_fake
def _(img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k, rope, eps, backend=""):
    b, n, _ = img_qkv.shape
    shape = (b, n + txt_qkv.shape[1], heads, head_dim(img_qkv, heads))
    qd = torch.promote_types(rms_norm_out_dtype(img_qkv.dtype, norm_q.dtype),
                             rms_norm_out_dtype(txt_qkv.dtype, norm_added_q.dtype))
    kd = torch.promote_types(rms_norm_out_dtype(img_qkv.dtype, norm_k.dtype),
                             rms_norm_out_dtype(txt_qkv.dtype, norm_added_k.dtype))
    vd = torch.promote_types(img_qkv.dtype, txt_qkv.dtype)
    return tuple(img_qkv.new_empty(shape, dtype=dt) for dt in (qd, kd, vd))


@torch.library.custom_op("lens_fast::qk_norm_rope_backward", mutates_args=())
def qk_norm_rope_backward(dq: Tensor, dk: Tensor, dv: Tensor, img_qkv: Tensor, txt_qkv: Tensor, heads: int,
                          norm_q: Tensor, norm_k: Tensor, norm_added_q: Tensor, norm_added_k: Tensor,
                          rope: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d_img_qkv, d_txt_qkv, d_norm_q, d_norm_k, d_norm_added_q, d_norm_added_k)."""
    weights = (norm_q, norm_k, norm_added_q, norm_added_k)
    name = dispatch.select(BACKWARD_OP, dq, dk, dv, img_qkv, txt_qkv, heads, *weights)
    grads = _BACKWARD[name](dq, dk, dv, img_qkv, txt_qkv, heads, *weights, rope, eps)
    return no_alias(tuple(g.contiguous() for g in grads), (dq, dk, dv, img_qkv, txt_qkv, *weights))


@qk_norm_rope_backward.register_fake
def _(dq, dk, dv, img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k, rope, eps):
    return (img_qkv.new_empty(img_qkv.shape), txt_qkv.new_empty(txt_qkv.shape),
            *(w.new_empty(w.shape) for w in (norm_q, norm_k, norm_added_q, norm_added_k)))


def _setup(ctx, inputs, output):
    img_qkv, txt_qkv, heads, wq, wk, waq, wak, rope, eps, _ = inputs
    ctx.heads, ctx.eps = heads, eps
    ctx.save_for_backward(img_qkv, txt_qkv, wq, wk, waq, wak, rope)


def _backward(ctx, dq, dk, dv):
    img_qkv, txt_qkv, wq, wk, waq, wak, rope = ctx.saved_tensors
    d_img, d_txt, dwq, dwk, dwaq, dwak = qk_norm_rope_backward(dq, dk, dv, img_qkv, txt_qkv, ctx.heads,
                                                               wq, wk, waq, wak, rope, ctx.eps)
    return d_img, d_txt, None, dwq, dwk, dwaq, dwak, None, None, None


qk_norm_rope_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- entry point

def qk_norm_rope(img_qkv: Tensor, txt_qkv: Tensor, heads: int, norm_q: Tensor, norm_k: Tensor,
                 norm_added_q: Tensor, norm_added_k: Tensor, rope: Tensor,
                 eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    """Both streams' fused QKV projections -> joint q, k, v [B, N + S, H, D] (image rows
    first) with per-head RMSNorm on q/k and RoPE on both streams. The reference directly
    when the backend is torch (eager), else the custom op (``dispatch.entry_backend``)."""
    check_inputs(img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k, rope)
    backend = dispatch.entry_backend(OP, img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k)
    if backend == "torch":
        return qk_norm_rope_ref(img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k, rope, eps)
    return qk_norm_rope_op(img_qkv, txt_qkv, heads, norm_q, norm_k, norm_added_q, norm_added_k, rope, float(eps),
                           backend)
