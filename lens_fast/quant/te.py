"""FP8 through NVIDIA Transformer Engine, when ``transformer_engine.pytorch`` imports.

What it does: selected ``nn.Linear`` layers become ``te.Linear`` (weights copied, same
parameter names), and the model's forward runs inside TE's FP8 autocast with a recipe:
- inference (default): ``Float8CurrentScaling`` in E4M3 -- scales from the current
  tensors, so the very first call is right (delayed scaling would start from scale 1
  with no amax history);
- training: ``DelayedScaling`` in HYBRID format (E4M3 forward, E5M2 gradients), amax
  history 16, max -- TE's standard training recipe;
- with a TE older than ``Float8CurrentScaling`` (< 2.2) ``auto`` falls back to
  ``DelayedScaling`` (logged); asking for ``current`` there is an error.
Backward runs outside the autocast (the forward wrapper exits it), as TE requires.

Written against TE's public API only (``te.Linear``, ``te.autocast`` / the older
``te.fp8_autocast``, ``transformer_engine.common.recipe``); TE is absent on our CI and
on our H100, so this path is tested with a stand-in module. Two adaptations:
- TE's FP8 GEMM needs the token count to be a multiple of 8 (16 is used) and Lens text
  lengths are arbitrary, so the ``te.Linear`` subclass zero-pads rows and slices back;
- TE modules add an ``_extra_state`` entry (FP8 scaling metadata) to ``state_dict``;
  it is dropped on save and forgiven on load, so the keys stay the official ones (the
  price: delayed-scaling amax history restarts after a checkpoint reload).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
from typing import Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import optional

log = logging.getLogger("lens_fast.quant")

RECIPES = ("auto", "current", "delayed")
ROW_MULTIPLE = 16
EXTRA_STATE = "_extra_state"


def available() -> bool:
    return optional.has_transformer_engine()


def te_pytorch():
    """``transformer_engine.pytorch``; a clear error when it does not import."""
    if not available():
        raise RuntimeError("backend='te' needs NVIDIA Transformer Engine, but transformer_engine.pytorch does "
                           "not import here; install transformer-engine[pytorch] or use backend='auto' "
                           "(native torch._scaled_mm FP8)")
    return importlib.import_module("transformer_engine.pytorch")


def make_recipe(kind: str = "auto", training: bool = False, amax_history_len: int = 16):
    """A TE FP8 recipe: ``current`` (Float8CurrentScaling), ``delayed`` (DelayedScaling) or
    ``auto`` (current for inference, delayed for training). Format E4M3 for inference,
    HYBRID (E4M3 forward / E5M2 backward) for training."""
    if kind not in RECIPES:
        raise ValueError(f"recipe={kind!r}; expected one of {RECIPES}")
    te_pytorch()
    recipe = importlib.import_module("transformer_engine.common.recipe")
    fmt = recipe.Format.HYBRID if training else recipe.Format.E4M3
    has_current = hasattr(recipe, "Float8CurrentScaling")
    if kind == "current" and not has_current:
        raise RuntimeError("recipe='current' needs Transformer Engine >= 2.2 (Float8CurrentScaling); this one "
                           "has only DelayedScaling: use recipe='delayed'")
    if kind == "current" or (kind == "auto" and not training and has_current):
        return recipe.Float8CurrentScaling(fp8_format=fmt)
    if kind == "auto" and not training:
        log.info("FP8 (TE): no Float8CurrentScaling in this Transformer Engine; using DelayedScaling")
    return recipe.DelayedScaling(fp8_format=fmt, amax_history_len=amax_history_len, amax_compute_algo="max")


def fp8_autocast(recipe=None, enabled: bool = True):
    """TE's FP8 autocast context: ``te.autocast(recipe=...)`` on TE >= 2.8, else
    ``te.fp8_autocast(fp8_recipe=...)``."""
    te = te_pytorch()
    recipe = make_recipe() if recipe is None else recipe
    new_api = getattr(te, "autocast", None)
    if new_api is not None and "recipe" in inspect.signature(new_api).parameters:
        return new_api(enabled=enabled, recipe=recipe)
    return te.fp8_autocast(enabled=enabled, fp8_recipe=recipe)


@functools.lru_cache(maxsize=None)
def _padded_subclass(te_linear: type) -> type:
    class PaddedTELinear(te_linear):
        """``te.Linear`` that zero-pads the token rows to a multiple of 16 (TE's FP8 GEMM
        shape rule) and returns the unpadded rows."""

        def forward(self, inp, *args, **kwargs):
            rows = inp.numel() // inp.shape[-1]
            pad = -rows % ROW_MULTIPLE
            if pad == 0:
                return super().forward(inp, *args, **kwargs)
            flat = F.pad(inp.reshape(rows, inp.shape[-1]), (0, 0, 0, pad))
            out = super().forward(flat, *args, **kwargs)
            return out[:rows].reshape(*inp.shape[:-1], out.shape[-1])

    return PaddedTELinear


def te_linear_class() -> type:
    return _padded_subclass(te_pytorch().Linear)


def _drop_extra_state(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + EXTRA_STATE, None)


def _forgive_extra_state(module, incompatible_keys, names=frozenset()):
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not (k.endswith("." + EXTRA_STATE) and k[:-len(EXTRA_STATE) - 1] in names)]


def to_te_linear(linear: nn.Linear) -> nn.Module:
    """A ``te.Linear`` (padded subclass) holding ``linear``'s weight and bias."""
    layer = te_linear_class()(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              params_dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        layer.weight.copy_(linear.weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    for name in ("weight", "bias"):
        p = getattr(linear, name)
        if p is not None:
            getattr(layer, name).requires_grad_(p.requires_grad)
    layer.register_state_dict_post_hook(_drop_extra_state)
    return layer


class AutocastForward:
    """Replacement ``forward`` of a module: the class forward inside TE's FP8 autocast.
    An object (not a closure) so ``copy.deepcopy`` of the model rebinds it."""

    def __init__(self, module: nn.Module, recipe):
        self.module, self.recipe = module, recipe

    def __call__(self, *args, **kwargs):
        with fp8_autocast(self.recipe):
            return type(self.module).forward(self.module, *args, **kwargs)


def convert_to_te(model: nn.Module, names: Iterable[str], recipe=None, wrap_forward: bool = True) -> List[str]:
    """Replace the named ``nn.Linear`` submodules by TE linears; run ``model.forward``
    under FP8 autocast with ``recipe`` (default ``make_recipe()``) unless
    ``wrap_forward=False`` (then the caller enters ``fp8_autocast`` itself, e.g. a trainer).
    Returns the converted names."""
    te_pytorch()
    recipe = make_recipe() if recipe is None else recipe
    converted = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, to_te_linear(getattr(parent, child)))
        converted.append(name)
    model.register_load_state_dict_post_hook(functools.partial(_forgive_extra_state, names=frozenset(converted)))
    if wrap_forward:
        model.forward = AutocastForward(model, recipe)
    log.info("FP8 (Transformer Engine): %d linear layers converted, recipe %s", len(converted),
             type(recipe).__name__)
    return converted


def recipe_of(model: nn.Module) -> Optional[object]:
    """The recipe a converted model's forward runs under, or None."""
    fwd = model.__dict__.get("forward")
    return fwd.recipe if isinstance(fwd, AutocastForward) else None
