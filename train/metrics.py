"""Run logging: one JSON line per logged step in ``DIR/metrics.jsonl``, TensorBoard
scalars when tensorboard is installed, a tqdm bar, and throughput / MFU accounting."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, Optional

import torch
from tqdm.auto import tqdm

from lens_fast.errors import storage_error
from lens_fast.flops import peak_bf16_tflops, train_step_flops

log = logging.getLogger(__name__)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


class Throughput:
    """Counts samples, image tokens and model FLOPs between two log points."""

    def __init__(self, model_config: dict, device: torch.device):
        self.model_config, self.device = model_config, device
        self.peak = peak_bf16_tflops(device_name(device)) if device.type == "cuda" else None
        self.reset()

    def reset(self) -> None:
        self.samples = self.tokens = self.flops = 0.0
        self.skipped = 0
        self.t0 = time.perf_counter()

    def add(self, batch_size: int, n_img: int, n_txt: int, skipped: int = 0, forwards: float = 3.0) -> None:
        """Count one micro-batch; ``forwards``: model forwards per sample (3 for forward +
        backward; a recipe running several models counts them all)."""
        self.samples += batch_size
        self.tokens += batch_size * n_img
        self.flops += forwards / 3.0 * train_step_flops(self.model_config, n_img, n_txt, batch_size)
        self.skipped += skipped

    def rates(self, totals: torch.Tensor, world: int) -> Dict[str, Optional[float]]:
        """``totals`` = [samples, tokens, flops] summed over ranks."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        samples, tokens, flops = (float(v) for v in totals.tolist())
        tflops = flops / dt / world / 1e12
        return {"samples_per_s": samples / dt, "image_tokens_per_s": tokens / dt, "tflops_per_gpu": tflops,
                "mfu": None if self.peak is None else tflops / self.peak, "seconds": dt}


def peak_memory_gb(device: torch.device) -> Optional[float]:
    """Peak allocated GPU memory; on a CPU, the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    except (ImportError, OSError):
        return None


class MetricsLogger:
    """Writes on the main rank only; every method is a no-op elsewhere."""

    def __init__(self, run_dir: Optional[str], enabled: bool, tensorboard: bool, progress: bool,
                 total: int, initial: int):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl") if (run_dir and enabled) else None
        self.tb = None
        if enabled and run_dir and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run drops the events logged after its checkpoint
                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=initial or None)
            except Exception as e:  # noqa: BLE001 - tensorboard is optional
                log.info("TensorBoard logging off: %s", e)
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                        disable=not (enabled and progress))

    def event(self, record: dict) -> None:
        if self.path:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise storage_error(f"cannot append to {self.path}", e) from None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.event(record)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
