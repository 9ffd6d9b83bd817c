"""The Lens trainer: one process or many (torchrun), FSDP2, EMA, checkpoints, logging.

One loop for every recipe (``train/recipe.py``: pre-training and fine-tuning,
``distill``): the recipe brings its models and its update step, the trainer does the
rest. Each step is an overridable method (``train_step``, ``compute_loss``, ``lr_at``,
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
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from lens_fast.atomic import write_text
from lens_fast.errors import InvalidValue, RunFolderBusy, StorageError, UserError
from lens_fast.models.config import LensTransformerConfig
from lens_fast.models.transformer import LensTransformer2DModel

from . import checkpoint as ckpt
from .build import build_model
from .builders import check_inputs
from .config import TrainConfig
from .data import Batch, PixelSpace
from .metrics import MetricsLogger, Throughput, device_name, peak_memory_gb
from .parallel import (EMA, all_ranks_ok, barrier, clip_grad_norm, dtype_of, full_tensor, init_distributed,
                       reshard)
from .recipe import Part, Recipe
from .recipes import make_recipe
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
    """Train a ``LensTransformer2DModel`` with the recipe ``config.recipe`` (or ``recipe``).

    ``model``: a model to train (its weights are the start; the trainer takes it over:
    checkpointing wrappers and FSDP are applied in place); by default one is built from
    ``config.model`` (meta device, sharded, initialised per parameter, or loaded from
    ``model.pretrained``; a distillation student from its teacher). ``data``: a DataSource (see ``lens_fast.train``), by default
    built from ``config.data``. ``out_dir``: the run folder for checkpoints, metrics,
    samples and the export (None: nothing is written), locked by this trainer until
    ``close()`` (also a context manager). ``resume``: continue from its latest complete
    checkpoint (``lens_fast.train.run_dir``). ``decoder``: turns tokens into images for
    sample grids (LensVAE or PixelSpace; default from the config). Every input the
    config names is checked before anything loads."""

    def __init__(self, config: TrainConfig, model: Optional[LensTransformer2DModel] = None, data=None,
                 out_dir: Optional[str] = None, resume: bool = False, callbacks: Sequence[Callback] = (),
                 device: Optional[str] = None, decoder=None, recipe: Optional[Recipe] = None):
        config.validate()
        self.cfg = cfg = config
        self.recipe = recipe or make_recipe(cfg.recipe)
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

        folder = self.recipe.start_folder(cfg) if model is None else None
        if model is not None:
            self.model_config = json.loads(json.dumps(dict(model.config)))
        elif folder:
            self.model_config = dict(LensTransformerConfig.from_json_file(os.path.join(folder, "config.json")))
        else:
            self.model_config = dict(LensTransformerConfig.from_dict(cfg.model.transformer))
        self.run_dir = os.path.abspath(out_dir) if out_dir else None
        self.data = data  # None: the recipe's data_source, once its models are built
        record = self.recipe.prepare(self)
        fresh = self._open_run_dir(resume, record) if self.run_dir else True

        self.parts: Dict[str, Part] = {}
        self.recipe.build(self, model, folder)
        primary = next(p for p in self.parts.values() if p.primary)
        self.model, self.optimizer, self.ema = primary.model, primary.optimizer, primary.ema
        self.params = primary.params
        if self.data is None:
            self.data = self.recipe.data_source(self)
        self.decoder = decoder or getattr(self.data, "image_encoder", None) or (
            PixelSpace(cfg.encoders.pixel_patch) if cfg.encoders.vae == "pixel" else None)
        self.callbacks = list(callbacks)
        self.step = 0
        self.skipped_total = 0
        self._preview: Optional[Batch] = None
        self._pending: List[Dict[str, torch.Tensor]] = []
        self.throughput = Throughput(self.model_config, self.device)
        if resume and self.run_dir:
            self._resume(fresh)

    def _open_run_dir(self, resume: bool, record: dict) -> bool:
        """Lock and check the run folder on the main rank (a resumed run must have used this
        recipe: ``Recipe.check_resume``); every rank fails if it fails. Returns whether the
        run is new."""
        error, fresh = None, True
        if self.dist.is_main:
            try:
                self.run_lock, fresh, self._removed = open_run_dir(
                    self.run_dir, resume, self.cfg, self.model_config, self.dist.world, recipe=record,
                    check_resume=lambda saved: self.recipe.check_resume(saved, self.run_dir))
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

    # -- construction (called by the recipe's build) ----------------------------------------
    def build(self, model: Optional[LensTransformer2DModel] = None, folder: Optional[str] = None,
              trainable: bool = True, dtype: str = "float32") -> LensTransformer2DModel:
        """A model of this run's config through the one build path (``train/build.py``):
        ``model`` taken over, or built on meta, sharded and loaded from ``folder`` (or
        the init rule); ``trainable=False``: frozen, stored in ``dtype``."""
        return build_model(self.model_config, self.cfg.parallel, self.device, self.fsdp, folder=folder,
                           seed=self.cfg.train.seed, model=model, trainable=trainable, dtype=dtype_of(dtype))

    def add_part(self, name: str, model: LensTransformer2DModel, trainable: bool = True, ema: bool = False,
                 lr_scale: float = 1.0, stateful: bool = False) -> Part:
        """Register a model of the run; a trainable one gets AdamW (``optim`` section,
        learning rate ``lr_scale`` x the schedule's) and, with ``ema``, the EMA. The
        first part added is the primary one (sampled, exported, checkpointed as model).
        ``stateful``: a part without optimiser whose weights the recipe changes (checkpointed)."""
        if name in self.parts:
            raise InvalidValue(f"part {name!r} is already registered")
        optimizer = None
        if trainable:
            cuda = self.device.type == "cuda"
            o = self.cfg.optim
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=o.lr * lr_scale, betas=tuple(o.betas), eps=o.eps,
                                          weight_decay=o.weight_decay, fused=True if cuda else None,
                                          foreach=None if cuda else True)
        part = Part(name, model, optimizer, EMA(model, self.cfg.ema.decay) if ema else None,
                    primary=not self.parts, lr_scale=lr_scale, stateful=stateful and optimizer is None)
        self.parts[name] = part
        return part

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
        return self.recipe.loss(self, batch, data_rank)

    def micro_batches(self) -> Iterator[Tuple[int, Batch]]:
        """This step's (data_rank, batch) pairs on the device, counted for throughput."""
        forwards = self.recipe.forwards(self.cfg)
        for i in range(self.accum):
            data_rank = self.dist.rank * self.accum + i
            batch = self.data.batch(self.step, data_rank, self.data_world).to(self.device)
            self.throughput.add(batch.size, batch.latents.shape[1], batch.text_mask.shape[1], batch.skipped,
                                forwards=forwards)
            yield data_rank, batch

    def optimize(self, part: Part, loss_fn: Callable, batches: Iterable[Tuple[int, Batch]]
                 ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """One optimiser update of ``part``: ``loss_fn(batch, data_rank)`` (a loss, or a
        loss and a dict of detached metrics) over the step's micro-batches, gradients
        averaged, clipped to ``optim.grad_clip``, at this step's learning rate. Returns
        the mean loss, the gradient norm and the mean metrics."""
        lr = self.lr_at(self.step) * part.lr_scale
        for group in part.optimizer.param_groups:
            group["lr"] = lr
        part.optimizer.zero_grad(set_to_none=True)
        losses, extras = [], []
        for i, (data_rank, batch) in enumerate(batches):
            if self.fsdp:
                part.model.set_requires_gradient_sync(i == self.accum - 1)
            with self._autocast():
                out = loss_fn(batch, data_rank)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            (loss / self.accum).backward()
            losses.append(loss.detach())
            extras.append(metrics)
        norm = clip_grad_norm(part.params, self.cfg.optim.grad_clip)
        part.optimizer.step()
        mean = {k: torch.stack([m[k].float() for m in extras]).mean() for k in extras[0]}
        return torch.stack(losses).mean(), norm.detach().float(), mean

    def train_step(self) -> None:
        metrics = self.recipe.update(self)
        self.step += 1
        if self.step % self.cfg.ema.every == 0:
            for part in self.parts.values():
                if part.ema is not None:
                    part.ema.update(part.model)
        self._pending.append(metrics)

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
        """Reduce the interval's metrics and counters over ranks; write one record: each
        metric's last value and its ``_avg`` over the interval (``*grad_norm`` metrics,
        the same on every rank, as computed)."""
        names = [k for k in self._pending[0] if not k.endswith("grad_norm")]
        values = torch.stack([torch.stack([m[k].float() for k in names]) for m in self._pending])
        values = self._all_reduce_sum(values) / self.dist.world
        losses = values[:, names.index("loss")]
        tp = self.throughput
        counts = self._all_reduce_sum(torch.tensor([tp.samples, tp.tokens, tp.flops, float(tp.skipped)],
                                                   dtype=torch.float64, device=self.device))
        rates = tp.rates(counts[:3].cpu(), self.dist.world)
        self.skipped_total += int(counts[3])
        loss_list = losses.tolist()
        result.losses += loss_list
        record = {"step": self.step, "loss": loss_list[-1], "loss_avg": float(np.mean(loss_list)),
                  "grad_norm": float(self._pending[-1]["grad_norm"]), "lr": self.lr_at(self.step - 1),
                  "samples_per_s": rates["samples_per_s"], "image_tokens_per_s": rates["image_tokens_per_s"],
                  "tflops_per_gpu": rates["tflops_per_gpu"], "mfu": rates["mfu"],
                  "peak_memory_gb": peak_memory_gb(self.device), "skipped": self.skipped_total,
                  "samples": float(counts[0]), "image_tokens": float(counts[1]), "flops": float(counts[2]),
                  "device": device_name(self.device), "world": self.dist.world, "time": time.time()}
        for i, k in enumerate(names):
            if k != "loss":
                record[k], record[f"{k}_avg"] = float(values[-1, i]), float(values[:, i].mean())
        for k in self._pending[-1]:
            if k.endswith("grad_norm") and k != "grad_norm":
                record[k] = float(self._pending[-1][k])
        self._pending = []
        tp.reset()
        result.records.append(record)
        self._write_guarded(self.logger.log, record)
        for cb in self.callbacks:
            cb.on_log(self, record)
        return record

    # -- checkpoints ------------------------------------------------------------------------
    def _app_state(self) -> Tuple[Dict, List[Tuple[Part, Dict, Dict]]]:
        """The DCP state of every trained part and stateful frozen part (other frozen
        parts are rebuilt from their folder), the step and the EMA; and (part, model_sd,
        optim_sd) per trained part (optim_sd None for a stateful frozen one). Tensors only
        (safetensors): an optimizer's moments, not its hyper-parameters, which a resumed
        run takes from its config."""
        state: Dict = {}
        trained = []
        for part in self.parts.values():
            if part.optimizer is None:
                if part.stateful:
                    state[part.model_key] = get_model_state_dict(part.model)
                    trained.append((part, state[part.model_key], None))
                continue
            model_sd, optim_sd = get_state_dict(part.model, part.optimizer)
            state[part.model_key], state[part.optim_key] = model_sd, {"state": optim_sd["state"]}
            if part.primary:
                state["step"] = torch.tensor(self.step)
            if part.ema is not None:
                state["ema" if part.primary else f"{part.name}_ema"] = part.ema.state_dict()
            trained.append((part, model_sd, optim_sd))
        return state, trained

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
        state, _ = self._app_state()
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
        state, trained = self._app_state()
        # Parameters that never get a gradient (the last block's text-stream outputs are
        # discarded, as in the reference) have no optimizer state in the checkpoint.
        saved = ckpt.saved_keys(path)
        for part, _, optim_sd in trained:
            if optim_sd is not None:
                optim_sd["state"] = state[part.optim_key]["state"] = {
                    k: v for k, v in optim_sd["state"].items() if f"{part.optim_key}.state.{k}.exp_avg" in saved}
        rank_state = ckpt.load_checkpoint(path, state, self.dist.rank)
        if rank_state.get("data_world") != self.data_world:
            raise InvalidValue(f"{path} was written with {rank_state.get('data_world')} data ranks (ranks x "
                             f"grad_accum); this run has {self.data_world}: the data positions do not carry over")
        for part, model_sd, optim_sd in trained:
            set_model_state_dict(part.model, model_sd)
            if optim_sd is not None:
                set_optimizer_state_dict(part.model, part.optimizer, optim_sd, options=StateDictOptions(strict=False))
        self.step = int(state["step"])
        self.skipped_total = int(rank_state.get("skipped_total", 0))
        ckpt.set_rng_state(rank_state["rng"])
        self.data.load_state_dict(rank_state["data"])

    # -- EMA, export, samples ---------------------------------------------------------------
    def _reshard_all(self) -> None:
        """Drop FSDP's gathered copies (a no-grad forward leaves the last block's
        gathered): a weight swap must be seen by the next all-gather."""
        if self.fsdp:
            reshard(self.model)

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
        """Write the (EMA) weights in the recipe's export form (collective): a diffusers
        ``transformer`` folder (default ``DIR/export/transformer``), or for a distilled
        student a Turbo checkpoint folder (default ``DIR/export``); the run's own export
        is replaced on every export, a folder given here is never overwritten."""
        ema = self.cfg.checkpoint.export_ema if ema is None else ema
        sd = self.full_state_dict(ema=ema)
        own = folder is None
        folder = folder or self.recipe.export_path(self.run_dir)
        if self.dist.is_main:
            self.recipe.export(self, folder, sd, overwrite=own)
            if own:
                ckpt.mark_exported(self.run_dir, self.step)
        barrier(self.dist)
        return folder

    def sample(self, text, mask, grid, steps: Optional[int] = None, guidance: Optional[float] = None,
               seed: int = 0, ema: bool = True) -> torch.Tensor:
        """Token latents sampled with the (EMA) model (collective under FSDP); steps and
        guidance default to the recipe's (``logging.sample_*``; a Turbo: its steps, 1)."""
        default_steps, default_guidance = self.recipe.sample_settings(self.cfg)
        text = [t.to(self.device) for t in text]
        ctx = self.ema_weights() if ema else contextlib.nullcontext()
        with ctx, self._autocast():
            return sample_tokens(self.model, text, mask.to(self.device), grid, steps or default_steps,
                                 default_guidance if guidance is None else guidance, seed)

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
