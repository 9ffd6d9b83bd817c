"""Recipe ``lora``: LoRA adapters on a frozen Lens base, on the trainer's one loop.

The base (``model.pretrained``) is built by the trainer's one build path with the
adapters added before FSDP2 shards it (``lens_fast.lora.trainable.LoraSpec``): the base
is frozen and stored in ``lora.base_dtype``, the adapters are float32 parameters that
AdamW, the gradient clipping and the EMA (when on) see alone. The loss is pre-training's
(flow matching). Checkpoints hold the adapters and their optimiser state only (the base is
reloaded from its folder; a resume checks its fingerprint and the adapter settings).
The export is diffusers' LoRA layout, ``DIR/export/lora/pytorch_lora_weights.safetensors``
(``transformer.M.lora_A.weight`` / ``lora_B.weight`` and ``lora_adapter_metadata``), which
``LensPipeline.load_lora_weights`` and diffusers' ``load_lora_adapter`` read.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from lens_fast.errors import InvalidValue
from lens_fast.lora.formats import save_file
from lens_fast.lora.trainable import LoraSpec, resolve_targets, trained_modules
from lens_fast.models.transformer import LensTransformer2DModel

from .build import folder_fingerprint, model_folder
from .distill import _broadcast
from .parallel import dtype_of
from .recipe import Recipe

SETTINGS = ("rank", "alpha", "targets")


class LoraRecipe(Recipe):
    name = "lora"

    def start_folder(self, cfg) -> Optional[str]:
        if not cfg.model.pretrained:
            raise InvalidValue("recipe lora trains adapters on a base model: give it with --pretrained FOLDER "
                               "(model.pretrained), a Lens checkpoint folder")
        self.base_root = os.path.abspath(cfg.model.pretrained)
        return model_folder(cfg.model.pretrained, "--pretrained")

    def spec(self, cfg) -> LoraSpec:
        lo = cfg.lora
        return LoraSpec(lo.rank, lo.alpha, list(lo.targets), cfg.train.seed, dtype_of(lo.base_dtype))

    def prepare(self, trainer) -> dict:
        cfg = trainer.cfg
        with torch.device("meta"):  # the targets must name modules before anything is written
            modules = resolve_targets(LensTransformer2DModel(**trainer.model_config), cfg.lora.targets)
        folder = model_folder(cfg.model.pretrained, "--pretrained")
        fingerprint = _broadcast(folder_fingerprint(folder) if trainer.dist.is_main else None, trainer.dist.is_main)
        self.record = {"name": self.name, "base": self.base_root, "base_fingerprint": fingerprint,
                       **{k: getattr(cfg.lora, k) for k in SETTINGS}, "modules": len(modules)}
        return self.record

    def check_resume(self, saved: Optional[dict], run_dir: str) -> None:
        super().check_resume(saved, run_dir)
        if saved.get("base_fingerprint") != self.record["base_fingerprint"]:
            raise InvalidValue(f"--resume into {run_dir}: its adapters were trained on {saved.get('base')} (weights "
                               f"{saved.get('base_fingerprint')}); --pretrained {self.base_root} holds other weights "
                               f"({self.record['base_fingerprint']}). Resume with the same base or use a new --out")
        changed = [k for k in SETTINGS if saved.get(k) != self.record[k]]
        if changed:
            raise InvalidValue(f"--resume into {run_dir}: lora {', '.join(changed)} differ from the run's "
                               f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); resume with the same "
                               "adapter settings or use a new --out")

    def build(self, trainer, model, folder) -> None:
        self.adapters = self.spec(trainer.cfg)
        trainer.add_part("model", trainer.build(model=model, folder=folder, adapters=self.adapters),
                         ema=trainer.cfg.ema.enabled)

    def export_path(self, run_dir: str) -> str:
        return os.path.join(run_dir, "export", "lora")

    def export(self, trainer, folder: str, state_dict, overwrite: bool) -> str:
        modules = trained_modules(state_dict, self.adapters.scaling)
        save_file(folder, modules, overwrite=overwrite,
                  extra_metadata={"lens_fast.base": self.base_root, "lens_fast.step": str(trainer.step)})
        return folder
