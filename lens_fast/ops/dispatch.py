"""One dispatch decision per op call, cached.

Each op registers the backends it implements (``cuda``, ``triton``, ``torch`` and, for
attention, ``flash_attn`` / ``sdpa``) in its preference order, each with three rules:
``available()`` (can it run in this process: imports, devices), ``accepts(device_type,
dtype, auto, **info)`` (a rule on the first tensor's device type and dtype, whether the
choice is automatic, and the op's keyword ``info``) and optionally ``fits(*tensors,
**info)`` (what varies per call: alignment, row width, head dim, every input's dtype and
device). ``select(op, *tensors, **info)`` returns the first backend that passes all three.

The first two rules are evaluated once per (op, device type, dtype, info,
``LENS_FAST_BACKEND``) and the result is cached as a short plan: the backends that remain,
cut after the first one without a ``fits`` rule (just that backend's name when it comes
first). A call then costs reading ``LENS_FAST_BACKEND`` and a dictionary lookup, plus the
``fits`` rules of the plan (none on the CPU, one or two on a GPU). The cache is dropped
when ``LENS_FAST_BACKEND`` changes and when a backend is registered; ``clear_cache()``
drops it by hand (e.g. after changing ``TRITON_INTERPRET``, which Triton itself reads
once, when the kernels are imported).

Each entry point decides once per call (``entry_backend``) and hands the decision to its
custom op; only under ``torch.compile``, which must not trace the decision, does the custom
op's body decide, at run time.

``LENS_FAST_BACKEND=torch|triton|cuda|auto`` forces one backend family for every op: a
forced family that is unavailable is a loud error; an op with no implementation of the
forced family for these inputs uses the next one down the chain cuda -> triton -> torch
(logged once). Auto never picks the Triton interpreter (CPU tensors run Triton only when
asked for by name: tests). Optional dependencies are probed once in ``optional``.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch

from . import optional

log = logging.getLogger("lens_fast.dispatch")

ENV_VAR = "LENS_FAST_BACKEND"
FAMILIES = ("cuda", "triton", "torch")
# Backend name -> family it belongs to (what LENS_FAST_BACKEND selects).
_FAMILY_OF = {"cuda": "cuda", "flash_attn": "cuda", "sdpa": "cuda", "triton": "triton", "torch": "torch"}


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run here."""


def _any(*_a, **_k) -> bool:
    return True


class Backend(NamedTuple):
    name: str
    available: Callable[[], bool]
    accepts: Callable[..., bool]
    fits: Optional[Callable[..., bool]]


_OPS: Dict[str, List[Backend]] = {}
_PLANS: Dict[tuple, Union[str, Tuple[Backend, ...]]] = {}  # a name: no per-call rule left
_ENV: List[Optional[str]] = ["unread"]
_LOGGED: set = set()


def _log_once(key, msg, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(msg, *args)


def register(op: str, backend: str, available: Callable[[], bool] = lambda: True,
             accepts: Callable[..., bool] = _any, fits: Optional[Callable[..., bool]] = None) -> None:
    """Register ``backend`` for ``op``; registration order is the preference order.
    ``accepts(device_type, dtype, auto=..., **info)`` must depend on nothing else (it is cached)."""
    if backend not in _FAMILY_OF:
        raise ValueError(f"unknown backend {backend!r}; expected one of {sorted(_FAMILY_OF)}")
    entry = [b for b in _OPS.get(op, []) if b.name != backend]
    _OPS[op] = entry + [Backend(backend, available, accepts, fits)]
    clear_cache()


def clear_cache() -> None:
    """Forget every cached decision (after changing what is available by hand)."""
    _PLANS.clear()


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


def _plan(op: str, device_type: str, dtype, info: dict, env: Optional[str], tensors):
    """The backends worth trying, in order, for these static properties (module docstring);
    just the backend's name when the first of them has no per-call rule."""
    if op not in _OPS:
        raise KeyError(f"no op named {op!r}; registered ops: {sorted(_OPS)}")
    forced = forced_backend()
    if forced is not None and not family_available(forced):
        raise BackendUnavailableError(f"{ENV_VAR}={forced} but the {forced} backend is unavailable here "
                                      f"({optional.why_unavailable(forced)})")
    families = FAMILIES if forced is None else FAMILIES[FAMILIES.index(forced):]
    plan = []
    for family in families:
        for b in _OPS[op]:
            if _FAMILY_OF[b.name] != family:
                continue
            if forced is None and family == "triton" and device_type != "cuda":
                continue  # auto never runs the interpreter
            if b.available() and b.accepts(device_type, dtype, auto=forced is None, **info):
                plan.append(b)
                if b.fits is None:
                    if len(plan) == 1:
                        _log_choice(op, b.name, env, tensors)
                        return b.name
                    return tuple(plan)
    return tuple(plan)


def select(op: str, *tensors, **info) -> str:
    """Name of the backend that runs ``op`` on these inputs (the first tensor argument gives
    the device type and dtype of the cached decision; ``info`` must be hashable)."""
    env = os.environ.get(ENV_VAR)
    if env != _ENV[0]:
        _PLANS.clear()
        _ENV[0] = env
    device_type, dtype = "none", None
    for t in tensors:
        if isinstance(t, torch.Tensor):
            device_type = "cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type
            dtype = t.dtype
            break
    key = (op, device_type, dtype, *info.items())
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(op, device_type, dtype, info, env, tensors)
    if plan.__class__ is str:
        return plan
    for b in plan:
        if b.fits is None or b.fits(*tensors, **info):
            if (op, b.name, env) not in _LOGGED:  # the message is built only when logged
                _log_choice(op, b.name, env, tensors)
            return b.name
    forced = forced_backend()
    raise BackendUnavailableError(f"{op}: no backend {f'at or below {forced!r} ' if forced else ''}supports "
                                  f"these inputs ({_signature(tensors)})")


def _log_choice(op: str, name: str, env: Optional[str], tensors) -> None:
    forced = forced_backend()
    if forced is not None and _FAMILY_OF[name] != forced:
        _log_once((op, name, env), "%s: no %s implementation for these inputs; using %s", op, forced, name)
    else:
        _log_once((op, name, env), "%s: using backend %s (first call: %s)", op, name, _signature(tensors))


def entry_backend(op: str, *tensors, **info) -> str:
    """An entry point's one decision for this call: ``select`` in eager mode; "" under
    torch.compile, where the custom op's body decides at run time (a decision must not be
    traced into the graph)."""
    return "" if torch.compiler.is_compiling() else select(op, *tensors, **info)


def backends(op: str) -> List[str]:
    return [b.name for b in _OPS[op]]


def _signature(tensors) -> str:
    return ", ".join(f"{t.device.type}:{str(t.dtype).replace('torch.', '')}{list(t.shape)}"
                     for t in tensors if isinstance(t, torch.Tensor))


def on_gpu(*tensors) -> bool:
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    return bool(ts) and all(t.is_cuda for t in ts)


def triton_accepts(device_type: str, dtype=None, **_info) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    return device_type == "cuda" or (device_type == "cpu" and optional.triton_interpreted())


def triton_supports(*tensors) -> bool:
    """``triton_accepts`` for every tensor given (all on CUDA, or all on the CPU when interpreted)."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not ts:
        return False
    if all(t.is_cuda for t in ts):
        return True
    return optional.triton_interpreted() and all(t.device.type == "cpu" for t in ts)
