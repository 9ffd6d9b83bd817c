"""The backend decision: cached per (op, device type, dtype, info) and dropped when
LENS_FAST_BACKEND changes; per-call rules (``fits``) still run on every call; an entry
point decides once per call and hands the decision to its custom op."""
import pytest
import torch

from lens_fast.ops import dispatch, optional
from lens_fast.ops.norm_modulate import rms_norm_modulate


@pytest.fixture
def probe_op():
    """A throwaway op whose rules count how often they are asked."""
    calls = {"available": 0, "accepts": 0, "fits": 0}

    def counted(name, result):
        def rule(*_a, **_k):
            calls[name] += 1
            return result(*_a, **_k) if callable(result) else result
        return rule

    name = "test_dispatch_probe"
    dispatch.register(name, "cuda", available=counted("available", False))
    dispatch.register(name, "triton", available=counted("available", True),
                      accepts=counted("accepts", lambda device_type, dtype, **_: dtype == torch.float32),
                      fits=counted("fits", lambda x: x.dim() == 2))
    dispatch.register(name, "torch")
    yield name, calls
    dispatch._OPS.pop(name)
    dispatch.clear_cache()


def test_decision_is_cached_per_device_type_and_dtype_and_fits_runs_per_call(probe_op, monkeypatch):
    name, calls = probe_op
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")       # the interpreter is a triton backend on CPU
    if not optional.triton_usable():
        pytest.skip("triton cannot run here")
    x = torch.zeros(2, 3)
    assert [dispatch.select(name, x) for _ in range(5)] == ["triton"] * 5
    assert calls == {"available": 1, "accepts": 1, "fits": 5}   # cuda is not tried: below the forced family
    assert dispatch.select(name, torch.zeros(2, 3, 4)) == "torch"  # fits says no: the next backend
    assert calls["accepts"] == 1 and calls["fits"] == 6
    assert dispatch.select(name, x.double()) == "torch"           # another dtype: a new decision
    assert calls["accepts"] == 2 and calls["fits"] == 6


def test_changing_lens_fast_backend_drops_the_cache(probe_op, monkeypatch):
    name, calls = probe_op
    x = torch.zeros(2, 3)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.select(name, x) == "torch"                    # auto never runs the interpreter
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.select(name, x) == "torch"
    if optional.triton_usable():
        monkeypatch.setenv(dispatch.ENV_VAR, "triton")
        assert dispatch.select(name, x) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="LENS_FAST_BACKEND='bogus'"):
        dispatch.select(name, x)
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(dispatch.BackendUnavailableError, match="LENS_FAST_BACKEND=cuda"):
            dispatch.select(name, x)


def test_an_entry_point_decides_once_per_call(monkeypatch):
    x = torch.randn(2, 5, 16)
    mods = torch.randn(2, 6 * 16)
    decisions = []
    real = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda op, *a, **k: decisions.append(op) or real(op, *a, **k))
    for backend in ("torch", "triton") if optional.triton_usable() else ("torch",):
        monkeypatch.setenv(dispatch.ENV_VAR, backend)
        decisions.clear()
        rms_norm_modulate(x, torch.ones(16), mods[:, :16], mods[:, 16:32], 1e-6)
        assert decisions == ["rms_norm_modulate"], backend
