"""One path that builds every model of a run, trained or frozen, as torchtitan's build
functions do: meta device -> activation checkpointing (trained only) -> compile ->
FSDP2 -> materialise from a folder (or the init rule), one parameter at a time.

A trained model keeps float32 master weights (FSDP casts them to ``param_dtype`` for
compute); a frozen one (a distillation teacher, an RL reference policy) is stored in
its own dtype (bf16 halves its memory), has no gradients and stays in eval mode.

Also here: the checks that turn a folder a user names (``--teacher``,
``--pretrained``) into a Lens transformer folder with one clear error otherwise, and
the content fingerprint a run records so that a resume with other weights is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch

from lens_fast.errors import InvalidValue, MissingFile
from lens_fast.models.config import LensTransformerConfig, read_json
from lens_fast.models.loading import find_weight_files
from lens_fast.models.transformer import LensTransformer2DModel

from .parallel import (apply_activation_checkpointing, apply_compile, apply_fsdp, dtype_of, init_rule, materialize,
                       pretrained_values)


def build_model(model_config: dict, parallel, device, fsdp: bool, *, folder: Optional[str] = None,
                seed: int = 0, model: Optional[LensTransformer2DModel] = None, trainable: bool = True,
                dtype: torch.dtype = torch.float32, adapters=None) -> LensTransformer2DModel:
    """A model ready to run: ``model`` taken over as given, or built on the meta device
    and filled from ``folder`` (a diffusers transformer folder) or the init rule for
    ``seed``. ``parallel`` is the config's ParallelConfig. ``trainable=False`` gives a
    frozen model stored in ``dtype`` (requires_grad off, eval mode, no checkpointing).
    ``adapters`` (a ``lens_fast.lora.trainable.LoraSpec``): a frozen base with trainable
    LoRA adapters, added before FSDP2 shards the model and initialised by the spec.
    Options such as ``mask_every_block`` come with ``model_config`` (or the model given)."""
    built = model is None
    if built:
        with torch.device("meta"):
            model = LensTransformer2DModel(**model_config)
    if not trainable:
        model.requires_grad_(False)
        model.to(dtype=dtype)
        model.eval()
    elif not built:
        model.to(device=device, dtype=torch.float32)
    if adapters is not None:
        adapters.attach(model)
        if not built:
            adapters.initialize(model)
    if trainable:
        model.train()
        apply_activation_checkpointing(model, parallel.activation_checkpointing, parallel.ac_every)
    if parallel.compile:
        apply_compile(model)
    if fsdp:
        compute = dtype_of(parallel.param_dtype) if trainable else dtype
        apply_fsdp(model, compute, dtype_of(parallel.reduce_dtype), parallel.reshard_after_forward)
    if built:
        base = pretrained_values(folder) if folder else (lambda name, shape: init_rule(name, shape, seed))
        value = base if adapters is None else (
            lambda name, shape: _first(adapters.initial_value(name, shape), base, name, shape))
        materialize(model, value, device)
        if adapters is not None:
            adapters.finish(model)
    elif not trainable:
        model.to(device=device)
    return model


def _first(value: Optional[torch.Tensor], fallback, name: str, shape) -> torch.Tensor:
    return value if value is not None else fallback(name, shape)


def model_folder(path: str, what: str) -> str:
    """The transformer folder of ``path`` (a checkpoint root holding transformer/, or a
    transformer folder), checked to hold a Lens config and safetensors weights; the error
    names ``what`` (e.g. "--teacher") and the path."""
    if not os.path.exists(path):
        raise MissingFile(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise InvalidValue(f"{what} {path} is not a folder; expected a Lens checkpoint folder (diffusers layout)")
    folder = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "transformer")
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise InvalidValue(f"{what} {path} is not a Lens checkpoint: it has neither transformer/config.json nor "
                         "config.json")
    data = read_json(config)
    name = data.get("_class_name") if isinstance(data, dict) else None
    if name not in (None, LensTransformer2DModel.__name__):
        raise InvalidValue(f"{what} {path}: {config} describes a {name}, not a {LensTransformer2DModel.__name__}")
    LensTransformerConfig.from_dict(data, source=config)
    find_weight_files(folder, LensTransformer2DModel.weights_name)
    return folder


def folder_config(folder: str) -> dict:
    """The (validated) model config of a transformer folder, as plain JSON data."""
    return json.loads(json.dumps(dict(LensTransformerConfig.from_json_file(os.path.join(folder, "config.json")))))


def config_difference(a: dict, b: dict) -> list:
    """The keys whose values differ between two model configs."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def folder_fingerprint(folder: str) -> str:
    """A BLAKE2b digest of a transformer folder's config and weight bytes (every file,
    whole: two checkpoints of one architecture differ only in their bytes)."""
    files, _ = find_weight_files(folder, LensTransformer2DModel.weights_name)
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(folder_config(folder), sort_keys=True).encode())
    for path in files:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 24)
                if not chunk:
                    break
                h.update(chunk)
    return h.hexdigest()
