"""Where checkpoints come from and what their files are called, as diffusers names them.

``resolve_folder`` turns a local folder or a Hugging Face Hub repo id ("microsoft/Lens")
into a local folder: a repo id is fetched with ``huggingface_hub.snapshot_download``
(which serves it from the local cache under ``HF_HUB_OFFLINE=1`` or
``local_files_only=True``), never with pickle weight files. ``variant_name`` and
``parse_device_map`` follow diffusers' conventions for ``variant=`` file names
(``diffusion_pytorch_model.fp16.safetensors``, ``...safetensors.index.fp16.json``) and
single-device ``device_map`` values.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch

from ..errors import InvalidValue, MissingFile, one_line

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5", "*.onnx")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` with no path syntax (a leading '/', '.', '~', or more slashes)."""
    return bool(_REPO_ID.fullmatch(name)) and not name.endswith((".json", ".safetensors"))


def resolve_folder(name_or_path, allow_patterns: Optional[Sequence[str]] = None, *, cache_dir=None,
                   revision: Optional[str] = None, token=None, local_files_only: Optional[bool] = None,
                   force_download: bool = False, proxies=None) -> str:
    """A local folder for ``name_or_path``: itself when it is a folder (or not a repo id,
    so the caller's own missing-folder error names it), else the Hub snapshot holding the
    files matching ``allow_patterns`` (all non-pickle files when None)."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path) or not looks_like_repo_id(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, revision=revision, cache_dir=cache_dir, token=token,
                                 local_files_only=bool(local_files_only), force_download=force_download,
                                 proxies=proxies, allow_patterns=list(allow_patterns) if allow_patterns else None,
                                 ignore_patterns=list(PICKLE_PATTERNS))
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds (offline, 404, auth, HTTP)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or local_files_only
        hint = " (offline: it must already be in the Hugging Face cache)" if offline else ""
        raise MissingFile(f"{path!r} is neither a local folder nor a Hub repo that can be fetched{hint}: "
                          f"{one_line(e)}") from None


def variant_name(filename: str, variant: Optional[str]) -> str:
    """diffusers' variant file name: the variant goes before the last extension
    (``model.safetensors`` -> ``model.fp16.safetensors``,
    ``model.safetensors.index.json`` -> ``model.safetensors.index.fp16.json``)."""
    if variant is None:
        return filename
    if not isinstance(variant, str) or not variant or "/" in variant or "." in variant:
        raise InvalidValue(f"variant={variant!r}: expected a file-name tag such as 'fp16'")
    stem, _, ext = filename.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def parse_device_map(device_map) -> Optional[torch.device]:
    """The one device a ``device_map`` names (a device, its name or index, or
    ``{"": device}``); None for None. Placements across devices are refused."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise InvalidValue(f"device_map={device_map!r}: lens_fast places a model on one device; "
                               "expected a device such as 'cuda', 'cpu' or {'': 'cuda:0'}")
        device_map = device_map[""]
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise InvalidValue(f"device_map={device_map!r}: lens_fast places a model on one device; "
                           "expected a device such as 'cuda' or 'cpu'")
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise InvalidValue(f"device_map={device_map!r}: expected a device such as 'cuda', 'cpu' or 0") from None
