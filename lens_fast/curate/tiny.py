"""Tiny random models in the formats the model stages load, for tests and smoke runs:
the same architectures as the real weights (transformers CLIP, SigLIP, ViT classifier; an
MLP head laid out as LAION's aesthetic predictor), a few kilobytes each."""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import numpy as np

_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8)
_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=16)


def _save(model, processor, folder: str) -> str:
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def make_tiny_clip(folder: str, projection_dim: int = 16, seed: int = 0) -> str:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(vision_config=_VISION, text_config=_TEXT, projection_dim=projection_dim))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _save(model, processor, folder)


def make_tiny_siglip_vision(folder: str, seed: int = 0) -> str:
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**_VISION))
    return _save(model, SiglipImageProcessor(size={"height": 32, "width": 32}), folder)


def make_tiny_classifier(folder: str, labels: Sequence[str], seed: int = 0) -> str:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(**_VISION, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={name: i for i, name in enumerate(labels)})
    return _save(ViTForImageClassification(config), ViTImageProcessor(size={"height": 32, "width": 32}), folder)


def make_tiny_head(folder: str, dims: Sequence[int], activation: str = "none", output: str = "score",
                   labels: Optional[List[str]] = None, seed: int = 0, prefix: str = "layers") -> str:
    """A linear chain dims[0] -> ... -> dims[-1] saved as ``<prefix>.<2i>.weight/bias`` (the
    index steps by 2 as in LAION's Linear/Dropout Sequential)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        tensors[f"{prefix}.{2 * i}.weight"] = rng.normal(0, 1 / np.sqrt(a), (b, a)).astype(np.float32)
        tensors[f"{prefix}.{2 * i}.bias"] = rng.normal(0, 0.1, b).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "head.safetensors"))
    meta = {"activation": activation, "output": output}
    if labels:
        meta["labels"] = list(labels)
    with open(os.path.join(folder, "head.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return folder
