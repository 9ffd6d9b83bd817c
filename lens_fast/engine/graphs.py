"""The CUDA-graph layer of the engine: capture one denoise step, replay it n times.

Kept deliberately small. The step it captures (``LensEngine._step``) reads and writes
only tensors allocated before capture (the ``StepBuffers``): the loop on the host copies
step i's constants into those buffers (device-to-device copies, no synchronisation) and
replays. Rules the step obeys so capture is legal and replays are correct:
- no host synchronisation (no ``.item()``, no Python branch on tensor values, no
  ``nonzero``): CFG combine and Euler run on the device, guidance and dt are 0-dim
  device tensors;
- every output is written with ``copy_`` into a static buffer (latents, noise_pred), so
  nothing the caller reads lives in the graph's private pool;
- everything that compiles, autotunes or allocates workspaces happens in the warm-up
  iterations on a side stream before capture; the warm-up mutates the latents buffer,
  so the buffers named in ``restore`` are snapshot before and restored after.

All graphs of one engine share one memory pool (``GraphPool``): their intermediates are
dead between replays and graphs never run concurrently, so one pool sized for the
largest shape serves every (resolution, batch, text bucket).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


class CapturedStep:
    """``fn()`` captured once as a CUDA graph; ``replay()`` re-runs it on the current
    contents of the static buffers it closes over."""

    def __init__(self, fn: Callable[[], None], restore: Sequence[torch.Tensor] = (), pool=None,
                 warmup_iters: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; torch.cuda.is_available() is False")
        if warmup_iters < 1:
            raise ValueError(f"warmup_iters={warmup_iters}: expected >= 1 (kernels must be compiled and "
                             "workspaces allocated before capture)")
        snapshots = [t.clone() for t in restore]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_iters):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        for t, snap in zip(restore, snapshots):
            t.copy_(snap)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn()
        # Capture records kernels without running them: the buffers still hold the
        # restored inputs, so the first replay starts from them.

    def replay(self) -> None:
        self.graph.replay()


class GraphPool:
    """One memory pool for all graphs of one engine.

    The pool is the first captured graph's own (``graph.pool()``) and that graph is kept
    alive as long as this object. Reusing a bare ``graph_pool_handle()`` id is not safe:
    once every graph that used an id is destroyed while blocks of its pool are still
    live, PyTorch keeps the pool with a zero use count and a later capture into that id
    fails an internal assert (``it->second->use_count > 0``, seen on torch 2.11 / H200
    after an engine's graphs were evicted and a new engine captured).
    """

    def __init__(self):
        self._keeper: Optional[CapturedStep] = None

    def capture(self, fn: Callable[[], None], restore: Sequence[torch.Tensor]) -> CapturedStep:
        pool = None if self._keeper is None else self._keeper.graph.pool()
        step = CapturedStep(fn, restore, pool)
        if self._keeper is None:
            self._keeper = step
        return step

