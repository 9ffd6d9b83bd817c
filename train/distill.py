"""Recipe ``distill``: Decoupled DMD of a Lens teacher into a few-step, CFG-free
student (a Turbo), on the trainer's one loop (method, equations and sources:
``train/distill.md``; the math: ``train/dmd.py``).

Models, all through the trainer's one build path: the student (primary: sampled,
EMA'd, exported) and the fake score, both trained with AdamW and initialised from the
teacher (the student from ``model.pretrained`` when given, same config required), and
the frozen teacher (``distill.teacher_dtype``, no optimiser, never checkpointed: it is
reloaded from its folder, and a resume checks its fingerprint).

One trainer step = ``distill.fake_updates`` fake-score updates (flow matching on
detached student images) followed by one student update (DM + CA through the proxy
loss), on the same micro-batches of prompts. Every random draw is keyed by (seed, step,
data rank, stream); the simulated step index by (seed, step) alone, so every rank runs
the same number of forwards (FSDP) and a step is the same for any world size.
"""
from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from lens_fast.errors import InvalidValue
from lens_fast.sampling import add_noise

from .build import config_difference, folder_config, folder_fingerprint, model_folder
from .dmd import (dmd_direction, generate, proxy_loss, renoise_sigmas, simulate, teacher_x0, turbo_schedule, velocity,
                  x0_estimate)
from .export import export_turbo_folder
from .loss import flow_matching_loss, step_generator
from .parallel import dtype_of
from .recipe import Recipe

# Generator streams (pre-training uses 0-2): the student update's, and per fake update j
# a block of FAKE_STREAMS starting at FAKE_BASE + FAKE_STREAMS * j.
STEP_INDEX, SIM_NOISE, DM_NOISE, DM_SIGMA, CA_NOISE, CA_SIGMA = 3, 4, 5, 6, 7, 8
FAKE_BASE, FAKE_STREAMS = 16, 8  # + 0: step index, 1: simulation noise, 2-4: flow-matching noise, sigma, dropout


def fake_stream(j: int, offset: int) -> int:
    return FAKE_BASE + FAKE_STREAMS * j + offset


def step_index(seed: int, step: int, stream: int, steps: int) -> int:
    """The schedule step the student is trained at, the same on every rank."""
    g = step_generator(seed, step, 0, stream, "cpu")
    return int(torch.randint(steps, (1,), generator=g))


def _broadcast(value, main: bool):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value if main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


class DistillRecipe(Recipe):
    name = "distill"

    def start_folder(self, cfg) -> Optional[str]:
        d = cfg.distill
        if not d.teacher:
            raise InvalidValue("recipe distill needs a teacher: --teacher FOLDER (distill.teacher), a Lens "
                             "checkpoint folder")
        self.teacher_root = os.path.abspath(d.teacher)
        self.teacher_folder = model_folder(d.teacher, "--teacher")
        if cfg.model.pretrained:
            return model_folder(cfg.model.pretrained, "--pretrained")
        return self.teacher_folder

    def prepare(self, trainer) -> dict:
        teacher_config = folder_config(self.teacher_folder)
        diff = config_difference(teacher_config, trainer.model_config)
        if diff:
            raise InvalidValue(f"--teacher {self.teacher_root}: its model config differs from the student's in "
                             f"{diff}; a student has its teacher's architecture (start it from the teacher, or "
                             "from --pretrained weights of the same config)")
        fingerprint = _broadcast(folder_fingerprint(self.teacher_folder) if trainer.dist.is_main else None,
                                 trainer.dist.is_main)
        self.record = {"name": self.name, "teacher": self.teacher_root, "teacher_fingerprint": fingerprint}
        return self.record

    def check_resume(self, saved: Optional[dict], run_dir: str) -> None:
        super().check_resume(saved, run_dir)
        if saved.get("teacher_fingerprint") != self.record["teacher_fingerprint"]:
            raise InvalidValue(f"--resume into {run_dir}: its run distilled the teacher {saved.get('teacher')} "
                             f"(weights {saved.get('teacher_fingerprint')}); --teacher {self.teacher_root} holds "
                             f"other weights ({self.record['teacher_fingerprint']}). Resume with the same "
                             "teacher or use a new --out")

    def build(self, trainer, model, folder) -> None:
        cfg = trainer.cfg
        d, o = cfg.distill, cfg.optim
        trainer.add_part("model", trainer.build(model=model, folder=folder), ema=cfg.ema.enabled)
        trainer.add_part("fake", trainer.build(folder=self.teacher_folder), lr_scale=(d.fake_lr or o.lr) / o.lr)
        self.teacher_dtype = dtype_of(d.teacher_dtype)
        teacher = trainer.build(folder=self.teacher_folder, trainable=False, dtype=d.teacher_dtype)
        trainer.add_part("teacher", teacher, trainable=False)

    # -- one step -------------------------------------------------------------------------
    def update(self, trainer) -> Dict[str, torch.Tensor]:
        batches = list(trainer.micro_batches())
        fake_losses = []
        for j in range(trainer.cfg.distill.fake_updates):
            loss, fake_norm, _ = trainer.optimize(trainer.parts["fake"], partial(self.fake_loss, trainer, j),
                                                  batches)
            fake_losses.append(loss)
        loss, norm, metrics = trainer.optimize(trainer.parts["model"], partial(self.student_loss, trainer),
                                               batches)
        return {"loss": loss, "grad_norm": norm, "fake_loss": torch.stack(fake_losses).mean(),
                "fake_grad_norm": fake_norm, **metrics}

    def _student_image(self, trainer, batch, data_rank: int, index_stream: int, noise_stream: int,
                       grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the student's image at a schedule step drawn from ``index_stream``, that
        step's sigma): backward simulation without gradients, then the last step."""
        cfg = trainer.cfg
        seed, step = cfg.train.seed, trainer.step
        b, n, c = batch.latents.shape
        dev = batch.latents.device
        sigmas, times = turbo_schedule(cfg.distill.steps, n, dev)
        k = step_index(seed, step, index_stream, cfg.distill.steps)
        noise = torch.randn((b, n, c), generator=step_generator(seed, step, data_rank, noise_stream, dev),
                            device=dev)
        student = trainer.parts["model"].model
        x_k = simulate(student, noise, batch.text, batch.text_mask, batch.img_shapes, sigmas, times, k)
        with torch.set_grad_enabled(grad):
            x_gen = generate(student, x_k, k, batch.text, batch.text_mask, batch.img_shapes, sigmas, times)
        return x_gen, sigmas[k]

    def fake_loss(self, trainer, j: int, batch, data_rank: int) -> torch.Tensor:
        """Flow matching of the fake score on a fresh, detached student image."""
        cfg = trainer.cfg
        x_gen, _ = self._student_image(trainer, batch, data_rank, fake_stream(j, 0), fake_stream(j, 1), grad=False)
        fm = dataclasses.replace(cfg.loss, caption_dropout=0.0)
        return flow_matching_loss(trainer.parts["fake"].model, x_gen, batch.text, batch.text_mask,
                                  batch.img_shapes, fm, cfg.train.seed, trainer.step, data_rank,
                                  streams=(fake_stream(j, 2), fake_stream(j, 3), fake_stream(j, 4)))

    def student_loss(self, trainer, batch, data_rank: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        x_gen, sigma_k = self._student_image(trainer, batch, data_rank, STEP_INDEX, SIM_NOISE, grad=True)
        direction, metrics = self.direction(trainer, x_gen.detach(), batch, data_rank, float(sigma_k))
        return proxy_loss(x_gen, direction), metrics

    @torch.no_grad()
    def direction(self, trainer, x_gen: torch.Tensor, batch, data_rank: int, sigma_k: float):
        """The DM + CA direction for the student's image (``dmd.dmd_direction``) with
        the re-noising of ``distill.schedule``: hybrid (CA below the student's sigma,
        DM anywhere, Decoupled DMD) or coupled (one sigma for both, classic DMD)."""
        cfg = trainer.cfg
        d, seed, step = cfg.distill, cfg.train.seed, trainer.step
        b, n, _ = x_gen.shape
        dev = x_gen.device
        low, high = d.sigma_range

        def draw(sigma_stream, noise_stream, top):
            u = torch.rand(b, generator=step_generator(seed, step, data_rank, sigma_stream, dev), device=dev)
            sigma = renoise_sigmas(u, n, cfg.loss, low, max(low, min(high, top))).to(dev)
            eps = torch.randn(x_gen.shape, generator=step_generator(seed, step, data_rank, noise_stream, dev),
                              device=dev)
            return sigma, add_noise(x_gen, eps, sigma)

        teacher, fake = trainer.parts["teacher"].model, trainer.parts["fake"].model
        cond = (batch.text, batch.text_mask, batch.img_shapes)
        s_dm, x_dm = draw(DM_SIGMA, DM_NOISE, high)
        fake_dm = x0_estimate(x_dm, velocity(fake, x_dm, s_dm, *cond), s_dm)
        if d.schedule == "coupled":
            real_dm, guided = teacher_x0(teacher, x_dm, s_dm, *cond, d.guidance, self.teacher_dtype)
            cond_ca = real_dm
        else:
            real_dm, _ = teacher_x0(teacher, x_dm, s_dm, *cond, None, self.teacher_dtype)
            s_ca, x_ca = draw(CA_SIGMA, CA_NOISE, sigma_k)
            cond_ca, guided = teacher_x0(teacher, x_ca, s_ca, *cond, d.guidance, self.teacher_dtype)
        return dmd_direction(x_gen, real_dm, fake_dm, cond_ca, guided, d.dm_weight, d.ca_weight)

    def forwards(self, cfg) -> float:
        """Model forwards per sample and step (backward = 2 forwards): the simulation's
        expected (steps - 1) / 2, the student's forward + backward, the teacher's 2 (coupled)
        or 3 (hybrid) and the fake's 1; per fake update the simulation, the image and the
        fake's forward + backward."""
        d = cfg.distill
        sim = (d.steps - 1) / 2
        teacher = 2 if d.schedule == "coupled" else 3
        return sim + 3 + teacher + 1 + d.fake_updates * (sim + 1 + 3)

    def sample_settings(self, cfg) -> Tuple[int, float]:
        return cfg.distill.steps, 1.0

    def export_path(self, run_dir: str) -> str:
        return os.path.join(run_dir, "export")

    def export(self, trainer, folder: str, state_dict, overwrite: bool) -> str:
        return export_turbo_folder(folder, trainer.model_config, state_dict, self.teacher_root, overwrite=overwrite)
