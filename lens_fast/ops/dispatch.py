"""One dispatch point for every fused op.

Each op registers the backends it implements (``cuda``, ``triton``, ``torch`` and, for
attention, ``flash_attn`` / ``sdpa``). ``select(op, *tensors)`` picks the first backend
in the op's preference order that is available and supports the inputs (device, dtype,
shape). ``LENS_FAST_BACKEND=torch|triton|cuda|auto`` forces one backend for every op:
a forced backend that is unavailable is a loud error; an op that has no implementation
of the forced family uses the next one down the chain cuda -> triton -> torch (logged
once). Optional dependencies are probed once in ``lens_fast.ops.optional``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import optional

log = logging.getLogger("lens_fast.dispatch")

ENV_VAR = "LENS_FAST_BACKEND"
FAMILIES = ("cuda", "triton", "torch")
# Backend name -> family it belongs to (what LENS_FAST_BACKEND selects).
_FAMILY_OF = {"cuda": "cuda", "flash_attn": "cuda", "sdpa": "cuda", "triton": "triton", "torch": "torch"}


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run here."""


@dataclass
class _Backend:
    name: str
    available: Callable[[], bool]
    supports: Callable[..., bool]


@dataclass
class _Op:
    name: str
    backends: List[_Backend] = field(default_factory=list)


_OPS: Dict[str, _Op] = {}
_LOGGED: set = set()


def _log_once(key, msg, *args, level=logging.INFO):
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.log(level, msg, *args)


def _always(*_a, **_k) -> bool:
    return True


def register(op: str, backend: str, available: Callable[[], bool] = lambda: True,
             supports: Callable[..., bool] = _always) -> None:
    """Register ``backend`` for ``op``; registration order is the preference order."""
    if backend not in _FAMILY_OF:
        raise ValueError(f"unknown backend {backend!r}; expected one of {sorted(_FAMILY_OF)}")
    entry = _OPS.setdefault(op, _Op(op))
    entry.backends = [b for b in entry.backends if b.name != backend]
    entry.backends.append(_Backend(backend, available, supports))


def forced_backend() -> Optional[str]:
    """The backend family forced by ``LENS_FAST_BACKEND``, or None for ``auto``/unset."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in FAMILIES:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; expected one of "
                         f"{', '.join(FAMILIES)} or auto")
    return value


def family_available(family: str) -> bool:
    if family == "torch":
        return True
    if family == "triton":
        return optional.triton_usable()
    if family == "cuda":
        return torch.cuda.is_available()
    raise ValueError(f"unknown backend family {family!r}")


def select(op: str, *tensors: torch.Tensor, **shape_info) -> str:
    """Name of the backend that runs ``op`` on these inputs."""
    if op not in _OPS:
        raise KeyError(f"no op named {op!r}; registered ops: {sorted(_OPS)}")
    entry = _OPS[op]
    forced = forced_backend()
    if forced is not None:
        if not family_available(forced):
            raise BackendUnavailableError(
                f"{ENV_VAR}={forced} but the {forced} backend is unavailable here "
                f"({optional.why_unavailable(forced)})")
        start = FAMILIES.index(forced)
        for family in FAMILIES[start:]:
            for b in entry.backends:
                if _FAMILY_OF[b.name] == family and b.available() and b.supports(*tensors, **shape_info):
                    if family != forced:
                        _log_once((op, forced, b.name), "%s: no %s implementation for these inputs; using %s",
                                  op, forced, b.name)
                    return b.name
        raise BackendUnavailableError(f"{op}: no backend at or below {forced!r} supports these inputs")
    gpu = on_gpu(*tensors)
    for b in entry.backends:
        # The Triton interpreter runs CPU tensors only when asked for by name (tests).
        if _FAMILY_OF[b.name] == "triton" and not gpu:
            continue
        if b.available() and b.supports(*tensors, **shape_info):
            if (op, b.name) not in _LOGGED:  # the signature string is built only when logged
                _log_once((op, b.name), "%s: using backend %s (first call: %s)", op, b.name, _signature(tensors))
            return b.name
    raise BackendUnavailableError(f"{op}: no registered backend supports these inputs")


def backends(op: str) -> List[str]:
    return [b.name for b in _OPS[op].backends]


def _signature(tensors) -> str:
    parts = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            parts.append(f"{t.device.type}:{str(t.dtype).replace('torch.', '')}{list(t.shape)}")
    return ", ".join(parts)


def on_gpu(*tensors: torch.Tensor) -> bool:
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    return bool(ts) and all(t.is_cuda for t in ts)


def triton_supports(*tensors: torch.Tensor, **_k) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not ts:
        return False
    if all(t.is_cuda for t in ts):
        return True
    return optional.triton_interpreted() and all(t.device.type == "cpu" for t in ts)
