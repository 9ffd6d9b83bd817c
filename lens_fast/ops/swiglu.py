"""SwiGLU's activation, top to bottom: the PyTorch reference, the backends, the custom ops
(fake + autograd), the public entry points.

- ``lens_fast::silu_mul(a, b)``: ``silu(a) * b`` for separate w1 / w3 GEMM outputs (the
  training layout, where FSDP2 shards w1 and w3 as they are).
- ``lens_fast::swiglu(h)``: the same on the two halves of one fused [.., 2F] w1|w3 GEMM
  output (the inference layout after ``fuse_projections``); its backward returns one
  [.., 2F] gradient, which is what the fused GEMM's backward consumes, with no cat.
Backends: ``triton`` (kernels/swiglu.py) -> ``torch`` (``silu_mul_ref``, exactly). A
CUDA C++ version would not beat Triton on a purely elementwise op, so there is none.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .kernel_utils import KERNEL_DTYPES, empty, no_alias, one_float_dtype, triton_kernels

OPS = ("silu_mul", "swiglu")
BACKWARD_OPS = ("silu_mul_backward", "swiglu_backward")


def silu_mul_ref(a: Tensor, b: Tensor) -> Tensor:
    """SwiGLU's activation: ``silu(a) * b`` (a = w1 x, b = w3 x)."""
    return F.silu(a) * b


def _rows(t: Tensor) -> Tensor:
    """[R, F] view (copy only if the layout cannot be viewed so) with a unit last stride."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def _launch(kernel_name: str, a2: Tensor, *tensors: Tensor) -> None:
    """Launch a [rows, F] elementwise kernel over ``a2``'s shape; the kernel takes
    ``tensors`` (a2 among them), then rows, F, then each tensor's row stride."""
    kern = triton_kernels("swiglu")
    rows, f = a2.shape
    if rows == 0 or f == 0:
        return
    tile_rows, block_f, warps = kern.config(f, not a2.is_cuda)
    grid = (-(-rows // tile_rows), -(-f // block_f))
    getattr(kern, kernel_name)[grid](*tensors, rows, f, *(t.stride(0) for t in tensors),
                                     ROWS=tile_rows, BLOCK_F=block_f, num_warps=warps)


def _launch_fwd(a2: Tensor, b2: Tensor, out2: Tensor) -> None:
    _launch("silu_mul_fwd_kernel", a2, a2, b2, out2)


def _launch_bwd(g2: Tensor, a2: Tensor, b2: Tensor, da2: Tensor, db2: Tensor) -> None:
    _launch("silu_mul_bwd_kernel", a2, g2, a2, b2, da2, db2)


for _op in OPS + BACKWARD_OPS:
    dispatch.register(_op, "triton", available=lambda: dispatch.family_available("triton"),
                      accepts=lambda device_type, dtype, **i: dtype in KERNEL_DTYPES and
                      dispatch.triton_accepts(device_type), fits=one_float_dtype)
    dispatch.register(_op, "torch")


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"silu_mul needs a and b of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_fused(h: Tensor) -> None:
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"swiglu needs [.., 2F] (w1 x | w3 x); got last dim {h.shape[-1] if h.dim() else None}, "
                         "expected an even size")


# ----------------------------------------------------------------------------- silu_mul

@torch.library.custom_op("lens_fast::silu_mul", mutates_args=())
def silu_mul_op(a: Tensor, b: Tensor, backend: str = "") -> Tensor:
    """``backend``: the entry point's decision, or "" (under torch.compile) to decide here."""
    if (backend or dispatch.select("silu_mul", a, b)) == "torch":
        return silu_mul_ref(a, b).contiguous()
    out = empty(a.shape, a.dtype, a.device)
    _launch_fwd(_rows(a), _rows(b), out.view(-1, a.shape[-1]))
    return out


@silu_mul_op.register_fake
def _(a, b, backend=""):
    return a.new_empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype))


@torch.library.custom_op("lens_fast::silu_mul_backward", mutates_args=())
def silu_mul_backward(grad: Tensor, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    if dispatch.select("silu_mul_backward", grad, a, b) == "torch":
        _, vjp = torch.func.vjp(silu_mul_ref, a, b)  # the reference's autograd
        da, db = vjp(grad)
        return no_alias((da.contiguous(), db.contiguous()), (grad, a, b))
    da = empty(a.shape, a.dtype, a.device)
    db = empty(b.shape, b.dtype, b.device)
    f = a.shape[-1]
    _launch_bwd(_rows(grad), _rows(a), _rows(b), da.view(-1, f), db.view(-1, f))
    return da, db


@silu_mul_backward.register_fake
def _(grad, a, b):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _silu_mul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])


def _silu_mul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    return (*silu_mul_backward(grad, a, b), None)


silu_mul_op.register_autograd(_silu_mul_backward, setup_context=_silu_mul_setup)


# ----------------------------------------------------------------------------- swiglu

@torch.library.custom_op("lens_fast::swiglu", mutates_args=())
def swiglu_op(h: Tensor, backend: str = "") -> Tensor:
    f = h.shape[-1] // 2
    if (backend or dispatch.select("swiglu", h)) == "torch":
        return silu_mul_ref(*h.chunk(2, dim=-1)).contiguous()
    out = empty((*h.shape[:-1], f), h.dtype, h.device)
    h2 = _rows(h)
    _launch_fwd(h2[:, :f], h2[:, f:], out.view(-1, f))
    return out


@swiglu_op.register_fake
def _(h, backend=""):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.custom_op("lens_fast::swiglu_backward", mutates_args=())
def swiglu_backward(grad: Tensor, h: Tensor) -> Tensor:
    f = h.shape[-1] // 2
    if dispatch.select("swiglu_backward", grad, h) == "torch":
        _, vjp = torch.func.vjp(lambda h_: silu_mul_ref(*h_.chunk(2, dim=-1)), h)
        (dh,) = vjp(grad)
        return no_alias((dh.contiguous(),), (grad, h))[0]
    dh = empty(h.shape, h.dtype, h.device)
    h2, dh2 = _rows(h), dh.view(-1, 2 * f)
    _launch_bwd(_rows(grad), h2[:, :f], h2[:, f:], dh2[:, :f], dh2[:, f:])
    return dh


@swiglu_backward.register_fake
def _(grad, h):
    return h.new_empty(h.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad):
    (h,) = ctx.saved_tensors
    return swiglu_backward(grad, h), None


swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


# ----------------------------------------------------------------------------- entry points

def silu_mul(a: Tensor, b: Tensor) -> Tensor:
    """``silu(a) * b`` (a = w1 x, b = w3 x). Eager calls that resolve to the torch
    backend run the reference directly (plain autograd); the rest go through the op."""
    _check_pair(a, b)
    backend = dispatch.entry_backend("silu_mul", a, b)
    if backend == "torch":
        return silu_mul_ref(a, b)
    return silu_mul_op(a, b, backend)


def swiglu(h: Tensor) -> Tensor:
    """``silu(h[..., :F]) * h[..., F:]`` for the fused w1|w3 output ``h`` [.., 2F]."""
    _check_fused(h)
    backend = dispatch.entry_backend("swiglu", h)
    if backend == "torch":
        return silu_mul_ref(*h.chunk(2, dim=-1))
    return swiglu_op(h, backend)
