"""The model stages: a CLIP/SigLIP image embedder, heads on its embedding (aesthetic MLP,
NSFW or watermark probability) and whole image classifiers, all loaded from local folders.

Formats (nothing is downloaded; weights are safetensors, never unpickled):

- embedder: a transformers folder (``config.json`` + ``model.safetensors`` +
  ``preprocessor_config.json``) of ``CLIPModel``, ``CLIPVisionModelWithProjection``,
  ``SiglipModel``/``Siglip2Model`` or their vision towers; an open_clip folder
  (``open_clip_config.json`` + ``open_clip_model.safetensors``) when open_clip imports; or
  ``toy`` (the toy world's scene embedding, ``toy_models.scene_embedding``).
- head (aesthetic, and NSFW/watermark on CLIP): a folder with ``head.safetensors`` holding a
  chain of linear layers ``<prefix>.<i>.weight/bias`` (the layout of LAION's improved
  aesthetic predictor, ``layers.0`` .. ``layers.6``, once saved as safetensors) and an optional
  ``head.json``: {"activation": "none"|"relu"|"gelu", "output": "score"|"sigmoid"|"softmax",
  "labels": [...]}. The head sees the L2-normalised embedding, as LAION's heads do.
- classifier (NSFW/watermark): a transformers image-classification folder
  (``AutoModelForImageClassification``: ViT, ConvNeXt, ...) whose ``id2label`` names the
  stage's labels; the score is the summed probability of those labels.
"""
from __future__ import annotations

import json
import os
import re
from typing import List, Optional

import numpy as np

from ..errors import InvalidValue, MissingDependency, MissingFile

EMBEDDER_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")


class WeightsNotConfigured(InvalidValue):
    pass


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _processor(folder: str):
    import transformers
    from transformers import AutoImageProcessor

    if not os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        raise MissingFile(f"{folder} has no preprocessor_config.json; expected the image processor saved "
                                "with the model (save_pretrained of its processor)")
    major = int(transformers.__version__.split(".")[0])
    kwargs = {"backend": "pil"} if major >= 5 else {"use_fast": False}  # the PIL path needs no torchvision
    return AutoImageProcessor.from_pretrained(folder, **kwargs)


def _check_folder(folder: str, what: str) -> dict:
    if not os.path.isdir(folder):
        raise MissingFile(f"{what} folder {folder!r} does not exist")
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise MissingFile(f"{folder} has no config.json; expected a transformers {what} folder")
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        raise MissingFile(f"{folder} holds no .safetensors weights; convert .bin/.pt weights to safetensors "
                                "(lens_fast never unpickles)")
    with open(config, encoding="utf-8") as f:
        return json.load(f)


class TransformersEmbedder:
    """Normalised image embeddings of a transformers CLIP or SigLIP folder."""

    def __init__(self, folder: str, device: str = "auto", batch_size: int = 64):
        import torch
        import transformers

        config = _check_folder(folder, "CLIP/SigLIP")
        kind = config.get("model_type")
        if kind not in EMBEDDER_TYPES:
            raise InvalidValue(f"{folder}: model_type {kind!r} is not an image embedder; expected one of "
                             f"{EMBEDDER_TYPES}")
        classes = {"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModelWithProjection",
                   "siglip": "SiglipModel", "siglip_vision_model": "SiglipVisionModel",
                   "siglip2": "Siglip2Model", "siglip2_vision_model": "Siglip2VisionModel"}
        cls = getattr(transformers, classes[kind])
        self.kind, self.device, self.batch_size = kind, _device(device), int(batch_size)
        self.model = cls.from_pretrained(folder, use_safetensors=True).to(self.device).eval()
        self.processor = _processor(folder)
        self.torch = torch

    def _forward(self, pixels):
        if self.kind in ("clip", "siglip", "siglip2"):
            out = self.model.get_image_features(pixel_values=pixels)
            return out if isinstance(out, self.torch.Tensor) else out.pooler_output
        out = self.model(pixel_values=pixels)
        return out.image_embeds if self.kind == "clip_vision_model" else out.pooler_output

    def __call__(self, images: List) -> np.ndarray:
        chunks = []
        with self.torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                batch = self.processor(images=images[i:i + self.batch_size], return_tensors="pt")
                emb = self._forward(batch["pixel_values"].to(self.device)).float()
                chunks.append(self.torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


class OpenClipEmbedder:
    def __init__(self, folder: str, device: str = "auto", batch_size: int = 64):
        try:
            import open_clip
            import torch
        except Exception as e:  # noqa: BLE001 - open_clip needs a torchvision that imports
            raise MissingDependency(f"{folder} is an open_clip folder but open_clip does not import here ({e}); install "
                              "open_clip_torch with a matching torchvision, or use the transformers copy of the "
                              "model (most open_clip models on the Hub ship one)") from None
        with open(os.path.join(folder, "open_clip_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        weights = os.path.join(folder, "open_clip_model.safetensors")
        if not os.path.isfile(weights):
            raise MissingFile(f"{folder} has no open_clip_model.safetensors (lens_fast never unpickles .bin)")
        name = cfg.get("model_name") or cfg.get("model_cfg", {}).get("name")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
        self.device, self.batch_size, self.torch = _device(device), int(batch_size), torch
        self.model, self.preprocess = model.to(self.device).eval(), preprocess

    def __call__(self, images: List) -> np.ndarray:
        chunks = []
        with self.torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                x = self.torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]).to(self.device)
                emb = self.model.encode_image(x).float()
                chunks.append(self.torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(chunks)


class ToyEmbedder:
    def __call__(self, images: List) -> np.ndarray:
        from .toy_models import scene_embedding

        return np.stack([scene_embedding(im) for im in images]) if images else np.zeros((0, 0), np.float32)


def load_embedder(model: Optional[str], device: str = "auto", batch_size: int = 64, needed_by: str = "dedup"):
    if not model:
        raise WeightsNotConfigured(
            f"the {needed_by} stage needs CLIP image embeddings but embedder.model is not set: give a local folder "
            "holding a transformers CLIP or SigLIP model (config.json, model.safetensors, preprocessor_config.json) "
            "or an open_clip folder (--embedder DIR), or turn the stage off")
    if model == "toy":
        return ToyEmbedder()
    if os.path.isfile(os.path.join(model, "open_clip_config.json")):
        return OpenClipEmbedder(model, device, batch_size)
    return TransformersEmbedder(model, device, batch_size)


class Head:
    """A chain of linear layers on the normalised embedding (see the module docstring)."""

    def __init__(self, folder: str):
        from safetensors.numpy import load_file

        path = os.path.join(folder, "head.safetensors")
        if not os.path.isfile(path):
            raise MissingFile(f"{folder} has no head.safetensors; expected the head's linear layers")
        tensors = load_file(path)
        layers = {}
        for name, t in tensors.items():
            m = re.fullmatch(r"(?:.*\.)?(\d+)\.(weight|bias)", name)
            if m is None:
                raise InvalidValue(f"{path}: tensor {name!r} is not '<prefix>.<index>.weight|bias' of a linear chain")
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = t.astype(np.float32)
        self.layers = [(layers[i]["weight"], layers[i].get("bias")) for i in sorted(layers)]
        for k in range(1, len(self.layers)):
            if self.layers[k][0].shape[1] != self.layers[k - 1][0].shape[0]:
                raise InvalidValue(f"{path}: layer shapes do not chain ({[w.shape for w, _ in self.layers]})")
        meta = {}
        if os.path.isfile(os.path.join(folder, "head.json")):
            with open(os.path.join(folder, "head.json"), encoding="utf-8") as f:
                meta = json.load(f)
        self.activation = meta.get("activation", "none")
        self.output = meta.get("output", "score")
        self.labels = meta.get("labels")
        if self.activation not in ("none", "relu", "gelu") or self.output not in ("score", "sigmoid", "softmax"):
            raise InvalidValue(f"{folder}/head.json: activation {self.activation!r} / output {self.output!r}; expected "
                             "activation none|relu|gelu and output score|sigmoid|softmax")
        self.input_dim = self.layers[0][0].shape[1]

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        if emb.shape[1] != self.input_dim:
            raise InvalidValue(f"the head takes {self.input_dim}-dim embeddings, the embedder gives {emb.shape[1]}")
        x = emb.astype(np.float32)
        for k, (w, b) in enumerate(self.layers):
            x = x @ w.T + (b if b is not None else 0.0)
            if k < len(self.layers) - 1 and self.activation == "relu":
                x = np.maximum(x, 0.0)
            elif k < len(self.layers) - 1 and self.activation == "gelu":
                x = 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))
        if self.output == "sigmoid":
            return 1.0 / (1.0 + np.exp(-x))
        if self.output == "softmax":
            e = np.exp(x - x.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        return x


def _label_columns(names: List[str], wanted: List[str], where: str, stage: str) -> List[int]:
    lower = [n.lower() for n in names]
    cols = [i for i, n in enumerate(lower) if n in {w.lower() for w in wanted}]
    if not cols:
        raise InvalidValue(f"{where} has labels {names}; none of {stage}.labels {wanted}: set {stage}.labels to the "
                         "label(s) that mean what the stage drops")
    return cols


class ClassifierScore:
    """Probability of ``labels``: from a head folder (on the embedding) or a transformers
    image classifier folder (on the image)."""

    def __init__(self, stage: str, folder: Optional[str], labels: List[str], device: str = "auto",
                 batch_size: int = 64):
        if not folder:
            raise WeightsNotConfigured(
                f"the {stage} stage is on but {stage}.model is not set: give a local folder holding a transformers "
                f"image classifier (config.json with id2label, model.safetensors, preprocessor_config.json) or a head "
                f"on CLIP embeddings (head.safetensors, head.json), or turn it off (--no-{stage})")
        self.stage, self.batch_size = stage, int(batch_size)
        if os.path.isfile(os.path.join(folder, "head.safetensors")):
            self.head, self.uses_embedding = Head(folder), True
            if self.head.output == "sigmoid":
                self.columns = [0]
            else:
                names = self.head.labels or []
                self.columns = _label_columns(names, labels, f"{folder}/head.json", stage)
            return
        import torch
        from transformers import AutoModelForImageClassification

        _check_folder(folder, "image classifier")
        self.head, self.uses_embedding, self.torch = None, False, torch
        self.device = _device(device)
        model = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True)
        self.model = model.to(self.device).eval()
        self.processor = _processor(folder)
        names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.columns = _label_columns(names, labels, folder, stage)
        self.multi_label = self.model.config.problem_type == "multi_label_classification"

    def __call__(self, images: List, emb: Optional[np.ndarray]) -> np.ndarray:
        if self.head is not None:
            return self.head(emb)[:, self.columns].sum(axis=1)
        out = []
        with self.torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                batch = self.processor(images=images[i:i + self.batch_size], return_tensors="pt")
                logits = self.model(pixel_values=batch["pixel_values"].to(self.device)).logits.float()
                probs = logits.sigmoid() if self.multi_label else logits.softmax(-1)
                out.append(probs[:, self.columns].sum(-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class AestheticScore:
    def __init__(self, folder: Optional[str]):
        if not folder:
            raise WeightsNotConfigured(
                "the aesthetic stage is on but aesthetic.model is not set: give a local folder holding the MLP head "
                "on CLIP embeddings (head.safetensors, e.g. LAION's improved aesthetic predictor converted to "
                "safetensors), or turn it off (--no-aesthetic)")
        self.head = Head(folder)
        self.uses_embedding = True

    def __call__(self, images: List, emb: np.ndarray) -> np.ndarray:
        return self.head(emb)[:, 0]
