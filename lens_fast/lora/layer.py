"""The adapted linear layer: a linear module that also adds ``B diag(s) A x``.

An adapted module keeps its own class, parameters and names (``img_qkv.weight`` stays
``img_qkv.weight``; a checkpoint never sees a ``base_layer``); its class is swapped for a
subclass made once per base class (``LoraLinear`` for ``nn.Linear``, ``LoraFP8Linear``
for ``lens_fast.quant.FP8Linear``, likewise for any linear module with ``in_features`` and
``out_features``) whose forward adds the low-rank term, and three tensors are registered
on it:

- ``lora_down`` [R, in]: every adapter's A, stacked along the rank axis;
- ``lora_up`` [out, R]: every adapter's B, side by side;
- ``lora_scale`` [R] float32: per rank column, the adapter's ``alpha / r`` times its weight
  (0 for an inactive adapter).

So any number of adapters costs two skinny GEMMs, weights and hot-swaps are in-place
writes into tensors the compiled graph reads, and a layer holding several official
modules (the fused ``w13`` = [w1; w3], whose ``lora_up`` is block-diagonal) needs no
special case. Inference registers them as non-persistent buffers (the model's
``state_dict`` keeps its official keys); training (``trainable=True``) as parameters.

The low-rank term runs in the activation's own dtype: for an FP8 layer that is the
dequantised input (bf16), added on top of the FP8 GEMM's output.
"""
from __future__ import annotations

from typing import Dict, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_TENSORS = ("lora_down", "lora_up", "lora_scale")


class LoraMixin:
    """The forward of an adapted linear (see the module docstring)."""

    lora_base_class: Type[nn.Module]

    def forward(self, x):
        return lora_forward(self, super().forward(x), x)

    @property
    def lora_rank(self) -> int:
        return self.lora_down.shape[0]


def lora_forward(module: nn.Module, y: torch.Tensor, x) -> torch.Tensor:
    """``y + B diag(s) A x`` in ``y``'s dtype; ``x`` may be an FP8 ``QuantizedActivation``
    (dequantised first)."""
    if not isinstance(x, torch.Tensor):
        x = x.dequantize()
    down = module.lora_down
    h = F.linear(x.to(down.dtype), down) * module.lora_scale.to(down.dtype)
    return y + F.linear(h, module.lora_up).to(y.dtype)


_CLASSES: Dict[type, type] = {}


def lora_class(cls: type) -> type:
    """The adapted subclass of a linear module class (made once, cached)."""
    if issubclass(cls, LoraMixin):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Lora{cls.__name__}", (LoraMixin, cls),
                             {"__module__": __name__, "lora_base_class": cls, "__doc__": f"{cls.__name__} with LoRA adapters (lens_fast.lora.layer)."})
    return _CLASSES[cls]


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module, LoraMixin)


def features(module: nn.Module):
    """(in_features, out_features) of a linear module, or None when it is not one."""
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (fin, fout) if isinstance(fin, int) and isinstance(fout, int) else None


def attach(module: nn.Module, down: torch.Tensor, up: torch.Tensor, scale: torch.Tensor,
           trainable: bool = False) -> None:
    """Adapt ``module`` with the stacked tensors (replacing any it had); ``trainable``
    registers ``lora_down`` / ``lora_up`` as parameters, else all three as non-persistent
    buffers."""
    shape = features(module)
    if shape is None:
        raise TypeError(f"{type(module).__name__} is not a linear layer (no in_features / out_features)")
    fin, fout = shape
    rank = down.shape[0]
    if tuple(down.shape) != (rank, fin) or tuple(up.shape) != (fout, rank) or tuple(scale.shape) != (rank,):
        raise ValueError(f"LoRA tensors down {tuple(down.shape)}, up {tuple(up.shape)}, scale {tuple(scale.shape)} "
                         f"do not fit a {fin} -> {fout} layer")
    detach(module)
    module.__class__ = lora_class(type(module))
    if trainable:
        module.register_parameter("lora_down", nn.Parameter(down))
        module.register_parameter("lora_up", nn.Parameter(up))
    else:
        module.register_buffer("lora_down", down, persistent=False)
        module.register_buffer("lora_up", up, persistent=False)
    module.register_buffer("lora_scale", scale, persistent=False)


def detach(module: nn.Module) -> None:
    """Remove the adapters of ``module`` (if any): back to its own class and tensors."""
    if not is_adapted(module):
        return
    for name in LORA_TENSORS:
        module._parameters.pop(name, None)
        module._buffers.pop(name, None)
    module.__class__ = module.lora_base_class
