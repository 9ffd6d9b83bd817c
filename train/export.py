"""Export of a distilled student as a Turbo checkpoint folder in the diffusers layout.

``transformer/`` holds the student with the official config fields and state-dict keys
(what ``microsoft/Lens-Turbo`` holds); ``model_index.json`` is the teacher's (or a
Lens one) with ``"_lens_variant": "lens-turbo"``, which ``LensPipeline``,
``lens-fast generate`` and the inference engine read to default to 4 steps and guidance
1 (diffusers ignores keys that start with an underscore). The teacher's other
components (``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) come along
as hard links where the file system allows (no extra space), else as copies; a
teacher that is only a transformer folder gives the Lens scheduler config and no VAE or
text encoder (a pixel-space toy, for example).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional

import torch

from lens_fast.errors import OutputExists
from lens_fast.models.config import read_json
from lens_fast.tiny import SCHEDULER

from . import checkpoint as ckpt

TURBO = "lens-turbo"
COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer")
LENS_INDEX = {"_class_name": "LensPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "text_encoder": [None, None], "tokenizer": [None, None],
              "transformer": ["diffusers", "LensTransformer2DModel"], "vae": [None, None]}


def _link_or_copy_tree(src: str, dst: str) -> None:
    """``src`` as a new folder ``dst``, files hard-linked (copied across file systems),
    written beside it and renamed into place."""
    tmp = os.path.join(os.path.dirname(dst), f".tmp-{os.path.basename(dst)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for here, _, files in os.walk(src):
        out = os.path.join(tmp, os.path.relpath(here, src))
        os.makedirs(out, exist_ok=True)
        for name in files:
            try:
                os.link(os.path.join(here, name), os.path.join(out, name))
            except OSError:
                shutil.copy2(os.path.join(here, name), os.path.join(out, name))
    os.replace(tmp, dst)


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def export_turbo_folder(folder: str, model_config: dict, state_dict: Dict[str, torch.Tensor],
                        teacher_root: Optional[str], overwrite: bool = False) -> str:
    """Write the student ``state_dict`` as a Turbo checkpoint folder; components come
    from ``teacher_root`` (a checkpoint root) when it has them. Without ``overwrite`` a
    folder that holds anything is refused before anything is written; with it (a run's
    own export) the transformer is replaced and present components are kept."""
    if not overwrite and os.path.isdir(folder) and os.listdir(folder):
        raise OutputExists(f"{folder} already holds files; choose a new or empty folder for the export")
    os.makedirs(folder, exist_ok=True)
    ckpt.export_transformer(os.path.join(folder, "transformer"), model_config, state_dict, overwrite=overwrite)
    teacher_index = os.path.join(teacher_root or "", "model_index.json")
    index = dict(read_json(teacher_index)) if teacher_root and os.path.isfile(teacher_index) else dict(LENS_INDEX)
    for name in COMPONENTS:
        src = os.path.join(teacher_root, name) if teacher_root else None
        dst = os.path.join(folder, name)
        listed = isinstance(index.get(name), list) and index[name][0] is not None
        if listed and src and os.path.isdir(src):
            if not os.path.isdir(dst):
                _link_or_copy_tree(src, dst)
        elif name == "scheduler":
            os.makedirs(dst, exist_ok=True)
            _write_json(os.path.join(dst, "scheduler_config.json"), SCHEDULER)
            index[name] = list(LENS_INDEX[name])
        else:
            index[name] = [None, None]
    index["_lens_variant"] = TURBO
    _write_json(os.path.join(folder, "model_index.json"), index)
    return folder
