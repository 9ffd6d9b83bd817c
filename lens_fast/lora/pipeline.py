"""``LoraLoaderMixin``: diffusers' LoRA methods on ``LensPipeline``.

Each method acts on ``self.transformer`` (``lens_fast.lora.adapters``) and then tells the
fast path (``self.engine``, when on) what changed: after a structural change (load,
delete, unload, fuse, unfuse) it drops its compiled-step graphs and tables (the next call
recompiles / recaptures); after an in-place one (``set_adapters``, ``enable_lora``,
``disable_lora``, a hot-swap) only its per-schedule tables, which hold the modulation
linears' outputs, and only when an adapter adapts one of them. A hot-swap of an adapter
with the same targets and a rank within the reserved width (``enable_lora_hotswap``)
therefore neither recompiles nor recaptures a CUDA graph.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

from . import adapters


class LoraLoaderMixin:
    """LoRA adapters on the pipeline's transformer (diffusers' method names)."""

    def _lora_changed(self, structure: bool) -> None:
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        if structure:
            engine.clear()
        elif adapters.touches_sigma_path(self.transformer):
            engine.clear_tables()

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: Optional[str] = None,
                          scale: float = 1.0, hotswap: bool = False, weight_name: Optional[str] = None) -> str:
        """Load a LoRA of the Lens transformer: a ``.safetensors`` file, a folder holding one
        (diffusers' ``pytorch_lora_weights.safetensors``, PEFT's ``adapter_model.safetensors``)
        or a state dict; diffusers/PEFT or kohya key layout (``lens_fast.lora.formats``). It
        runs at weight ``scale`` beside the other loaded adapters (``set_adapters`` chooses).
        ``hotswap=True`` replaces the loaded adapter ``adapter_name`` in place (same targets,
        rank within the reserved width): no recompilation. Nothing changes when the file is
        refused. Returns the adapter's name (default ``default_N``)."""
        name = adapters.load(self.transformer, pretrained_model_name_or_path_or_dict, adapter_name, scale, hotswap,
                             weight_name)
        self._lora_changed(structure=not hotswap)
        return name

    def set_adapters(self, adapter_names: Union[str, Sequence[str]],
                     adapter_weights: Union[None, float, Sequence[Optional[float]]] = None) -> None:
        """Run exactly ``adapter_names`` at ``adapter_weights`` (default 1.0 each)."""
        adapters.set_adapters(self.transformer, adapter_names, adapter_weights)
        self._lora_changed(structure=False)

    def disable_lora(self) -> None:
        adapters.set_enabled(self.transformer, False)
        self._lora_changed(structure=False)

    def enable_lora(self) -> None:
        adapters.set_enabled(self.transformer, True)
        self._lora_changed(structure=False)

    def get_active_adapters(self) -> List[str]:
        return adapters.active_adapters(self.transformer)

    def get_list_adapters(self) -> Dict[str, List[str]]:
        names = adapters.loaded_adapters(self.transformer)
        return {"transformer": names} if names else {}

    def delete_adapters(self, adapter_names: Union[str, Sequence[str]]) -> None:
        adapters.delete(self.transformer, adapter_names)
        self._lora_changed(structure=True)

    def unload_lora_weights(self) -> None:
        """Remove every adapter (fused ones stay in the weights, as in diffusers)."""
        adapters.unload(self.transformer)
        self._lora_changed(structure=True)

    def fuse_lora(self, components: Sequence[str] = ("transformer",), lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: Optional[Sequence[str]] = None) -> List[str]:
        """Add the active adapters (or ``adapter_names``) into the transformer's weights at
        their weights x ``lora_scale``: the fast path then runs at the base model's speed.
        ``unfuse_lora`` restores the original weights bit for bit. ``safe_fusing`` is
        accepted for diffusers compatibility (LoRA files are checked for NaN on load)."""
        if set(components) - {"transformer"}:
            from ..errors import InvalidValue

            raise InvalidValue(f"fuse_lora components={list(components)}: only 'transformer' has LoRA adapters")
        names = adapters.fuse(self.transformer, adapter_names, lora_scale)
        self._lora_changed(structure=True)
        return names

    def unfuse_lora(self, components: Sequence[str] = ("transformer",)) -> List[str]:
        names = adapters.unfuse(self.transformer)
        self._lora_changed(structure=True)
        return names

    def enable_lora_hotswap(self, target_rank: int) -> None:
        """Reserve ``target_rank`` rank columns for adapters loaded from now on, so that
        hot-swapping to any rank up to it recompiles nothing (call before the first load)."""
        adapters.set_target_rank(self.transformer, target_rank)
