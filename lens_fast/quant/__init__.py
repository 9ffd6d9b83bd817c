"""Opt-in quantisation of the Lens denoiser: ``apply_quantization(model_or_pipeline, "fp8")``.

Backends (``backend=``):
- ``auto`` (default): on a CUDA card with FP8 (compute capability >= 8.9) Transformer
  Engine when ``transformer_engine.pytorch`` imports, else the native
  ``torch._scaled_mm`` path; on the CPU the native path in emulation (quantise ->
  dequantise in float32 with the same scales: numbers as on the GPU, no speed-up;
  logged). A model quantised on the CPU and moved to a GPU afterwards runs the real
  FP8 GEMM there (the native layers pick per call; TE is only chosen at apply time).
- ``te``: Transformer Engine (``lens_fast.quant.te``), for training and inference;
  an error when TE does not import.
- ``scaled_mm``: native ``torch._scaled_mm`` (also on the CPU, through PyTorch's
  reference kernel -- used by tests).
- ``emulate``: the float32 emulation on any device.
On a CUDA card without FP8 (e.g. A100, sm_80) every backend but ``emulate`` raises
``FP8UnsupportedError`` naming the card and its capability.

Native backends first switch the model to its inference layout (``fuse_projections()``:
each SwiGLU's w1 and w3 become one GEMM, ``*_mlp.w13``; per-output-channel scales make
quantising it identical to quantising w1 and w3 apart). The fused producers then feed
e4m3 straight into img_qkv/txt_qkv (adaLN entry), w13 (gated residual + adaLN) and w2
(SwiGLU product); to_out/to_add_out quantise the attention output themselves.

Which layers: every ``nn.Linear`` passing ``layer_filter``. The default keeps the
precision-sensitive layers in their original dtype: the modulation linears
(``*.img_mod.1``, ``*.txt_mod.1``), ``img_in``, ``txt_in``, ``proj_out``,
``norm_out.linear``, the time embedding and the first and last block. Override with a
callable ``(name, module) -> bool`` or with ``LayerFilter(include=[...], exclude=[...])``
(fnmatch patterns on module names; ``exclude=None`` means the defaults, ``exclude=[]``
none) or the equivalent dict. Layers whose in/out features are not multiples of 16 stay
in their original precision on every backend (so the CPU emulation matches the GPU),
listed in the result's ``skipped``.

Checkpoints: state-dict keys are unchanged. Native FP8 layers save their dequantised
weights in the original dtype, so ``state_dict()`` / ``save_pretrained`` of a quantised
model write an ordinary official checkpoint (holding the FP8-rounded weights), and
loading official weights into a quantised model re-quantises them.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import te
from .fp8 import (GEMM_ALIGNMENT, FP8Linear, FP8UnsupportedError, QuantizedActivation,  # noqa: F401
                  check_fp8_device, install_fused_producers)

log = logging.getLogger("lens_fast.quant")

MODES = ("fp8",)
BACKENDS = ("auto", "te", "scaled_mm", "emulate")
DEFAULT_EXCLUDE = ("img_in", "txt_in", "proj_out", "norm_out.linear", "time_text_embed.*", "*.img_mod.1",
                   "*.txt_mod.1")


def default_exclude(model: nn.Module) -> List[str]:
    """The default keep-in-original-precision patterns for ``model``."""
    patterns = list(DEFAULT_EXCLUDE)
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is not None and len(blocks):
        patterns += ["transformer_blocks.0.*", f"transformer_blocks.{len(blocks) - 1}.*"]
    return patterns


@dataclass(frozen=True)
class LayerFilter:
    """Quantise a linear iff its name matches one ``include`` pattern and no ``exclude``
    pattern; ``exclude=None`` stands for ``default_exclude(model)``."""
    include: Sequence[str] = ("*",)
    exclude: Optional[Sequence[str]] = None

    def predicate(self, model: nn.Module) -> Callable[[str, nn.Module], bool]:
        include = list(self.include)
        exclude = default_exclude(model) if self.exclude is None else list(self.exclude)
        for p in include + exclude:
            if not isinstance(p, str):
                raise TypeError(f"layer patterns must be strings, got {p!r}")

        def keep(name: str, _module: nn.Module) -> bool:
            return (any(fnmatch.fnmatchcase(name, p) for p in include)
                    and not any(fnmatch.fnmatchcase(name, p) for p in exclude))
        return keep


LayerFilterLike = Union[None, LayerFilter, Dict[str, Sequence[str]], Callable[[str, nn.Module], bool]]


def _predicate(model: nn.Module, layer_filter: LayerFilterLike) -> Callable[[str, nn.Module], bool]:
    if layer_filter is None:
        return LayerFilter().predicate(model)
    if isinstance(layer_filter, LayerFilter):
        return layer_filter.predicate(model)
    if isinstance(layer_filter, dict):
        unknown = set(layer_filter) - {"include", "exclude"}
        if unknown:
            raise ValueError(f"layer_filter dict has unknown keys {sorted(unknown)}; expected 'include' and/or "
                             f"'exclude'")
        return LayerFilter(**layer_filter).predicate(model)
    if callable(layer_filter):
        return layer_filter
    raise TypeError(f"layer_filter={layer_filter!r}; expected None, a LayerFilter, a dict with include/exclude "
                    f"patterns, or a callable (name, module) -> bool")


def select_layers(model: nn.Module, layer_filter: LayerFilterLike = None) -> List[str]:
    """Names of the ``nn.Linear`` submodules ``layer_filter`` picks (before the shape rule)."""
    keep = _predicate(model, layer_filter)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and keep(name, m)]


def fp8_shape_ok(linear: nn.Linear) -> bool:
    return linear.in_features % GEMM_ALIGNMENT == 0 and linear.out_features % GEMM_ALIGNMENT == 0


def resolve_backend(backend: str, device) -> str:
    """What ``backend`` runs as for a model on ``device``: ``te``, ``scaled_mm`` or
    ``emulate`` (see the module docstring); raises on a CUDA card without FP8."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if backend == "emulate":
        return "emulate"
    check_fp8_device(device)
    if backend == "te":
        te.te_pytorch()
        return "te"
    if backend == "scaled_mm":
        return "scaled_mm"
    if device.type == "cuda":
        return "te" if te.available() else "scaled_mm"
    return "emulate"


@dataclass
class QuantizationResult:
    mode: str
    backend: str                      # what runs now: te, scaled_mm or emulate
    quantized: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)   # picked by the filter, shape unsupported
    kept: List[str] = field(default_factory=list)           # linears the filter left alone
    fused_blocks: int = 0             # blocks whose adaLN / SwiGLU kernels emit FP8 directly

    def summary(self) -> str:
        return (f"{self.mode} via {self.backend}: {len(self.quantized)} linears quantised, {len(self.kept)} kept "
                f"by the layer filter, {len(self.skipped)} skipped for shape, {self.fused_blocks} blocks with "
                f"fused activation quantisation")


def _denoiser(model_or_pipeline) -> nn.Module:
    if isinstance(model_or_pipeline, nn.Module):
        return model_or_pipeline
    inner = getattr(model_or_pipeline, "transformer", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected a LensTransformer2DModel (nn.Module) or a pipeline with a .transformer, got "
                    f"{type(model_or_pipeline).__name__}")


def apply_quantization(model_or_pipeline, mode: str, *, layer_filter: LayerFilterLike = None,
                       backend: str = "auto", fast_accum: bool = True, fuse_projections: bool = True,
                       recipe=None) -> QuantizationResult:
    """Quantise the denoiser's linear layers in place (see the module docstring).

    ``fuse_projections``: native backends first switch the model to its inference layout
    (``model.fuse_projections()``: each SwiGLU's w1 and w3 become one layer ``w13``,
    quantised as one; per-output-channel scales make that identical to quantising them
    apart) -- so filter patterns see ``*_mlp.w13``; state-dict keys stay w1/w3. TE
    (trainable) keeps the model's layout.
    ``fast_accum``: Hopper's fast FP8 accumulation in the native GEMM (inference).
    ``recipe``: the Transformer Engine recipe (``te.make_recipe``) for backend ``te``.
    Returns what was done; the same object is kept as ``model.lens_fast_quantization``."""
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; expected one of {list(MODES)}")
    model = _denoiser(model_or_pipeline)
    previous = getattr(model, "lens_fast_quantization", None)
    if previous is not None:
        raise RuntimeError(f"this model is already quantised ({previous.summary()}); load a fresh copy to "
                           f"quantise it differently")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    resolved = resolve_backend(backend, device)
    if fuse_projections and resolved != "te" and callable(getattr(model, "fuse_projections", None)):
        model.fuse_projections()
    picked = set(select_layers(model, layer_filter))
    result = QuantizationResult(mode=mode.lower(), backend=resolved)
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if name not in picked:
            result.kept.append(name)
        elif not fp8_shape_ok(m):
            result.skipped[name] = f"{m.in_features} -> {m.out_features} features, not multiples of {GEMM_ALIGNMENT}"
        else:
            result.quantized.append(name)
    if result.skipped:
        log.warning("FP8: %d selected layers keep their original precision (FP8 GEMMs need in/out features that "
                    "are multiples of %d): %s", len(result.skipped), GEMM_ALIGNMENT, ", ".join(result.skipped))
    if resolved == "te":
        te.convert_to_te(model, result.quantized, recipe)
    else:
        layer_backend = "auto" if backend == "auto" else resolved
        for name in result.quantized:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FP8Linear.from_linear(getattr(parent, child), layer_backend, fast_accum))
        result.fused_blocks = install_fused_producers(model)
    layout_changed = getattr(model, "layout_changed", None)
    if callable(layout_changed):
        layout_changed()  # per-module state (LoRA adapters) moves onto the new layers
    if resolved == "emulate":
        log.info("FP8 on %s is emulated (quantise -> dequantise in float32 with the same scales): FP8 numbers, "
                 "no speed-up", device)
    log.info("quantisation: %s", result.summary())
    model.lens_fast_quantization = result
    return result


__all__ = ["apply_quantization", "QuantizationResult", "LayerFilter", "default_exclude", "select_layers",
           "resolve_backend", "FP8Linear", "QuantizedActivation", "FP8UnsupportedError", "check_fp8_device",
           "MODES", "BACKENDS"]
