"""Adapters on a Lens transformer: load, stack, weight, fuse, unfuse, hot-swap, unload.

A model's adapters are kept by official module name (``ModuleLora`` per module, on the
CPU) in ``model.lora_adapters`` (a ``LoraState``); what runs is derived from them for the
model's current layout (``materialise``): each linear that holds at least one official
module with an adapter gets the stacked tensors of ``layer.attach``. An official module
sits in a row range of one physical layer: itself, or for ``img_mlp.w1`` / ``w3`` of a
fused SwiGLU (``fuse_projections``) the upper / lower half of ``w13``. When the layout
changes (``fuse_projections``, FP8 quantisation) the model calls ``layout_changed`` and
the adapters are laid out again on the new modules.

In-place changes (no new tensors, so a compiled graph or a captured CUDA graph keeps
reading the right memory): ``set_adapters`` / ``enable`` / ``disable`` (the scale vector)
and ``hotswap`` (an adapter's slices, zero-padded to the width reserved at load time:
``max(rank, target_rank)``). Structural changes (load, delete, unload, fuse, unfuse)
build new tensors: a compiled engine must drop its graphs (the pipeline does).

Fusing adds ``weight * alpha / r * B A`` to the rows of each module, after keeping a
copy of those rows as they were before the first fuse (for an FP8 layer, its e4m3 rows and
scales); ``unfuse`` writes the copies back, so the base weights return bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..errors import InvalidValue
from ..models.layers import GateMLP
from ..quant.fp8 import quantize_rows_fp8_ref
from . import formats
from .formats import LoraMismatch, ModuleLora
from .layer import attach, detach, features

STATE = "lora_adapters"
# Modules whose outputs depend on sigma alone: the engine precomputes them per schedule.
SIGMA_PATH = ("time_text_embed.", "norm_out.", ".img_mod.", ".txt_mod.")


@dataclass(frozen=True)
class Target:
    """Where an official linear module lives in the current layout."""
    physical: str  # module name
    rows: slice    # its rows of the physical layer's output
    in_features: int
    out_features: int


@dataclass
class Adapter:
    name: str
    modules: Dict[str, ModuleLora]
    source: str
    weight: float = 1.0
    fused: bool = False


@dataclass
class Segment:
    """One adapter's share of a physical layer's stacked tensors."""
    adapter: str
    module: str   # official name
    rows: slice   # output rows
    cols: slice   # reserved rank columns (width >= the adapter's rank)


@dataclass
class LoraState:
    adapters: Dict[str, Adapter] = field(default_factory=dict)
    active: Optional[List[str]] = None  # None: every loaded adapter
    enabled: bool = True
    target_rank: int = 0                # rank columns reserved per adapter (hot-swap of larger ranks)
    slots: Dict[str, List[Segment]] = field(default_factory=dict)
    originals: Dict[str, object] = field(default_factory=dict)  # official name -> rows before the first fuse

    def effective_weight(self, name: str) -> float:
        if not self.enabled or (self.active is not None and name not in self.active):
            return 0.0
        return self.adapters[name].weight


# -- the model's layout ---------------------------------------------------------------------
def targets(model: nn.Module) -> Dict[str, Target]:
    """Every official linear module of ``model`` -> where it lives now."""
    out = {}
    fused = {name for name, m in model.named_modules() if isinstance(m, GateMLP) and m.fused}
    for name, module in model.named_modules():
        shape = features(module)
        if shape is None:
            continue
        parent, _, leaf = name.rpartition(".")
        if parent in fused and leaf == "w13":
            hidden = shape[1] // 2
            out[f"{parent}.w1"] = Target(name, slice(0, hidden), shape[0], hidden)
            out[f"{parent}.w3"] = Target(name, slice(hidden, 2 * hidden), shape[0], hidden)
        else:
            out[name] = Target(name, slice(0, shape[1]), *shape)
    return out


def _dtype_device(module: nn.Module):
    if hasattr(module, "weight_fp8"):  # lens_fast.quant.FP8Linear: computes in its weight_dtype
        return module.weight_dtype, module.weight_fp8.device
    return module.weight.dtype, module.weight.device


def state_of(model: nn.Module, create: bool = False) -> Optional[LoraState]:
    state = model.__dict__.get(STATE)
    if state is None and create:
        state = LoraState()
        model.__dict__[STATE] = state
        register = getattr(model, "register_layout_hook", None)
        if register is not None:
            register(layout_changed)
    return state


def layout_changed(model: nn.Module) -> None:
    """Lay the adapters out again after modules were replaced (the model's layout hook)."""
    state = state_of(model)
    if state is not None and state.adapters:
        materialise(model, state)


def materialise(model: nn.Module, state: LoraState) -> None:
    """Build every physical layer's stacked tensors from the unfused adapters."""
    for physical in state.slots:
        try:
            detach(model.get_submodule(physical))
        except AttributeError:  # replaced by a layout change
            pass
    state.slots = {}
    where = targets(model)
    plan: Dict[str, list] = {}
    for adapter in state.adapters.values():
        if adapter.fused:
            continue
        for official, lora in adapter.modules.items():
            if official not in where:
                raise LoraMismatch(f"adapter {adapter.name!r}: module {official} is no linear layer of this model "
                                   "any more")
            plan.setdefault(where[official].physical, []).append((adapter.name, official, lora))
    for physical, items in plan.items():
        module = model.get_submodule(physical)
        fin, fout = features(module)
        dtype, device = _dtype_device(module)
        widths = [max(lora.rank, state.target_rank) for _, _, lora in items]
        down = torch.zeros(sum(widths), fin, dtype=dtype, device=device)
        up = torch.zeros(fout, sum(widths), dtype=dtype, device=device)
        segments, col = [], 0
        for (name, official, lora), width in zip(items, widths):
            rows = where[official].rows
            down[col:col + lora.rank] = lora.down.to(device, dtype)
            up[rows, col:col + lora.rank] = lora.up.to(device, dtype)
            segments.append(Segment(name, official, rows, slice(col, col + width)))
            col += width
        attach(module, down, up, torch.zeros(col, dtype=torch.float32, device=device))
        state.slots[physical] = segments
    refresh_scales(model, state)


def refresh_scales(model: nn.Module, state: LoraState) -> None:
    """Write every segment's ``weight * alpha / r`` into its layer's scale vector, in place."""
    for physical, segments in state.slots.items():
        module = model.get_submodule(physical)
        scale = torch.zeros_like(module.lora_scale, device="cpu")
        for seg in segments:
            lora = state.adapters[seg.adapter].modules.get(seg.module)
            if lora is not None:
                scale[seg.cols] = lora.scaling * state.effective_weight(seg.adapter)
        module.lora_scale.copy_(scale)


# -- loading ----------------------------------------------------------------------------------
def read_adapter(model: nn.Module, source: Union[str, Dict[str, torch.Tensor]],
                 weight_name: Optional[str] = None) -> formats.LoraFile:
    if isinstance(source, dict):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in source.items()):
            raise InvalidValue("a LoRA state dict must map key strings to tensors")
        return formats.LoraFile("<state dict>", dict(source), None)
    if not isinstance(source, (str, bytes)) and not hasattr(source, "__fspath__"):
        raise InvalidValue(f"LoRA source {source!r}: expected a .safetensors file, a folder or a state dict")
    return formats.read_file(source, weight_name)


def _check_weight(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidValue(f"{what}={value!r}: expected a finite number")
    return float(value)


def load(model: nn.Module, source, adapter_name: Optional[str] = None, weight: float = 1.0,
         hotswap: bool = False, weight_name: Optional[str] = None) -> str:
    """Load a LoRA (file, folder or state dict) as adapter ``adapter_name`` at ``weight``;
    with ``hotswap`` replace the loaded adapter of that name in place. Everything is read
    and checked before the model changes. Returns the adapter's name."""
    weight = _check_weight(weight, "scale")
    state = state_of(model)
    if hotswap:
        if adapter_name is None or state is None or adapter_name not in state.adapters:
            loaded = sorted(state.adapters) if state else []
            raise InvalidValue(f"hotswap=True replaces a loaded adapter: adapter_name={adapter_name!r} is not one "
                               f"of the loaded {loaded}")
        if state.adapters[adapter_name].fused:
            raise InvalidValue(f"adapter {adapter_name!r} is fused into the weights; unfuse_lora() before hot-swapping it")
    elif adapter_name is not None and state is not None and adapter_name in state.adapters:
        raise InvalidValue(f"an adapter named {adapter_name!r} is already loaded; pass another adapter_name, or "
                           "hotswap=True to replace it in place")
    if adapter_name is not None and (not isinstance(adapter_name, str) or not adapter_name):
        raise InvalidValue(f"adapter_name={adapter_name!r}: expected a non-empty string")
    lora = read_adapter(model, source, weight_name)
    where = targets(model)
    modules = formats.parse(lora, {n: (t.in_features, t.out_features) for n, t in where.items()})
    if hotswap:
        _hotswap(model, state, adapter_name, modules, lora.path, weight)
        return adapter_name
    state = state_of(model, create=True)
    name = adapter_name or _free_name(state)
    state.adapters[name] = Adapter(name, modules, lora.path, weight)
    if state.active is not None:
        state.active.append(name)
    materialise(model, state)
    return name


def _free_name(state: LoraState) -> str:
    i = len(state.adapters)
    while f"default_{i}" in state.adapters:
        i += 1
    return f"default_{i}"


def _hotswap(model, state: LoraState, name: str, modules: Dict[str, ModuleLora], source: str, weight: float) -> None:
    adapter = state.adapters[name]
    extra = sorted(set(modules) - set(adapter.modules))
    if extra:
        raise LoraMismatch(f"hot-swap of adapter {name!r}: {source} adapts modules the loaded adapter does not "
                           f"({formats._named(extra)}); a hot-swap keeps the targets (load it as a new adapter "
                           "instead: that recompiles)")
    segments = [(physical, seg) for physical, segs in state.slots.items() for seg in segs if seg.adapter == name]
    for _, seg in segments:
        lora = modules.get(seg.module)
        width = seg.cols.stop - seg.cols.start
        if lora is not None and lora.rank > width:
            raise LoraMismatch(f"hot-swap of adapter {name!r}: {seg.module} has rank {lora.rank} in {source}, more "
                               f"than the {width} reserved; call enable_lora_hotswap(target_rank={lora.rank}) before "
                               "loading the first adapter")
    with torch.no_grad():
        for physical, seg in segments:
            module = model.get_submodule(physical)
            module.lora_down[seg.cols] = 0
            module.lora_up[seg.rows, seg.cols] = 0
            lora = modules.get(seg.module)
            if lora is not None:
                start = seg.cols.start
                module.lora_down[start:start + lora.rank] = lora.down.to(module.lora_down.device,
                                                                         module.lora_down.dtype)
                module.lora_up[seg.rows, start:start + lora.rank] = lora.up.to(module.lora_up.device,
                                                                               module.lora_up.dtype)
    adapter.modules, adapter.source, adapter.weight = modules, source, weight
    refresh_scales(model, state)


# -- weights ----------------------------------------------------------------------------------
def _require(model: nn.Module) -> LoraState:
    state = state_of(model)
    if state is None or not state.adapters:
        raise InvalidValue("no LoRA adapters are loaded (load_lora_weights first)")
    return state


def _names(state: LoraState, names, what: str) -> List[str]:
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise InvalidValue(f"{what}: adapter(s) {unknown} are not loaded; loaded: {sorted(state.adapters)}")
    return names


def set_adapters(model: nn.Module, names: Union[str, Sequence[str]],
                 weights: Union[None, float, Sequence[Optional[float]]] = None) -> None:
    """Run exactly ``names``, at ``weights`` (one number for all, one per name, or None: 1.0)."""
    state = _require(model)
    names = _names(state, names, "set_adapters")
    if weights is None or isinstance(weights, (int, float)):
        weights = [1.0 if weights is None else weights] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise InvalidValue(f"set_adapters: {len(names)} adapter(s) {names} but {len(weights)} weight(s)")
    weights = [_check_weight(1.0 if w is None else w, f"weight of {n!r}") for n, w in zip(names, weights)]
    fused = [n for n, w in zip(names, weights) if state.adapters[n].fused and w != state.adapters[n].weight]
    if fused:
        raise InvalidValue(f"set_adapters: {fused} are fused into the weights at their old weight; unfuse_lora() "
                           "before changing it")
    for n, w in zip(names, weights):
        state.adapters[n].weight = w
    state.active = names
    refresh_scales(model, state)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    state = _require(model)
    state.enabled = bool(enabled)
    refresh_scales(model, state)


def active_adapters(model: nn.Module) -> List[str]:
    state = state_of(model)
    if state is None or not state.enabled:
        return []
    return [n for n in state.adapters if state.active is None or n in state.active]


def loaded_adapters(model: nn.Module) -> List[str]:
    state = state_of(model)
    return list(state.adapters) if state else []


def set_target_rank(model: nn.Module, target_rank: int) -> None:
    """Reserve ``target_rank`` rank columns for every adapter loaded from now on, so that a
    later hot-swap to any rank up to it needs no new tensors (diffusers' enable_lora_hotswap)."""
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
        raise InvalidValue(f"target_rank={target_rank!r}: expected a positive integer")
    state_of(model, create=True).target_rank = target_rank


def delete(model: nn.Module, names: Union[str, Sequence[str]]) -> None:
    state = _require(model)
    names = _names(state, names, "delete_adapters")
    fused = [n for n in names if state.adapters[n].fused]
    if fused:
        raise InvalidValue(f"delete_adapters: {fused} are fused into the weights; unfuse_lora() first")
    for n in names:
        del state.adapters[n]
        if state.active is not None and n in state.active:
            state.active.remove(n)
    materialise(model, state)


def unload(model: nn.Module) -> None:
    """Remove every adapter. Fused adapters stay in the weights (as diffusers: fuse, then
    unload, gives a merged model without LoRA layers); their saved originals are dropped."""
    state = state_of(model)
    if state is None:
        return
    for physical in state.slots:
        try:
            detach(model.get_submodule(physical))
        except AttributeError:
            pass
    del model.__dict__[STATE]


# -- fusing -----------------------------------------------------------------------------------
def _read_rows(module: nn.Module, rows: slice):
    if hasattr(module, "weight_fp8"):
        return module.weight_fp8[rows].clone(), module.weight_scale[:, rows].clone()
    return module.weight.detach()[rows].clone()


def _write_rows(module: nn.Module, rows: slice, saved, official: str) -> None:
    with torch.no_grad():
        if hasattr(module, "weight_fp8"):
            if not isinstance(saved, tuple):  # fused before FP8 quantisation: quantise the original
                q, s = quantize_rows_fp8_ref(saved.to(module.weight_fp8.device))
                saved = (q, s.reshape(1, -1))
            module.weight_fp8[rows] = saved[0]
            module.weight_scale[:, rows] = saved[1]
        elif isinstance(saved, tuple):
            raise InvalidValue(f"unfuse_lora: {official} was fused as an FP8 layer and is no FP8 layer now; reload "
                               "the model")
        else:
            module.weight[rows] = saved


def _add_rows(module: nn.Module, rows: slice, delta: torch.Tensor) -> None:
    with torch.no_grad():
        if hasattr(module, "weight_fp8"):
            w = module.weight_fp8[rows].float() * module.weight_scale[0, rows].unsqueeze(1)
            q, s = quantize_rows_fp8_ref(w + delta.to(w.device))
            module.weight_fp8[rows] = q
            module.weight_scale[:, rows] = s.reshape(1, -1)
        else:
            w = module.weight[rows]
            module.weight[rows] = (w.float() + delta.to(w.device)).to(w.dtype)


def fuse(model: nn.Module, names: Optional[Sequence[str]] = None, lora_scale: float = 1.0) -> List[str]:
    """Add ``names`` (default: the active adapters) into the base weights at their weight
    x ``lora_scale``; the rows are kept first (once), for ``unfuse``. Returns the fused names."""
    state = _require(model)
    lora_scale = _check_weight(lora_scale, "lora_scale")
    names = _names(state, names, "fuse_lora") if names is not None else \
        [n for n in active_adapters(model) if not state.adapters[n].fused]
    fused = [n for n in names if state.adapters[n].fused]
    if fused:
        raise InvalidValue(f"fuse_lora: {fused} are fused already")
    where = targets(model)
    for name in names:
        adapter = state.adapters[name]
        factor = adapter.weight * lora_scale
        for official, lora in adapter.modules.items():
            t = where[official]
            module = model.get_submodule(t.physical)
            if official not in state.originals:
                state.originals[official] = _read_rows(module, t.rows)
            _add_rows(module, t.rows, (lora.up.float() @ lora.down.float()) * (lora.scaling * factor))
        adapter.fused = True
    materialise(model, state)
    return names


def unfuse(model: nn.Module) -> List[str]:
    """Write back the rows kept by ``fuse`` (bit for bit) and return the fused adapters to
    the unfused path. Returns their names."""
    state = state_of(model)
    if state is None:
        return []
    where = targets(model)
    for official, saved in state.originals.items():
        t = where[official]
        _write_rows(model.get_submodule(t.physical), t.rows, saved, official)
    state.originals = {}
    names = [n for n, a in state.adapters.items() if a.fused]
    for n in names:
        state.adapters[n].fused = False
    if state.adapters:
        materialise(model, state)
    return names


def touches_sigma_path(model: nn.Module) -> bool:
    """Whether any loaded adapter adapts a module the engine precomputes per schedule."""
    state = state_of(model)
    return state is not None and any(any(p in f".{m}" for p in SIGMA_PATH)
                                     for a in state.adapters.values() for m in a.modules)
