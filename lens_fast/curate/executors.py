"""Executors: run the same ``Worker`` tasks on local processes or on a Ray cluster.

``LocalExecutor``: one process per worker (spawned, so no thread or CUDA state is forked),
each loading its models once; with one worker the tasks run in this process. ``RayExecutor``:
each phase is a Ray Data pipeline over its tasks: the filter phase (the model stages) is
mapped by a pool of actors, one ``Worker`` each holding the models, ``num_gpus=1`` per actor
when the cluster has GPUs; the other phases are Ray tasks. It joins the cluster at
``ray_address`` or starts a local Ray instance (and stops what it started). Both executors
read and write the run folder, which every node must see (a shared filesystem).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, List, Optional

from ..errors import MissingDependency
from .worker import Worker, init_worker, run_task


class LocalExecutor:
    name = "local"

    def __init__(self, out: str, workers: Optional[int] = None):
        self.out = out
        self.workers = int(workers or os.cpu_count() or 1)
        self._pool = None
        self._inline: Optional[Worker] = None

    def map(self, kind: str, payloads: List) -> Iterator:
        if not payloads:
            return iter(())
        if self.workers == 1:
            if self._inline is None:
                self._inline = Worker(self.out, 1)
            return (getattr(self._inline, kind)(p) for p in payloads)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=init_worker, initargs=(self.out, self.workers))
        return self._pool.map(run_task, [(kind, p) for p in payloads])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class _RayStage:
    """A Ray Data actor for the model stages: one Worker (its models loaded once), many tasks."""

    def __init__(self, out: str, share: int, kind: str):
        import torch

        torch.set_num_threads(1)
        self.worker, self.kind = Worker(out, share), kind

    def __call__(self, batch):
        return _run_batch(self.worker, self.kind, batch)


_RAY_WORKERS = {}


def _ray_task(batch, out: str, share: int, kind: str):
    """A Ray Data task for the phases without models; the Worker is kept per process."""
    if (out, share) not in _RAY_WORKERS:
        import torch

        torch.set_num_threads(1)
        _RAY_WORKERS[(out, share)] = Worker(out, share)
    return _run_batch(_RAY_WORKERS[(out, share)], kind, batch)


def _run_batch(worker: Worker, kind: str, batch):
    import numpy as np

    results = [json.dumps(getattr(worker, kind)(json.loads(t))) for t in batch["task"]]
    return {"result": np.array(results, dtype=object)}


class RayExecutor:
    name = "ray"

    def __init__(self, out: str, workers: Optional[int] = None, address: Optional[str] = None):
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError:
            raise MissingDependency("--executor ray needs Ray Data: pip install -e '.[ray]' (or pip install 'ray[data]')") \
                from None
        self.ray, self.out = ray, out
        self.started = not ray.is_initialized()
        if self.started:
            kwargs = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=workers or os.cpu_count(), **kwargs)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        resources = ray.cluster_resources()
        self.workers = int(workers or max(1, resources.get("CPU", 1)))
        self.gpus = int(resources.get("GPU", 0))

    def map(self, kind: str, payloads: List) -> Iterator:
        if not payloads:
            return iter(())
        ray = self.ray
        size = max(1, min(self.workers, len(payloads)))
        gpu = kind == "filter" and self.gpus > 0
        if gpu:
            size = max(1, min(size, self.gpus))
        ds = ray.data.from_items([{"task": json.dumps(p)} for p in payloads], override_num_blocks=len(payloads))
        args = {"out": self.out, "share": size, "kind": kind}
        if kind == "filter":  # the model stages: an actor pool, a GPU per actor when the cluster has them
            ds = ds.map_batches(_RayStage, fn_constructor_kwargs=args, batch_size=1, num_cpus=1,
                                num_gpus=1 if gpu else 0, compute=ray.data.ActorPoolStrategy(size=size))
        else:
            ds = ds.map_batches(_ray_task, fn_kwargs=args, batch_size=1, num_cpus=1)
        return (json.loads(r["result"]) for r in ds.take_all())

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(name: str, out: str, workers: Optional[int], address: Optional[str]):
    if name == "ray":
        return RayExecutor(out, workers, address)
    return LocalExecutor(out, workers)
