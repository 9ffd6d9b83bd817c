"""Test set-up shared by every test file.

The Triton interpreter must be switched on before anything imports triton, so CPU CI
can run the Triton kernels (the GPU suite sets TRITON_INTERPRET=0 itself).
"""
import os
import shutil

os.environ.setdefault("TRITON_INTERPRET", "0" if shutil.which("nvidia-smi") else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

CONFORMANCE = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "conformance",
                                            "lens_tiny"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def conformance_dir():
    if not os.path.isdir(CONFORMANCE):
        pytest.fail(f"conformance data not found at {CONFORMANCE}; expected ../shared/conformance/lens_tiny "
                    "beside the repository")
    return CONFORMANCE


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv("LENS_FAST_BACKEND", raising=False)


@pytest.fixture
def one_thread():
    """One intra-op thread: small CPU tests run faster and steadier on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def train_metrics():
    """``run(args, out, *extra, ranks=1)``: ``python -m lens_fast.train ARGS EXTRA --out OUT``
    in a subprocess (under torchrun with ``ranks`` > 1, gloo on CPU); its logged records by step."""
    import json
    import subprocess
    import sys

    def run(args, out, *extra, ranks=1):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
        proc = subprocess.run([sys.executable, *launcher, "-m", "lens_fast.train", *args, *extra, "--out", str(out)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return {r["step"]: r for r in map(json.loads, f) if "loss" in r}
    return run
