"""Recipes: what a run trains, on the one loop of ``Trainer``.

The trainer owns the loop and everything shared: the process group, data, learning
rate, gradient accumulation and clipping (``Trainer.optimize``), EMA, logging,
checkpoints (every part's model and optimiser, the step, the RNG and data positions),
sample grids and export. A recipe brings the rest:

- ``start_folder``: the folder the trained model starts from (None: init rule);
- ``prepare``: checks on its own inputs before anything is built or written, and the
  record kept in ``run.json`` (``check_resume`` compares a resumed run against it);
- ``build``: its models, through ``Trainer.add_part`` (trained: optimiser, optional
  EMA) and ``Trainer.build`` (the one meta -> FSDP2 -> load path, trained or frozen);
- ``data_source``: the run's DataSource when none is given (default: ``data`` section);
- ``update``: one training step (any number of optimiser updates) returning its
  metrics (``loss`` at least; ``*grad_norm`` metrics are logged as computed, the
  others averaged over ranks);
- ``forwards``: model forwards per sample and step, for the FLOP counter;
- ``sample_settings`` and ``export``: how the trained model samples and is saved.

``PretrainRecipe`` is pre-training and fine-tuning (the flow-matching loss);
``lens_fast.train.distill.DistillRecipe`` is Decoupled-DMD distillation;
``lens_fast.train.rl.RLRecipe`` is online RL (DiffusionNFT).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from lens_fast.errors import InvalidValue
from . import checkpoint as ckpt
from .builders import build_data_source, pretrained_folder
from .loss import flow_matching_loss
from .parallel import EMA


@dataclass
class Part:
    """One model of a run. The primary part (the model that is sampled and exported) is
    checkpointed under the keys ``model`` / ``optim`` / ``ema``, the others under
    ``<name>`` / ``<name>_optim``; frozen parts (no optimiser) are rebuilt from their
    folder and never checkpointed, unless ``stateful`` (a part without optimiser whose
    weights the recipe changes itself, such as RL's old policy: saved under ``<name>``)."""

    name: str
    model: nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    ema: Optional[EMA] = None
    primary: bool = False
    lr_scale: float = 1.0  # the part's learning rate = lr_scale x the schedule's
    stateful: bool = False

    @property
    def params(self) -> List[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]] if self.optimizer else []

    @property
    def model_key(self) -> str:
        return "model" if self.primary else self.name

    @property
    def optim_key(self) -> str:
        return "optim" if self.primary else f"{self.name}_optim"


class Recipe:
    """Pre-training / fine-tuning; the base of every recipe (see the module docstring)."""

    name = "pretrain"

    def start_folder(self, cfg) -> Optional[str]:
        return pretrained_folder(cfg.model.pretrained)

    def prepare(self, trainer) -> dict:
        return {"name": self.name}

    def check_resume(self, saved: Optional[dict], run_dir: str) -> None:
        name = (saved or {}).get("name", "pretrain")  # runs written before recipes existed
        if name != self.name:
            raise InvalidValue(f"--resume into {run_dir}: its run used recipe {name!r}; this run is {self.name!r}. "
                             "Resume with the same recipe or use a new --out")

    def build(self, trainer, model: Optional[nn.Module], folder: Optional[str]) -> None:
        trainer.add_part("model", trainer.build(model=model, folder=folder), ema=trainer.cfg.ema.enabled)

    def data_source(self, trainer):
        return build_data_source(trainer.cfg, trainer.model_config, trainer.device)

    def update(self, trainer) -> Dict[str, torch.Tensor]:
        loss, norm, _ = trainer.optimize(trainer.parts["model"], trainer.compute_loss, trainer.micro_batches())
        return {"loss": loss, "grad_norm": norm}

    def loss(self, trainer, batch, data_rank: int) -> torch.Tensor:
        cfg = trainer.cfg
        return flow_matching_loss(trainer.model, batch.latents, batch.text, batch.text_mask, batch.img_shapes,
                                  cfg.loss, cfg.train.seed, trainer.step, data_rank)

    def forwards(self, cfg) -> float:
        return 3.0  # forward + backward

    def sample_settings(self, cfg) -> Tuple[int, float]:
        return cfg.logging.sample_steps, cfg.logging.sample_guidance

    def export_path(self, run_dir: str) -> str:
        return os.path.join(run_dir, "export", "transformer")

    def export(self, trainer, folder: str, state_dict: Dict[str, torch.Tensor], overwrite: bool) -> str:
        return ckpt.export_transformer(folder, trainer.model_config, state_dict, overwrite=overwrite)


PretrainRecipe = Recipe
