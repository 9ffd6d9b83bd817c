"""The lens_fast trainer (installed as ``lens_fast.train``): Lens pre-training and
fine-tuning on one process or many (torchrun), FSDP2 + bf16, EMA, resumable data and
checkpoints.

Command line: ``lens-fast train --config NAME_OR_FILE [--out DIR] [--resume]
[--max-steps N] [--set section.key=value ...]`` (``python -m lens_fast.train`` is the
same; put ``torchrun --nproc_per_node G [--nnodes ...]`` in front for many GPUs).
Registered configs: ``stage1``, ``stage2``, ``finetune``, ``tiny-cpu``
(``lens_fast.train.config``).

In Python::

    from lens_fast.train import Trainer, load_config, InMemorySource, BucketData
    cfg = load_config("tiny-cpu"); cfg.override(["train.max_steps=500"])
    trainer = Trainer(cfg, model=my_model, data=my_source, out_dir=None, callbacks=[...])
    result = trainer.train()          # TrainResult: losses per step, throughput, MFU
    ema = trainer.ema_model()         # plain model with the EMA weights, for sampling
    tokens = trainer.sample(text, mask, grid, steps=20, guidance=4.0)

The DataSource protocol
-----------------------
Anything with these methods feeds the trainer::

    batch(step: int, data_rank: int, data_world: int) -> Batch
    state_dict() -> dict          # JSON-serialisable position after the last batch returned
    load_state_dict(state: dict) -> None
    preview(n: int) -> Batch      # optional: a fixed batch for sample grids (consumes nothing)
    close() -> None               # optional

``Batch`` (``lens_fast.train.data``) holds one bucket: ``latents`` [B, N, C] clean
normalised tokens, ``text`` a list of K [B, S, E] features, ``text_mask`` [B, S] bool,
``grid`` (h, w) with h * w = N, and ``skipped`` (samples dropped while building it).
``data_rank`` = rank x grad_accum + micro-batch index and ``data_world`` = ranks x
grad_accum: a source must return the same batch for the same (step, data_rank,
data_world) whatever the number of processes, and after ``load_state_dict`` of a
saved position, so that runs are reproducible and resumable. Each data rank picks its
own bucket per step; batch sizes may differ per bucket (every rank's loss counts
equally in the gradient average). The loss-side randomness (sigmas, noise, caption
dropout) is drawn by the trainer from (seed, step, data_rank).

Sources here: ``InMemorySource`` (tokens + features per bucket in memory, or a cache
folder via ``load_cache``/``save_cache``), ``SyntheticSource`` (tiny-cpu, benchmarks),
``EncodedSource(WebDatasetSource(...), vae, text_encoder)`` (tar shards through the
frozen encoders). A source that cannot make progress raises
``lens_fast.errors.NoUsableData`` instead of reading on forever.

The run folder
--------------
One process per run folder: ``Trainer(out_dir=...)`` holds an OS lock on
``DIR/.lock`` until ``close()`` (or the process ends, however it ends); a second
process is refused with the holder's pid, host and start time. ``resume=True``
continues from the latest complete checkpoint, removes the temporaries a killed run
left, truncates ``metrics.jsonl`` to the checkpoint's step and records the resume (and
every setting that changed) in ``run.json``. Checkpoints are safetensors (nothing is
pickled); a failed write raises ``lens_fast.errors.StorageError`` and leaves the
earlier checkpoints intact. ``lens_fast.train.run_dir`` holds these pieces for recipes
that drive their own loop.
"""
if __name__ != "lens_fast.train":  # the bare name, from a checkout's root: see lens_fast/_checkout.py
    import os as _os
    import runpy as _runpy
    _runpy.run_path(_os.path.join(_os.path.dirname(__file__), _os.pardir, "lens_fast", "_checkout.py"))[
        "hand_over"](__name__, __file__)
else:
    from lens_fast.resolutions import bucket_size

    from .buckets import Bucket, BucketTable
    from .config import ConfigError, TrainConfig
    from .presets import REGISTRY, load_config
    from .data import (Batch, BucketData, EncodedSource, InMemorySource, PixelSpace, RawBatch, SyntheticSource,
                       load_cache, save_cache)
    from .loss import flow_matching_loss, logit_normal_mu
    from .trainer import Callback, Trainer, TrainResult

__all__ = ["Trainer", "TrainResult", "Callback", "TrainConfig", "ConfigError", "load_config", "REGISTRY",
           "Batch", "BucketData", "InMemorySource", "SyntheticSource", "EncodedSource", "RawBatch", "PixelSpace",
           "load_cache", "save_cache", "Bucket", "BucketTable", "bucket_size", "flow_matching_loss",
           "logit_normal_mu"]
