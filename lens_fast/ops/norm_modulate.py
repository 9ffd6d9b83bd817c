"""The adaLN chain of the Lens block: ``rms_norm``, ``rms_norm_modulate``,
``gated_residual_rms_norm_modulate``, ``layer_norm_modulate``, top to bottom: the PyTorch
references, the backends, the custom ops (fake + autograd), the public entry points.

Each op is one ``torch.library.custom_op`` (``lens_fast::<name>``) with a fake (meta)
implementation and an autograd formula, so ``torch.compile(fullgraph=True)`` traces
through it; the op body picks its backend at run time with ``dispatch.select``:
``cuda`` (csrc/norm_modulate.cu, forward only) -> ``triton`` (kernels/norm_modulate.py)
-> ``torch`` (the references, exactly). Every forward backend also returns the float32
per-row statistics (rstd, and mean for LayerNorm), so one shared backward op
(``lens_fast::norm_modulate_backward``: triton -> torch) serves all of them whichever
backend ran the forward. The torch backward differentiates the reference with autograd
(``torch.func.vjp``, which works inside a custom op). An eager call whose backend is
``torch`` (forced, or auto on CPU tensors) runs the reference directly, with plain
autograd and no custom-op overhead.

References: norm statistics in float32 whatever the input dtype (as the reference);
RMSNorm follows diffusers (normalise in float32; with a half/bf16 weight the result is
cast to the weight dtype before the weight multiply).

NOTE (measured on the 2-core CI CPU, torch 2.13, tiny tensors, 2026-12-06;
``bench/dispatch_cost.py``, ``bench/results/dispatch_cpu2_2026-12-06``): the cached backend
decision costs 1.5 us (3.2 us where kernel backends are candidates); rms_norm_modulate
forward: reference 24 us, the eager entry point (CPU: the reference path) 30 us, the custom
op with the torch backend inside 55-57 us (``torch.library`` wrapper and statistics, which
a kernel backend pays on the host too; only compiled graphs take it on the CPU).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .kernel_utils import (KERNEL_DTYPES, aligned16, cuda_ext, cuda_ext_has, empty, next_pow2, no_alias,
                           one_float_dtype, rms_norm_out_dtype, row_major, sm_count, triton_kernels)


# ----------------------------------------------------------------------------- references

def rms_norm_ref(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    input_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight is None:
        return y.to(input_dtype)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return y * weight


def modulate_ref(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` with per-sample [B, C] shift/scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def rms_norm_modulate_ref(x, weight, shift, scale, eps: float):
    return modulate_ref(rms_norm_ref(x, weight, eps), shift, scale)


def gated_residual_rms_norm_modulate_ref(x, y, gate, weight, shift, scale, eps: float):
    """``x' = x + gate * y`` then ``(x', modulate(rmsnorm(x')))``: one sub-layer's exit
    fused with the next sub-layer's entry."""
    x = x + gate.unsqueeze(1) * y
    return x, rms_norm_modulate_ref(x, weight, shift, scale, eps)


def layer_norm_modulate_ref(x, shift, scale, eps: float):
    """Output head: LayerNorm without affine, then ``x * (1 + scale) + shift``."""
    return modulate_ref(F.layer_norm(x, (x.shape[-1],), None, None, eps), shift, scale)


FORWARD_OPS = ("rms_norm", "rms_norm_modulate", "gated_residual_rms_norm_modulate", "layer_norm_modulate")
BACKWARD_OP = "norm_modulate_backward"
CUDA_MAX_ROW_BYTES = 8 * 256 * 16  # the CUDA kernel keeps a row in registers: 8 x 16 B x 256 threads


# ----------------------------------------------------------------------------- statistics

def _stats_torch(xn: Tensor, eps: float, layer: bool) -> Tuple[Optional[Tensor], Tensor]:
    xf = xn.float()
    if layer:
        mean = xf.mean(-1)
        return mean, torch.rsqrt((xf - mean.unsqueeze(-1)).pow(2).mean(-1) + eps)
    return None, torch.rsqrt(xf.pow(2).mean(-1) + eps)


# ----------------------------------------------------------------------------- forward backends
# Common internal signature: x [B, L, C]; y [B, L, C] / gate [B, C] (residual) or None;
# weight [C] or None; shift/scale [B, C] or None. Returns (res_out|None, out, mean|None, rstd).

def _forward_torch(x, y, gate, weight, shift, scale, eps, layer):
    if layer:
        out = layer_norm_modulate_ref(x, shift, scale, eps)
        res = None
    elif y is not None:
        res, out = gated_residual_rms_norm_modulate_ref(x, y, gate, weight, shift, scale, eps)
    elif shift is not None:
        res, out = None, rms_norm_modulate_ref(x, weight, shift, scale, eps)
    else:
        res, out = None, rms_norm_ref(x, weight, eps)
    mean, rstd = _stats_torch(res if res is not None else x, eps, layer)
    return (None if res is None else res.contiguous()), out.contiguous(), mean, rstd


def out_dtype(x, y, gate, weight, shift, scale, layer) -> Tuple[torch.dtype, torch.dtype]:
    """(stream dtype, output dtype) that the reference produces (type promotion)."""
    stream = x.dtype if y is None else torch.promote_types(x.dtype, torch.promote_types(y.dtype, gate.dtype))
    out = stream if layer else rms_norm_out_dtype(stream, weight.dtype if weight is not None else None)
    if shift is not None:
        out = torch.promote_types(out, torch.promote_types(shift.dtype, scale.dtype))
    return stream, out


def _alloc_outputs(x, y, layer):
    b, l, c = x.shape
    res = empty((b, l, c), x.dtype, x.device) if y is not None else None
    out = empty((b, l, c), x.dtype, x.device)
    mean = empty((b, l), torch.float32, x.device) if layer else None
    rstd = empty((b, l), torch.float32, x.device)
    return res, out, mean, rstd


def fwd_config(c: int, interpreted: bool) -> Tuple[int, int, int]:
    """(BLOCK_C, ROWS, num_warps) of the Triton forward for row width ``c``."""
    block_c = next_pow2(c)
    rows = max(1, (16384 if interpreted else 4096) // block_c)
    tile = rows * block_c
    return block_c, min(rows, 64), 8 if tile >= 4096 else 4


def _forward_triton(x, y, gate, weight, shift, scale, eps, layer):
    k = triton_kernels("norm_modulate")
    x, y, gate, weight, shift, scale = (row_major(t) if t is not None else None
                                        for t in (x, y, gate, weight, shift, scale))
    b, l, c = x.shape
    res, out, mean, rstd = _alloc_outputs(x, y, layer)
    block_c, rows, warps = fwd_config(c, not x.is_cuda)
    grid = (max(1, -(-l // rows)), b)
    k.norm_modulate_fwd_kernel[grid](
        x, y if y is not None else x, gate if gate is not None else x, weight if weight is not None else x,
        shift if shift is not None else x, scale if scale is not None else x,
        res if res is not None else out, out, mean if mean is not None else rstd, rstd,
        l, c, x.stride(0), x.stride(1), y.stride(0) if y is not None else 0, y.stride(1) if y is not None else 0,
        gate.stride(0) if gate is not None else 0, shift.stride(0) if shift is not None else 0,
        scale.stride(0) if scale is not None else 0, eps,
        BLOCK_C=block_c, ROWS=rows, HAS_RESIDUAL=y is not None, HAS_WEIGHT=weight is not None,
        HAS_MOD=shift is not None, LAYER=layer, num_warps=warps)
    return res, out, mean, rstd


def _forward_cuda(x, y, gate, weight, shift, scale, eps, layer):
    res, out, mean, rstd = _alloc_outputs(x, y, layer)
    cuda_ext().norm_modulate_fwd(x, y, gate, weight, shift, scale, res, out, mean, rstd, float(eps), bool(layer))
    return res, out, mean, rstd


def _kernel_dtype(device_type, dtype, **_info) -> bool:
    return dtype in KERNEL_DTYPES


def _triton_accepts(device_type, dtype, **info) -> bool:
    return dispatch.triton_accepts(device_type) and _kernel_dtype(device_type, dtype)


def _triton_fits(x, y=None, gate=None, weight=None, shift=None, scale=None) -> bool:
    return x.dim() == 3 and one_float_dtype(x, y, gate, weight, shift, scale)


def _cuda_fits(x, y=None, gate=None, weight=None, shift=None, scale=None) -> bool:
    return (_triton_fits(x, y, gate, weight, shift, scale) and x.shape[-1] * x.element_size() <= CUDA_MAX_ROW_BYTES
            and aligned16(x, y, gate, weight, shift, scale))


_FORWARD = {"cuda": _forward_cuda, "triton": _forward_triton, "torch": _forward_torch}
for _op in FORWARD_OPS:
    dispatch.register(_op, "cuda", available=lambda: cuda_ext_has("norm_modulate_fwd"),
                      accepts=lambda device_type, dtype, **i: device_type == "cuda" and dtype in KERNEL_DTYPES,
                      fits=_cuda_fits)
    dispatch.register(_op, "triton", available=lambda: dispatch.family_available("triton"),
                      accepts=_triton_accepts, fits=_triton_fits)
    dispatch.register(_op, "torch")


def _forward(op, x, y, gate, weight, shift, scale, eps, layer, backend):
    """``backend``: the entry point's decision, or "" (under torch.compile) to decide here."""
    name = backend or dispatch.select(op, x, y, gate, weight, shift, scale)
    return _FORWARD[name](x, y, gate, weight, shift, scale, eps, layer)


# ----------------------------------------------------------------------------- backward backends

def bwd_config(c: int, interpreted: bool) -> Tuple[int, int, int]:
    """(BLOCK_C, ROWS, num_warps) of the Triton backward: rows of ``c`` columns, ROWS rows
    per loop step (one at Lens widths on a GPU)."""
    block_c = next_pow2(c)
    rows = min(64, max(1, 16384 // block_c)) if interpreted else (max(1, 2048 // block_c) if c <= 1024 else 1)
    tile = block_c * rows
    # 16 warps at Lens widths: 4-8 values per thread keep the four float32 accumulators
    # and the row in registers (sm_90, dim 1536: 112 registers vs 173 at 8 warps).
    return block_c, rows, 16 if tile >= 2048 else (8 if tile >= 1024 else 4)


def bwd_programs(l: int, b: int, rows: int, device: torch.device) -> Tuple[int, int]:
    """(rows per program, programs per sample): about two programs per SM in all, each
    owning a contiguous run of rows (a multiple of ROWS) of one sample."""
    target = max(1, -(-2 * sm_count(device) // b))
    per_prog = -(-max(l, 1) // target)
    per_prog = -(-per_prog // rows) * rows
    return per_prog, max(1, -(-l // per_prog))


def _backward_triton(dout, dres, xn, y, gate, weight, shift, scale, mean, rstd, eps, layer):
    k = triton_kernels("norm_modulate")
    xn, y, gate, weight, scale = (row_major(t) if t is not None else None for t in (xn, y, gate, weight, scale))
    dout = dout.contiguous()
    dres = dres.contiguous() if dres is not None else None
    b, l, c = xn.shape
    block_c, rows, warps = bwd_config(c, not xn.is_cuda)
    per_prog, progs = bwd_programs(l, b, rows, xn.device)
    dx = empty((b, l, c), xn.dtype, xn.device)
    dy = empty((b, l, c), xn.dtype, xn.device) if y is not None else None
    parts = empty((4, b, progs, c), torch.float32, xn.device)
    dummy = xn
    k.norm_modulate_bwd_kernel[(progs, b)](
        dout, dres if dres is not None else dummy, xn, y if y is not None else dummy,
        gate if gate is not None else dummy, weight if weight is not None else dummy,
        scale if scale is not None else dummy, mean if mean is not None else rstd, rstd, dx,
        dy if dy is not None else dx, parts[0], parts[1], parts[2], parts[3],
        l, c, per_prog, xn.stride(0), xn.stride(1), y.stride(0) if y is not None else 0,
        y.stride(1) if y is not None else 0, gate.stride(0) if gate is not None else 0,
        scale.stride(0) if scale is not None else 0,
        BLOCK_C=block_c, ROWS=rows, HAS_DRES=dres is not None, HAS_RESIDUAL=y is not None,
        HAS_WEIGHT=weight is not None, HAS_MOD=shift is not None, LAYER=layer, num_warps=warps)
    dw = parts[0].sum((0, 1)).to(weight.dtype) if weight is not None else None
    dshift = parts[1].sum(1).to(shift.dtype) if shift is not None else None
    dscale = parts[2].sum(1).to(scale.dtype) if scale is not None else None
    dgate = parts[3].sum(1).to(gate.dtype) if gate is not None else None
    return dx, dy, dgate, dw, dshift, dscale


def _backward_torch(dout, dres, xn, y, gate, weight, shift, scale, mean, rstd, eps, layer):
    """The references' autograd (``torch.func.vjp``: it works inside a custom op, where
    autograd dispatch is switched off). For the gated residual, ``xn`` is the residual
    output x' = x + gate*y: differentiating the norm at x' and then ``gate * y`` is exactly
    the reference's graph (the add passes the gradient through unchanged)."""
    present = [t for t in (weight, shift, scale) if t is not None]

    def norm(x_, *params):
        it = iter(params)
        w_ = next(it) if weight is not None else None
        sh_, sc_ = (next(it), next(it)) if shift is not None else (None, None)
        if layer:
            return layer_norm_modulate_ref(x_, sh_, sc_, eps)
        if sh_ is not None:
            return rms_norm_modulate_ref(x_, w_, sh_, sc_, eps)
        return rms_norm_ref(x_, w_, eps)

    _, vjp = torch.func.vjp(norm, xn, *present)
    dx, *dparams = vjp(dout)
    if dres is not None:
        dx = dx + dres
    dy = dgate = None
    if y is not None:
        _, vjp_res = torch.func.vjp(lambda y_, g_: g_.unsqueeze(1) * y_, y, gate)
        dy, dgate = vjp_res(dx)
    it = iter(dparams)
    dw = next(it) if weight is not None else None
    dshift, dscale = (next(it), next(it)) if shift is not None else (None, None)
    return dx, dy, dgate, dw, dshift, dscale


def _backward_fits(dout, xn, *rest) -> bool:
    return xn.dim() == 3 and one_float_dtype(dout, xn, *rest)


dispatch.register(BACKWARD_OP, "triton", available=lambda: dispatch.family_available("triton"),
                  accepts=_triton_accepts, fits=_backward_fits)
dispatch.register(BACKWARD_OP, "torch")
_BACKWARD = {"triton": _backward_triton, "torch": _backward_torch}


@torch.library.custom_op("lens_fast::norm_modulate_backward", mutates_args=())
def norm_modulate_backward(dout: Tensor, dres: Optional[Tensor], xn: Tensor, y: Optional[Tensor],
                           gate: Optional[Tensor], weight: Optional[Tensor], shift: Optional[Tensor],
                           scale: Optional[Tensor], mean: Optional[Tensor], rstd: Tensor, eps: float,
                           layer: bool) -> List[Tensor]:
    """Gradients (dx, dy, dgate, dweight, dshift, dscale); absent ones are empty [0]."""
    name = dispatch.select(BACKWARD_OP, dout, xn, y, gate, weight, shift, scale)
    grads = _BACKWARD[name](dout, dres, xn, y, gate, weight, shift, scale, mean, rstd, eps, layer)
    grads = [g.contiguous() if g is not None else xn.new_empty(0) for g in grads]
    return list(no_alias(grads, (dout, dres, xn, y, gate, weight, shift, scale)))


@norm_modulate_backward.register_fake
def _(dout, dres, xn, y, gate, weight, shift, scale, mean, rstd, eps, layer):
    like = lambda t, shape: xn.new_empty(shape, dtype=t.dtype) if t is not None else xn.new_empty(0)  # noqa: E731
    return [xn.new_empty(xn.shape), like(y, xn.shape), like(gate, xn.shape[::2]),
            like(weight, xn.shape[-1:]), like(shift, xn.shape[::2]), like(scale, xn.shape[::2])]


def _grads(ctx, dout, dres, xn, y, gate, weight, shift, scale, mean, rstd):
    gs = norm_modulate_backward(dout, dres, xn, y, gate, weight, shift, scale, mean, rstd, ctx.eps, ctx.layer)
    return [g if present is not None else None for g, present in zip(gs, (xn, y, gate, weight, shift, scale))]


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("lens_fast::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Optional[Tensor], eps: float, backend: str = "") -> Tuple[Tensor, Tensor]:
    """RMSNorm over the last dim of any [..., C] tensor; returns (y, rstd float32 [...])."""
    x3 = x.reshape(1, -1, x.shape[-1])
    _, out, _, rstd = _forward("rms_norm", x3, None, None, weight, None, None, eps, False, backend)
    return out.view(x.shape), rstd.view(x.shape[:-1])


@rms_norm_op.register_fake
def _(x, weight, eps, backend=""):
    _, dtype = out_dtype(x, None, None, weight, None, None, False)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _rms_setup(ctx, inputs, output):
    x, weight, eps, _ = inputs
    ctx.eps, ctx.layer = eps, False
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _rms_backward(ctx, dout, _drstd):
    x, weight, rstd = ctx.saved_tensors
    c = x.shape[-1]
    dx, _, _, dw, _, _ = _grads(ctx, dout.reshape(1, -1, c), None, x.reshape(1, -1, c), None, None, weight,
                                None, None, None, rstd.reshape(1, -1))
    return dx.view(x.shape), dw, None, None


rms_norm_op.register_autograd(_rms_backward, setup_context=_rms_setup)


@torch.library.custom_op("lens_fast::rms_norm_modulate", mutates_args=())
def rms_norm_modulate_op(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float,
                         backend: str = "") -> Tuple[Tensor, Tensor]:
    _, out, _, rstd = _forward("rms_norm_modulate", x, None, None, weight, shift, scale, eps, False, backend)
    return out, rstd


@rms_norm_modulate_op.register_fake
def _(x, weight, shift, scale, eps, backend=""):
    _, dtype = out_dtype(x, None, None, weight, shift, scale, False)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _rmm_setup(ctx, inputs, output):
    x, weight, shift, scale, eps, _ = inputs
    ctx.eps, ctx.layer = eps, False
    ctx.save_for_backward(x, weight, shift, scale, output[1])
    ctx.mark_non_differentiable(output[1])


def _rmm_backward(ctx, dout, _drstd):
    x, weight, shift, scale, rstd = ctx.saved_tensors
    dx, _, _, dw, dshift, dscale = _grads(ctx, dout, None, x, None, None, weight, shift, scale, None, rstd)
    return dx, dw, dshift, dscale, None, None


rms_norm_modulate_op.register_autograd(_rmm_backward, setup_context=_rmm_setup)


@torch.library.custom_op("lens_fast::gated_residual_rms_norm_modulate", mutates_args=())
def gated_residual_rms_norm_modulate_op(x: Tensor, y: Tensor, gate: Tensor, weight: Tensor, shift: Tensor,
                                        scale: Tensor, eps: float, backend: str = "") -> Tuple[Tensor, Tensor, Tensor]:
    res, out, _, rstd = _forward("gated_residual_rms_norm_modulate", x, y, gate, weight, shift, scale, eps, False,
                                 backend)
    return res, out, rstd


@gated_residual_rms_norm_modulate_op.register_fake
def _(x, y, gate, weight, shift, scale, eps, backend=""):
    stream, dtype = out_dtype(x, y, gate, weight, shift, scale, False)
    return (x.new_empty(x.shape, dtype=stream), x.new_empty(x.shape, dtype=dtype),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


def _grm_setup(ctx, inputs, output):
    x, y, gate, weight, shift, scale, eps, _ = inputs
    ctx.eps, ctx.layer = eps, False
    ctx.save_for_backward(output[0], y, gate, weight, shift, scale, output[2])
    ctx.mark_non_differentiable(output[2])


def _grm_backward(ctx, dres, dout, _drstd):
    res, y, gate, weight, shift, scale, rstd = ctx.saved_tensors
    dx, dy, dgate, dw, dshift, dscale = _grads(ctx, dout, dres, res, y, gate, weight, shift, scale, None, rstd)
    return dx, dy, dgate, dw, dshift, dscale, None, None


gated_residual_rms_norm_modulate_op.register_autograd(_grm_backward, setup_context=_grm_setup)


@torch.library.custom_op("lens_fast::layer_norm_modulate", mutates_args=())
def layer_norm_modulate_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float,
                           backend: str = "") -> Tuple[Tensor, Tensor, Tensor]:
    _, out, mean, rstd = _forward("layer_norm_modulate", x, None, None, None, shift, scale, eps, True, backend)
    return out, mean, rstd


@layer_norm_modulate_op.register_fake
def _(x, shift, scale, eps, backend=""):
    _, dtype = out_dtype(x, None, None, None, shift, scale, True)
    stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=dtype), stat, stat.new_empty(stat.shape)


def _lnm_setup(ctx, inputs, output):
    x, shift, scale, eps, _ = inputs
    ctx.eps, ctx.layer = eps, True
    ctx.save_for_backward(x, shift, scale, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _lnm_backward(ctx, dout, _dmean, _drstd):
    x, shift, scale, mean, rstd = ctx.saved_tensors
    dx, _, _, _, dshift, dscale = _grads(ctx, dout, None, x, None, None, None, shift, scale, mean, rstd)
    return dx, dshift, dscale, None, None


layer_norm_modulate_op.register_autograd(_lnm_backward, setup_context=_lnm_setup)


# ----------------------------------------------------------------------------- entry points
# What the model calls. Each checks its inputs and decides the backend once: the reference
# directly when it is torch (eager: plain autograd, no custom-op overhead), else the custom
# op with the decision passed in (which is also what torch.compile sees, with no graph
# break; there the op's body decides at run time).

def check_modulation(x: Tensor, **vectors: Optional[Tensor]) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, C]; got shape {tuple(x.shape)}")
    b, _, c = x.shape
    for name, v in vectors.items():
        if tuple(v.shape) != (b, c):
            raise ValueError(f"{name} has shape {tuple(v.shape)}; expected per-sample [B={b}, C={c}]")


def _check_weight(x: Tensor, weight: Optional[Tensor]) -> None:
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected [C={x.shape[-1]}]")


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """RMSNorm over the last dim (float32 statistics), times ``weight`` when given."""
    _check_weight(x, weight)
    backend = dispatch.entry_backend("rms_norm", x.reshape(1, -1, x.shape[-1]), None, None, weight)
    if backend == "torch":
        return rms_norm_ref(x, weight, eps)
    return rms_norm_op(x, weight, float(eps), backend)[0]


def rms_norm_modulate(x: Tensor, weight: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """``rmsnorm(x) * weight * (1 + scale) + shift`` with per-sample [B, C] shift/scale."""
    check_modulation(x, shift=shift, scale=scale)
    _check_weight(x, weight)
    backend = dispatch.entry_backend("rms_norm_modulate", x, None, None, weight, shift, scale)
    if backend == "torch":
        return rms_norm_modulate_ref(x, weight, shift, scale, eps)
    return rms_norm_modulate_op(x, weight, shift, scale, float(eps), backend)[0]


def gated_residual_rms_norm_modulate(x: Tensor, y: Tensor, gate: Tensor, weight: Tensor, shift: Tensor,
                                     scale: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """``x' = x + gate * y``; returns ``(x', rms_norm_modulate(x'))``."""
    check_modulation(x, gate=gate, shift=shift, scale=scale)
    _check_weight(x, weight)
    if y.shape != x.shape:
        raise ValueError(f"y has shape {tuple(y.shape)}; expected x's shape {tuple(x.shape)}")
    backend = dispatch.entry_backend("gated_residual_rms_norm_modulate", x, y, gate, weight, shift, scale)
    if backend == "torch":
        return gated_residual_rms_norm_modulate_ref(x, y, gate, weight, shift, scale, eps)
    res, out, _ = gated_residual_rms_norm_modulate_op(x, y, gate, weight, shift, scale, float(eps), backend)
    return res, out


def layer_norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine (float32 statistics), then ``* (1 + scale) + shift``."""
    check_modulation(x, shift=shift, scale=scale)
    backend = dispatch.entry_backend("layer_norm_modulate", x, None, None, None, shift, scale)
    if backend == "torch":
        return layer_norm_modulate_ref(x, shift, scale, eps)
    return layer_norm_modulate_op(x, shift, scale, float(eps), backend)[0]
