"""The Lens trainer: one process or many (torchrun), FSDP2, EMA, checkpoints, logging.

Each step is an overridable method (``train_step``, ``compute_loss``, ``lr_at``,
``log_step``, ``maybe_checkpoint``, ``maybe_sample``), as in torchtitan.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from lens_fast.atomic import write_text
from lens_fast.errors import InvalidValue, RunFolderBusy, StorageError, UserError
from lens_fast.models.config import LensTransformerConfig
from lens_fast.models.transformer import LensTransformer2DModel

from . import checkpoint as ckpt
from .builders import build_data_source, check_inputs, pretrained_folder
from .config import TrainConfig
from .data import Batch, PixelSpace
from .loss import flow_matching_loss
from .metrics import MetricsLogger, Throughput, device_name, peak_memory_gb
from .parallel import (EMA, all_ranks_ok, apply_activation_checkpointing, apply_compile, apply_fsdp, barrier,
                       clip_grad_norm, dtype_of, full_tensor, init_distributed, init_rule, materialize,
                       pretrained_values)
from .run_dir import RunLock, open_run_dir, tidy_for_resume
from .sample import sample_tokens, save_grid

log = logging.getLogger(__name__)


class Callback:
    """Hooks into a run; override any of them."""

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", step: int) -> None: ...

    def on_log(self, trainer: "Trainer", record: dict) -> None: ...

    def on_checkpoint(self, trainer: "Trainer", path: str) -> None: ...

    def on_train_end(self, trainer: "Trainer", result: "TrainResult") -> None: ...


@dataclass
class TrainResult:
    step: int  # the step count reached
    losses: List[float] = field(default_factory=list)  # per step run by this call (mean over ranks)
    records: List[dict] = field(default_factory=list)  # the logged records
    seconds: float = 0.0
    samples_per_s: float = 0.0
    image_tokens_per_s: float = 0.0
    tflops_per_gpu: float = 0.0
    mfu: Optional[float] = None
    skipped: int = 0


class Trainer:
    """Train a ``LensTransformer2DModel``.

    ``model``: a model to train (its weights are the start; the trainer takes it over:
    checkpointing wrappers and FSDP are applied in place); by default one is built from
    ``config.model`` (meta device, sharded, initialised per parameter, or loaded from
    ``model.pretrained``). ``data``: a DataSource (see ``lens_fast.train``), by default
    built from ``config.data``. ``out_dir``: the run folder for checkpoints, metrics,
    samples and the export (None: nothing is written), locked by this trainer until
    ``close()`` (also a context manager). ``resume``: continue from its latest complete
    checkpoint (``lens_fast.train.run_dir``). ``decoder``: turns tokens into images for
    sample grids (LensVAE or PixelSpace; default from the config). Every input the
    config names is checked before anything loads."""

    def __init__(self, config: TrainConfig, model: Optional[LensTransformer2DModel] = None, data=None,
                 out_dir: Optional[str] = None, resume: bool = False, callbacks: Sequence[Callback] = (),
                 device: Optional[str] = None, decoder=None):
        config.validate()
        self.cfg = cfg = config
        par = cfg.parallel
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        want_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        self.fsdp = (launched or want_cuda) if par.fsdp == "auto" else bool(par.fsdp)
        self.dist = init_distributed(device, need_group=self.fsdp)
        self.device = self.dist.device
        try:
            self._setup(model, data, out_dir, resume, callbacks, decoder)
        except BaseException:
            self.close()
            raise

    def _setup(self, model, data, out_dir, resume, callbacks, decoder) -> None:
        cfg = self.cfg
        self.run_lock: Optional[RunLock] = None
        self._removed: List[str] = []  # stale temporaries removed when the run folder was opened
        check_inputs(cfg, model_given=model is not None, data_given=data is not None)
        if self.dist.world > 1 and not self.fsdp:
            raise InvalidValue(f"parallel.fsdp=false with {self.dist.world} ranks: data parallelism here is FSDP; "
                             "set parallel.fsdp to auto or true")
        self.accum = cfg.train.grad_accum
        self.data_world = self.dist.world * self.accum
        seed = cfg.train.seed
        torch.manual_seed(seed + self.dist.rank)
        np.random.seed((seed + self.dist.rank) % 2 ** 32)
        random.seed(seed + self.dist.rank)

        folder = pretrained_folder(cfg.model.pretrained) if model is None else None
        if model is not None:
            self.model_config = json.loads(json.dumps(dict(model.config)))
        elif folder:
            self.model_config = dict(LensTransformerConfig.from_json_file(os.path.join(folder, "config.json")))
        else:
            self.model_config = dict(LensTransformerConfig.from_dict(cfg.model.transformer))
        self.run_dir = os.path.abspath(out_dir) if out_dir else None
        fresh = self._open_run_dir(resume) if self.run_dir else True

        self.model = self._build_model(model, folder)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        cuda = self.device.type == "cuda"
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, fused=True if cuda else None,
                                           foreach=None if cuda else True)
        self.ema = EMA(self.model, cfg.ema.decay) if cfg.ema.enabled else None
        self.data = data if data is not None else build_data_source(cfg, self.model_config, self.device)
        self.decoder = decoder or getattr(self.data, "image_encoder", None) or (
            PixelSpace(cfg.encoders.pixel_patch) if cfg.encoders.vae == "pixel" else None)
        self.callbacks = list(callbacks)
        self.step = 0
        self.skipped_total = 0
        self._preview: Optional[Batch] = None
        self._pending: List[torch.Tensor] = []
        self._norms: List[torch.Tensor] = []
        self.throughput = Throughput(self.model_config, self.device)
        if resume and self.run_dir:
            self._resume(fresh)

    def _open_run_dir(self, resume: bool) -> bool:
        """Lock and check the run folder on the main rank; every rank fails if it fails.
        Returns whether the run is new."""
        error, fresh = None, True
        if self.dist.is_main:
            try:
                self.run_lock, fresh, self._removed = open_run_dir(self.run_dir, resume, self.cfg,
                                                                   self.model_config, self.dist.world)
            except UserError as e:
                error = e
        if not all_ranks_ok(error is None, self.dist.world):
            raise error or RunFolderBusy(f"rank 0 could not open the run folder {self.run_dir} (see its error)")
        return fresh

    def _resume(self, fresh: bool) -> None:
        """Continue from the latest complete checkpoint (if any); the main rank tidies the
        folder (stale temporaries, metrics after the checkpoint) and records the resume."""
        if fresh:
            if self.dist.is_main:
                log.warning("--resume: %s holds no run yet; starting a new run there", self.run_dir)
            return
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None and self.dist.is_main:
            log.warning("--resume: %s has no complete checkpoint (the run stopped before its first one); "
                        "starting from step 0", self.run_dir)
        elif latest is not None:
            self.load(latest[1])
            if self.dist.is_main:
                log.info("resumed %s from %s (step %d)", self.run_dir, latest[1], self.step)
        if self.dist.is_main:
            tidy_for_resume(self.run_dir, self.step, latest and latest[1], self.cfg, self.dist.world,
                            self._removed)
        barrier(self.dist)

    # -- construction -----------------------------------------------------------------------
    def _build_model(self, model, folder):
        par = self.cfg.parallel
        built = model is None
        if built:
            with torch.device("meta"):
                model = LensTransformer2DModel(**self.model_config)
        if not built:
            model.to(device=self.device, dtype=torch.float32)
        model.train()
        apply_activation_checkpointing(model, par.activation_checkpointing, par.ac_every)
        if par.compile:
            apply_compile(model)
        if self.fsdp:
            apply_fsdp(model, dtype_of(par.param_dtype), dtype_of(par.reduce_dtype), par.reshard_after_forward)
        if built:
            seed = self.cfg.train.seed
            value = pretrained_values(folder) if folder else (lambda name, shape: init_rule(name, shape, seed))
            materialize(model, value, self.device)
        return model

    def _autocast(self):
        dtype = dtype_of(self.cfg.parallel.param_dtype)
        if self.fsdp or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # -- one step ---------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``optim.warmup_steps``, then constant; with
        ``optim.decay_steps`` > 0, a linear cool-down to 0 over the last decay_steps
        before ``train.max_steps`` (the last step runs at lr / decay_steps)."""
        o = self.cfg.optim
        lr = o.lr * (min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0)
        if o.decay_steps > 0:
            left = self.cfg.train.max_steps - step
            lr *= min(1.0, max(0.0, left / o.decay_steps))
        return lr

    def compute_loss(self, batch: Batch, data_rank: int) -> torch.Tensor:
        return flow_matching_loss(self.model, batch.latents, batch.text, batch.text_mask, batch.img_shapes,
                                  self.cfg.loss, self.cfg.train.seed, self.step, data_rank)

    def train_step(self) -> None:
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for i in range(self.accum):
            data_rank = self.dist.rank * self.accum + i
            batch = self.data.batch(self.step, data_rank, self.data_world).to(self.device)
            if self.fsdp:
                self.model.set_requires_gradient_sync(i == self.accum - 1)
            with self._autocast():
                loss = self.compute_loss(batch, data_rank)
            (loss / self.accum).backward()
            losses.append(loss.detach())
            self.throughput.add(batch.size, batch.latents.shape[1], batch.text_mask.shape[1], batch.skipped)
        norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.ema is not None and self.step % self.cfg.ema.every == 0:
            self.ema.update(self.model)
        self._pending.append(torch.stack(losses).mean())
        self._norms.append(norm.detach().float())

    # -- the loop ---------------------------------------------------------------------------
    def train(self, max_steps: Optional[int] = None) -> TrainResult:
        target = self.cfg.train.max_steps if max_steps is None else int(max_steps)
        if target < self.step:
            raise InvalidValue(f"max_steps={target} (--max-steps, train.max_steps) is below the step this run "
                               f"already reached ({self.step}); ask for more steps")
        lg = self.cfg.logging
        self.logger = MetricsLogger(self.run_dir, self.dist.is_main, lg.tensorboard, lg.progress_bar, target,
                                    self.step)
        result = TrainResult(step=self.step)
        totals = np.zeros(3)
        for cb in self.callbacks:
            cb.on_train_start(self)
        start = time.perf_counter()
        self.throughput.reset()
        try:
            while self.step < target:
                self.train_step()
                self.logger.advance()
                for cb in self.callbacks:
                    cb.on_step_end(self, self.step)
                if self.step % lg.every == 0 or self.step == target:
                    record = self.log_step(result)
                    totals += [record["samples"], record["image_tokens"], record["flops"]]
                self.maybe_checkpoint(final=self.step == target)
                self.maybe_sample()
            resumed_unexported = (self.run_dir and self.step == target > 0
                                  and ckpt.exported_step(self.run_dir) != self.step)
            if self.run_dir and (self.step > result.step or resumed_unexported):
                self.export()  # also when a run killed while exporting resumes at its last step
        finally:
            self.logger.close()
        result.step = self.step
        result.seconds = time.perf_counter() - start
        if result.seconds > 0 and totals[0]:
            result.samples_per_s = totals[0] / result.seconds
            result.image_tokens_per_s = totals[1] / result.seconds
            result.tflops_per_gpu = totals[2] / result.seconds / self.dist.world / 1e12
            result.mfu = None if self.throughput.peak is None else result.tflops_per_gpu / self.throughput.peak
        result.skipped = self.skipped_total
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.dist.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def log_step(self, result: TrainResult) -> dict:
        """Reduce the interval's losses and counters over ranks; write one record."""
        losses = self._all_reduce_sum(torch.stack(self._pending).float()) / self.dist.world
        tp = self.throughput
        counts = self._all_reduce_sum(torch.tensor([tp.samples, tp.tokens, tp.flops, float(tp.skipped)],
                                                   dtype=torch.float64, device=self.device))
        rates = tp.rates(counts[:3].cpu(), self.dist.world)
        self.skipped_total += int(counts[3])
        loss_list = losses.tolist()
        result.losses += loss_list
        record = {"step": self.step, "loss": loss_list[-1], "loss_avg": float(np.mean(loss_list)),
                  "grad_norm": float(self._norms[-1]), "lr": self.lr_at(self.step - 1),
                  "samples_per_s": rates["samples_per_s"], "image_tokens_per_s": rates["image_tokens_per_s"],
                  "tflops_per_gpu": rates["tflops_per_gpu"], "mfu": rates["mfu"],
                  "peak_memory_gb": peak_memory_gb(self.device), "skipped": self.skipped_total,
                  "samples": float(counts[0]), "image_tokens": float(counts[1]), "flops": float(counts[2]),
                  "device": device_name(self.device), "world": self.dist.world, "time": time.time()}
        self._pending, self._norms = [], []
        tp.reset()
        result.records.append(record)
        self._write_guarded(self.logger.log, record)
        for cb in self.callbacks:
            cb.on_log(self, record)
        return record

    # -- checkpoints ------------------------------------------------------------------------
    def _app_state(self) -> Dict:
        # Tensors only (safetensors): the optimizer's moments, not its hyper-parameters,
        # which a resumed run takes from its config.
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": {"state": optim_sd["state"]}, "step": torch.tensor(self.step)}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state, model_sd, optim_sd

    def rank_state(self) -> dict:
        return {"step": self.step, "rng": ckpt.rng_state(), "data": self.data.state_dict(),
                "skipped_total": self.skipped_total, "data_world": self.data_world, "rank": self.dist.rank}

    def _write_guarded(self, write, *args) -> None:
        """Run a main-rank write after checking the run folder is still this run's; a
        failure (disk full, the folder removed) stops every rank, never one alone."""
        error = None
        try:
            if self.run_lock is not None:
                self.run_lock.check()
            write(*args)
        except StorageError as e:
            error = e
        if not all_ranks_ok(error is None, self.dist.world):
            raise error or StorageError(f"rank 0 stopped writing into {self.run_dir} (see its error)")

    def save(self) -> Optional[str]:
        """Checkpoint the run now (collective)."""
        if not self.run_dir:
            raise InvalidValue("this Trainer has no out_dir to checkpoint into")
        self._write_guarded(lambda: None)
        state, _, _ = self._app_state()
        path = ckpt.save_checkpoint(self.run_dir, self.step, state, self.rank_state(), self.dist.rank,
                                    self.dist.world, self.cfg.checkpoint.keep_last)
        if path:
            for cb in self.callbacks:
                cb.on_checkpoint(self, path)
        return path

    def maybe_checkpoint(self, final: bool = False) -> None:
        if self.run_dir and (final or self.step % self.cfg.checkpoint.every == 0):
            self.save()

    def load(self, path: str) -> None:
        state, model_sd, optim_sd = self._app_state()
        # Parameters that never get a gradient (the last block's text-stream outputs are
        # discarded, as in the reference) have no optimizer state in the checkpoint.
        saved = ckpt.saved_keys(path)
        optim_sd["state"] = state["optim"]["state"] = {k: v for k, v in optim_sd["state"].items()
                                                       if f"optim.state.{k}.exp_avg" in saved}
        rank_state = ckpt.load_checkpoint(path, state, self.dist.rank)
        if rank_state.get("data_world") != self.data_world:
            raise InvalidValue(f"{path} was written with {rank_state.get('data_world')} data ranks (ranks x "
                             f"grad_accum); this run has {self.data_world}: the data positions do not carry over")
        set_model_state_dict(self.model, model_sd)
        set_optimizer_state_dict(self.model, self.optimizer, optim_sd, options=StateDictOptions(strict=False))
        self.step = int(state["step"])
        self.skipped_total = int(rank_state.get("skipped_total", 0))
        ckpt.set_rng_state(rank_state["rng"])
        self.data.load_state_dict(rank_state["data"])

    # -- EMA, export, samples ---------------------------------------------------------------
    def _reshard_all(self) -> None:
        """Drop FSDP's gathered copies (a no-grad forward leaves the last block's
        gathered): a weight swap must be seen by the next all-gather."""
        if self.fsdp:
            from torch.distributed.fsdp import FSDPModule

            for m in self.model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    @contextlib.contextmanager
    def ema_weights(self):
        """Context manager: the model runs with the EMA weights inside it."""
        if self.ema is None:
            yield self.model
            return
        self._reshard_all()
        with self.ema.swapped_into(self.model):
            try:
                yield self.model
            finally:
                self._reshard_all()

    def full_state_dict(self, ema: bool = True) -> Dict[str, torch.Tensor]:
        """Whole float32 CPU weights (collective under FSDP; every rank gets them)."""
        src = self.ema.state_dict() if (ema and self.ema is not None) else dict(self.model.named_parameters())
        return {k: full_tensor(v.detach()).to("cpu", torch.float32, copy=True) for k, v in src.items()}

    def ema_model(self) -> LensTransformer2DModel:
        """A plain (unsharded) float32 copy of the model holding the EMA weights."""
        with torch.device("meta"):
            model = LensTransformer2DModel(**self.model_config)
        model.load_state_dict(self.full_state_dict(ema=True), assign=True)
        return model.eval()

    def export(self, folder: Optional[str] = None, ema: Optional[bool] = None) -> Optional[str]:
        """Write the (EMA) weights as a diffusers ``transformer`` folder (collective);
        default ``DIR/export/transformer``, replaced on every export of this run."""
        ema = self.cfg.checkpoint.export_ema if ema is None else ema
        sd = self.full_state_dict(ema=ema)
        own = folder is None
        folder = folder or os.path.join(self.run_dir, "export", "transformer")
        if self.dist.is_main:
            ckpt.export_transformer(folder, self.model_config, sd, overwrite=own)
            if own:
                ckpt.mark_exported(self.run_dir, self.step)
        barrier(self.dist)
        return folder

    def sample(self, text, mask, grid, steps: Optional[int] = None, guidance: Optional[float] = None,
               seed: int = 0, ema: bool = True) -> torch.Tensor:
        """Token latents sampled with the (EMA) model (collective under FSDP)."""
        lg = self.cfg.logging
        text = [t.to(self.device) for t in text]
        ctx = self.ema_weights() if ema else contextlib.nullcontext()
        with ctx, self._autocast():
            return sample_tokens(self.model, text, mask.to(self.device), grid, steps or lg.sample_steps,
                                 lg.sample_guidance if guidance is None else guidance, seed)

    def maybe_sample(self) -> Optional[str]:
        every = self.cfg.logging.sample_every
        if not (self.run_dir and every and self.step % every == 0 and self.decoder is not None
                and hasattr(self.data, "preview")):
            return None
        if self._preview is None:
            self._preview = self.data.preview(self.cfg.logging.sample_count)
        p = self._preview
        tokens = self.sample(p.text, p.text_mask, p.grid, seed=self.cfg.train.seed)
        if not self.dist.is_main:
            return None
        f = self.decoder.spatial_factor
        h, w = p.grid[0] * f, p.grid[1] * f
        with torch.no_grad():
            rows = [self.decoder.decode(p.latents.to(self.device), h, w), self.decoder.decode(tokens, h, w)]
        path = save_grid(os.path.join(self.run_dir, "samples", f"step_{self.step:07d}.png"), rows)
        if p.captions:
            write_text(path[:-4] + ".txt", "\n".join(p.captions) + "\n")
        return path

    def close(self) -> None:
        """Stop the data workers, release the run folder and the process group."""
        if hasattr(self, "data") and hasattr(self.data, "close"):
            self.data.close()
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
