"""Executors: run the same ``Worker`` tasks on local processes or on a Ray cluster.

``LocalExecutor``: one process per worker (spawned, so no thread or CUDA state is forked),
each loading its models once; with one worker the tasks run in this process. ``RayExecutor``:
each phase is a Ray Data pipeline over its tasks, mapped by a pool of actors (one
``Worker`` each, holding the models; ``num_gpus=1`` per filter actor when the cluster has
GPUs, so the model stages run there), joining the cluster at ``ray_address`` or starting
a local Ray instance. Both read and write the run folder, which every node must see.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, List, Optional

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
    """A Ray Data actor: one Worker, many tasks (a batch is one task)."""

    def __init__(self, out: str, share: int, kind: str):
        import torch

        torch.set_num_threads(1)
        self.worker, self.kind = Worker(out, share), kind

    def __call__(self, batch):
        import numpy as np

        results = [json.dumps(getattr(self.worker, self.kind)(json.loads(t))) for t in batch["task"]]
        return {"result": np.array(results, dtype=object)}


class RayExecutor:
    name = "ray"

    def __init__(self, out: str, workers: Optional[int] = None, address: Optional[str] = None):
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError:
            raise ImportError("--executor ray needs Ray Data: pip install -e '.[ray]' (or pip install 'ray[data]')") \
                from None
        self.ray, self.out = ray, out
        self.started = not ray.is_initialized()
        if self.started:
            kwargs = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=workers or os.cpu_count(), **kwargs)
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
        ds = ds.map_batches(_RayStage, fn_constructor_kwargs={"out": self.out, "share": size, "kind": kind},
                            batch_size=1, concurrency=size, num_cpus=1, num_gpus=1 if gpu else 0)
        return (json.loads(r["result"]) for r in ds.take_all())

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(name: str, out: str, workers: Optional[int], address: Optional[str]):
    if name == "ray":
        return RayExecutor(out, workers, address)
    return LocalExecutor(out, workers)
