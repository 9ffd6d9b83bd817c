"""Text-encoder side of the engine: an embedding cache and offloading.

Cache. Keyed by (prompts of the call, template date, max_sequence_length, device). The
whole call's prompt tuple is the key, not each prompt: the features at a prompt's pad
positions depend on what it was batched with, and the reference attends to those
positions in blocks 1.. (it masks text in block 0 only), so re-padding per-prompt cache
entries could change results. The typical repeated single prompt hits. The template
date is part of the key because the official chat template stamps the current date into
the prefix: without a fixed ``template_date`` the key carries today's date, so entries
expire at midnight instead of returning yesterday's encoding.

Offload. ``model`` mode keeps the encoder on the CPU and moves it to the pipeline's
device for each encoding that misses the cache, then back. ``sequential`` mode never
holds the whole encoder on the GPU: the decoder layers (the encoder's largest
``nn.ModuleList``) stay on the CPU and each one is moved in by a forward pre-hook and
out by a forward hook; the rest (embeddings, norms, rotary tables) visits the device for
the duration of the encode. GPT-OSS-20B in bf16 is ~42 GB, so a 24 GB card needs
``sequential`` (peak ~ one layer, ~1.7 GB, plus the embeddings, ~1.2 GB).
"""
from __future__ import annotations

import datetime
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import torch

OFFLOAD_MODES = ("model", "sequential")


class PromptCache:
    """A small LRU of ``key -> (features list, mask)``."""

    def __init__(self, size: int = 32):
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"text cache size={size!r}: expected an integer >= 0 (0 disables the cache)")
        self.size = size
        self._entries: "OrderedDict[tuple, Tuple[List[torch.Tensor], torch.Tensor]]" = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            feats, mask = self._entries[key]
            return list(feats), mask
        self.misses += 1
        return None

    def put(self, key, feats, mask) -> None:
        if self.size == 0:
            return
        self._entries[key] = (list(feats), mask)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def cache_key(text_encoder, prompts: List[str], max_sequence_length: int, device) -> tuple:
    date = getattr(text_encoder, "template_date", None) or datetime.date.today().isoformat()
    return tuple(prompts), str(date), int(max_sequence_length), str(torch.device(device))


def torch_module(text_encoder) -> torch.nn.Module:
    """The ``nn.Module`` holding the encoder's weights (the encoder itself, or the first
    module-valued attribute of a wrapper such as ``LensTextEncoder``)."""
    if isinstance(text_encoder, torch.nn.Module):
        return text_encoder
    for value in vars(text_encoder).values():
        if isinstance(value, torch.nn.Module):
            return value
    raise TypeError(f"{type(text_encoder).__name__} holds no torch.nn.Module; cannot offload it layer by layer")


def largest_module_list(module: torch.nn.Module) -> torch.nn.ModuleList:
    best, best_n = None, -1
    for m in module.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = m, n
    if best is None:
        raise TypeError(f"{type(module).__name__} has no nn.ModuleList of layers to stream")
    return best


class TextEncoderOffload:
    """Runs an encode with the encoder brought to ``device`` on demand (module docstring)."""

    def __init__(self, text_encoder, mode: str = "model", home="cpu"):
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"offload mode={mode!r}; expected one of {OFFLOAD_MODES}")
        self.text_encoder, self.mode, self.home = text_encoder, mode, torch.device(home)
        self.layer_moves = 0
        if mode == "sequential":
            self.module = torch_module(text_encoder)
            self.layers = largest_module_list(self.module)
            in_layers = {id(m) for m in self.layers.modules()}
            self._rest = [m for m in self.module.modules() if id(m) not in in_layers]
        text_encoder.to(self.home)

    def _move_rest(self, device) -> None:
        for m in self._rest:
            m._apply(lambda t: t.to(device), recurse=False)

    def run(self, device, encode: Callable[[], tuple]) -> tuple:
        device = torch.device(device)
        if self.mode == "model":
            self.text_encoder.to(device)
            try:
                return encode()
            finally:
                self.text_encoder.to(self.home)
                _empty_cache(device)
        handles = []

        def bring(layer, _args):
            layer.to(device)
            self.layer_moves += 1

        def send(layer, _args, _out):
            layer.to(self.home)

        for layer in self.layers:
            handles += [layer.register_forward_pre_hook(bring), layer.register_forward_hook(send)]
        self._move_rest(device)
        try:
            return encode()
        finally:
            for h in handles:
                h.remove()
            self.layers.to(self.home)
            self._move_rest(self.home)
            _empty_cache(device)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class TextEncoding:
    """The prompt cache and the offload a pipeline puts in front of its text encoder
    (``LensPipeline.text_encoding``; ``LensPipeline._encode`` calls it)."""

    def __init__(self, cache_size: int = 32, offload: Optional[TextEncoderOffload] = None):
        self.cache = PromptCache(cache_size)
        self.offload = offload

    def __call__(self, text_encoder, prompts: List[str], max_sequence_length: int, device,
                 encode: Callable[[], Tuple[List[torch.Tensor], torch.Tensor]]):
        """``encode()`` (the encoder's own call) answered from the cache, else run with the
        encoder brought to ``device`` when offloading; returns (features list, mask)."""
        key = cache_key(text_encoder, prompts, max_sequence_length, device)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        feats, mask = self.offload.run(device, encode) if self.offload is not None else encode()
        self.cache.put(key, feats, mask)
        return list(feats), mask
