"""Helpers shared by the fused-op launchers: output allocation (NaN-poisoned in tests),
lazy kernel imports, dtype/layout checks used by the backends' dispatch rules."""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional, Sequence

import torch

from . import optional

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tests set this (or LENS_FAST_POISON_OUTPUTS=1) so every buffer a kernel is meant to
# write fully starts as NaN: an element a kernel forgets to write then fails the test.
POISON_OUTPUTS = os.environ.get("LENS_FAST_POISON_OUTPUTS", "0") == "1"


def empty(shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if POISON_OUTPUTS and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def triton_kernels(name: str):
    """``lens_fast.kernels.<name>``, imported on first use (importing lens_fast never
    imports triton, and a TRITON_INTERPRET set by a test still applies)."""
    return importlib.import_module(f"lens_fast.kernels.{name}")


def cuda_ext():
    return optional.cuda_extension()


def cuda_ext_has(*names: str) -> bool:
    ext = optional.cuda_extension()
    return ext is not None and all(hasattr(ext, n) for n in names) and torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 stands in for the interpreter."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit-stride last dimension (kernels take the other strides)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def one_float_dtype(*tensors: Optional[torch.Tensor]) -> bool:
    """All given tensors share one kernel dtype (fp32/fp16/bf16) and one device."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return False
    return ts[0].dtype in KERNEL_DTYPES and all(t.dtype == ts[0].dtype and t.device == ts[0].device for t in ts)


def aligned16(*tensors: Optional[torch.Tensor]) -> bool:
    """Base pointers and every non-unit stride are 16-byte multiples, last stride 1: what
    the CUDA kernels' 16-byte vector accesses need."""
    for t in tensors:
        if t is None:
            continue
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        size = t.element_size()
        if any((s * size) % 16 for s in t.stride()[:-1]) or (t.shape[-1] * size) % 16:
            return False
    return True


def no_alias(outputs, inputs):
    """Custom ops may not return an input (or a view of one): clone such outputs. Only the
    reference (torch) backward needs this, where autograd can hand a gradient through."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    return tuple(o.clone() if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in ptrs else o
                 for o in outputs)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def rms_norm_out_dtype(x_dtype: torch.dtype, w_dtype: Optional[torch.dtype]) -> torch.dtype:
    """Result dtype of ``rms_norm_ref``: statistics promote to float32; a half/bf16 weight
    casts the normalised value to the weight's dtype before the multiply."""
    if w_dtype is None:
        return x_dtype
    if w_dtype in (torch.float16, torch.bfloat16):
        return w_dtype
    return torch.promote_types(torch.promote_types(x_dtype, torch.float32), w_dtype)
