"""The timer shared by the benchmark scripts (bench/attention.py, bench/fp8.py)."""
from __future__ import annotations

import statistics
import time

import torch


def timer(device: torch.device, rep_ms: int):
    """fn -> (median, p20, p80) in ms: triton.testing.do_bench on CUDA (25 ms warm-up,
    ``rep_ms`` of repeats), wall clock over 5 runs after one warm-up on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        def run(fn, grad_to_none=None):
            med, p20, p80 = do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=grad_to_none,
                                     quantiles=[0.5, 0.2, 0.8])
            return med, p20, p80
        return run

    def run_cpu(fn, grad_to_none=None):
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        q = statistics.quantiles(times, n=5)
        return statistics.median(times), q[0], q[-1]
    return run_cpu
