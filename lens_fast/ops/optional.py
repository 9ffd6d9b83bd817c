"""Optional dependencies, probed once. Missing means a clean fallback, never a crash."""
from __future__ import annotations

import functools
import importlib
import os

import torch


@functools.lru_cache(maxsize=None)
def has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - any import failure means "absent"
        return False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and has_module("triton")


def triton_usable() -> bool:
    """Triton can run: on a CUDA GPU, or on the CPU through the interpreter."""
    if not has_module("triton"):
        return False
    return torch.cuda.is_available() or triton_interpreted()


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The compiled ``lens_fast._C`` module, or None."""
    try:
        return importlib.import_module("lens_fast._C")
    except Exception:  # noqa: BLE001
        return None


def flash_attn_func():
    """(flash_attn_func, flash_attn_varlen_func) from FlashAttention-3 or -2, or None."""
    for mod in ("flash_attn_interface", "flash_attn"):
        if has_module(mod):
            m = importlib.import_module(mod)
            if hasattr(m, "flash_attn_varlen_func"):
                return m.flash_attn_func, m.flash_attn_varlen_func
    return None


def has_transformer_engine() -> bool:
    return has_module("transformer_engine.pytorch")


def has_dali() -> bool:
    return has_module("nvidia.dali")


def why_unavailable(family: str) -> str:
    if family == "triton":
        if not has_module("triton"):
            return "triton is not installed"
        return "no CUDA GPU, and TRITON_INTERPRET=1 is not set"
    if family == "cuda":
        return "torch.cuda.is_available() is False"
    return "unknown"
