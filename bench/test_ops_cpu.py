"""CPU microbenchmarks (pytest-benchmark) of what the fused-op layer adds per call: the
backend choice (``dispatch.select``), the eager entry points (which run the reference
directly when dispatch picks torch), and the custom op that kernel backends run in (here
with the torch backend inside, so the difference to the reference is the wrapper), forward
and forward+backward, against calling the reference directly. Tiny tensors, so the
numbers are the fixed per-call host overhead that every block pays 8-10 times.

Run: ``pytest bench/test_ops_cpu.py --benchmark-only`` (results in the usual table). Each
benchmark also checks that the dispatched result equals the direct reference call.
"""
import os

import pytest
import torch

from lens_fast.models.embeddings import rope_table
from lens_fast.ops import dispatch
from lens_fast.ops import norm_modulate as NM
from lens_fast.ops.norm_modulate import rms_norm_modulate, rms_norm_modulate_ref
from lens_fast.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from lens_fast.ops.swiglu import silu_mul_ref, swiglu
B, L, C, H, D = 2, 8, 64, 2, 32


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    torch.manual_seed(0)


def _norm_inputs(requires_grad=False):
    x = torch.randn(B, L, C, requires_grad=requires_grad)
    mods = torch.randn(B, 6 * C, requires_grad=requires_grad)
    w = torch.ones(C, requires_grad=requires_grad)
    return x, w, mods[:, :C], mods[:, C:2 * C]


def test_select_overhead(benchmark):
    x, w, shift, scale = _norm_inputs()
    name = benchmark(dispatch.select, "rms_norm_modulate", x, None, None, w, shift, scale)
    assert name == "torch"
    if benchmark.stats is not None:  # None under --benchmark-disable
        assert benchmark.stats.stats.median < 1e-3, "choosing a backend should cost microseconds, not milliseconds"


PATHS = {"reference": rms_norm_modulate_ref, "fused": rms_norm_modulate,
         "custom_op": lambda *a: NM.rms_norm_modulate_op(*a)[0]}


@pytest.mark.parametrize("path", list(PATHS))
def test_rms_norm_modulate_forward(benchmark, path):
    x, w, shift, scale = _norm_inputs()
    out = benchmark(PATHS[path], x, w, shift, scale, 1e-6)
    assert torch.equal(out, rms_norm_modulate_ref(x, w, shift, scale, 1e-6))


@pytest.mark.parametrize("path", list(PATHS))
def test_rms_norm_modulate_forward_backward(benchmark, path):
    x, w, shift, scale = _norm_inputs(requires_grad=True)
    fn = PATHS[path]

    def step():
        return torch.autograd.grad(fn(x, w, shift, scale, 1e-6).sum(), (x, w))
    dx, dw = benchmark(step)
    want = torch.autograd.grad(rms_norm_modulate_ref(x, w, shift, scale, 1e-6).sum(), (x, w))
    torch.testing.assert_close(dx, want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dw, want[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["reference", "fused"])
def test_qk_norm_rope_forward(benchmark, path):
    img, txt = torch.randn(B, L, 3 * H * D), torch.randn(B, 5, 3 * H * D)
    ws = [torch.rand(D) + 0.5 for _ in range(4)]
    rope = rope_table(2, 4, 5, (8, 12, 12))
    fn = qk_norm_rope_ref if path == "reference" else qk_norm_rope
    q, k, v = benchmark(fn, img, txt, H, *ws, rope, 1e-6)
    for a, b in zip((q, k, v), qk_norm_rope_ref(img, txt, H, *ws, rope, 1e-6)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["reference", "fused"])
def test_swiglu_forward(benchmark, path):
    h = torch.randn(B * L, 2 * C)
    fn = (lambda t: silu_mul_ref(*t.chunk(2, dim=-1))) if path == "reference" else swiglu
    out = benchmark(fn, h)
    assert torch.equal(out, silu_mul_ref(*h.chunk(2, dim=-1)))


def test_forced_backend_env_is_read_per_call(monkeypatch):
    """LENS_FAST_BACKEND is honoured at call time (benchmarks and tests flip it)."""
    x, w, shift, scale = _norm_inputs()
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.select("rms_norm_modulate", x, None, None, w, shift, scale) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        dispatch.select("rms_norm_modulate", x, None, None, w, shift, scale)
    assert os.environ[dispatch.ENV_VAR] == "bogus"
