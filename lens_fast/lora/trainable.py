"""Adapters as trainable parameters, for the trainer's ``lora`` recipe (``train/lora.py``).

``LoraSpec`` is what ``lens_fast.train.build.build_model`` calls while it builds the model
(``adapters=``): ``attach`` on the meta model, before FSDP2 shards it (so the adapters
are sharded, gathered and reduced with their block; the base is frozen and stored in
``base_dtype``), ``initial_value`` for each adapter parameter when the model is
materialised (A: PEFT's default, uniform in +-1/sqrt(in), drawn from (seed, name) so any
world size gets the same values; B: zeros, so training starts at the base model), and
``finish`` after it (the scale buffers). ``trained_modules`` turns the parameters back
into ``ModuleLora``s, which ``formats.save_file`` writes in diffusers' layout.

Targets are fnmatch patterns over official module names, or presets: ``attn`` (the QKV
and output projections of both streams), ``mlp`` (both streams' MLPs), ``mod`` (the
adaLN modulation linears), ``all`` (every linear layer).
"""
from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import InvalidValue
from .adapters import targets
from .formats import ModuleLora
from .layer import attach, is_adapted

PRESETS = {
    "attn": ("*.attn.img_qkv", "*.attn.txt_qkv", "*.attn.to_out.0", "*.attn.to_add_out"),
    "mlp": ("*_mlp.w1", "*_mlp.w2", "*_mlp.w3", "*_mlp.net.0.proj", "*_mlp.net.2"),
    "mod": ("*.img_mod.1", "*.txt_mod.1"),
    "all": ("*",),
}
DOWN, UP = ".lora_down", ".lora_up"


def resolve_targets(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """The official linear modules ``patterns`` (fnmatch patterns or preset names) name;
    a pattern that names none is an error naming it."""
    if isinstance(patterns, str) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise InvalidValue(f"lora.targets={patterns!r}: expected a list of module patterns or presets "
                           f"({', '.join(PRESETS)})")
    names = list(targets(model))
    chosen = set()
    for pattern in patterns:
        found = [n for p in PRESETS.get(pattern, (pattern,)) for n in names if fnmatch.fnmatchcase(n, p)]
        if not found:
            raise InvalidValue(f"lora.targets: {pattern!r} names no linear module of this model; use a preset "
                               f"({', '.join(PRESETS)}) or a pattern over names such as {names[len(names) // 2]}")
        chosen.update(found)
    return sorted(chosen, key=names.index)


@dataclass
class LoraSpec:
    rank: int
    alpha: Optional[float] = None  # None: the rank (scale 1)
    targets: Sequence[str] = ("attn", "mlp")
    seed: int = 0
    base_dtype: torch.dtype = torch.float32
    modules: List[str] = field(default_factory=list)  # resolved by attach

    @property
    def scaling(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def attach(self, model: nn.Module) -> None:
        """Freeze the base (stored in ``base_dtype``) and add float32 adapters (meta or real)."""
        self.modules = resolve_targets(model, self.targets)
        model.requires_grad_(False)
        model.to(dtype=self.base_dtype)
        where = targets(model)
        for name in self.modules:
            module = model.get_submodule(where[name].physical)
            if where[name].physical != name:
                raise InvalidValue(f"lora training needs the unfused layout; {name} is fused into "
                                   f"{where[name].physical}")
            device = next(module.parameters()).device
            fin, fout = where[name].in_features, where[name].out_features
            attach(module, torch.zeros(self.rank, fin, device=device), torch.zeros(fout, self.rank, device=device),
                   torch.zeros(self.rank, device=device), trainable=True)

    def initial_value(self, name: str, shape) -> Optional[torch.Tensor]:
        """The initial value of an adapter parameter (None for the base's)."""
        if name.endswith(UP):
            return torch.zeros(shape)
        if not name.endswith(DOWN):
            return None
        g = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
        return (torch.rand(shape, generator=g) * 2 - 1) / shape[1] ** 0.5

    def initialize(self, model: nn.Module) -> None:
        """Set every adapter parameter of a materialised (unsharded) model to its initial value."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                value = self.initial_value(name, tuple(p.shape))
                if value is not None:
                    p.copy_(value)
        self.finish(model)

    def finish(self, model: nn.Module) -> None:
        """Fill the scale buffers (materialising leaves buffers uninitialised)."""
        for module in model.modules():
            if is_adapted(module):
                module.lora_scale.fill_(self.scaling)


def trained_modules(state_dict: Dict[str, torch.Tensor], scaling: float) -> Dict[str, ModuleLora]:
    """The adapters in a trained model's (or its EMA's) parameters, as ``ModuleLora``s."""
    modules = {}
    for key, down in state_dict.items():
        if key.endswith(DOWN):
            name = key[:-len(DOWN)]
            up = state_dict[name + UP]
            modules[name] = ModuleLora(down.detach().float().cpu(), up.detach().float().cpu(),
                                       scaling * down.shape[0])
    return modules
