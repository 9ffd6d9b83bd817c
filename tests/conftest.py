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
