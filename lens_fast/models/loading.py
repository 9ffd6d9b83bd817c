"""Checkpoint I/O for lens_fast models: safetensors only (never unpickling).

``from_pretrained`` builds the model on the meta device and materialises every
parameter straight from the (single or sharded) safetensors file, so no second copy of
the weights exists in memory. ``save_pretrained`` writes atomically and never
overwrites an existing checkpoint unless asked to.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CorruptFile, InvalidValue, MissingFile, OutputExists, UserError, one_line, storage_error
from .config import read_json
from .hub import parse_device_map, resolve_folder, variant_name

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key in DTYPES:
        return DTYPES[key]
    raise InvalidValue(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)} or a torch.dtype")


PICKLE_EXTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _conversion_hint(folder: str, pickle_name: str) -> str:
    stem = os.path.splitext(pickle_name)[0]
    target = "model" if stem == "pytorch_model" else stem
    src, dst = os.path.join(folder, pickle_name), os.path.join(folder, target + ".safetensors")
    return ("convert it once, in an environment where you trust the file: python -c \"import torch; "
            "from safetensors.torch import save_file; "
            f"save_file(torch.load('{src}', weights_only=True), '{dst}')\" (sharded .bin files: load the folder "
            "with transformers/diffusers and save_pretrained it, which writes safetensors)")


@contextlib.contextmanager
def _reading(path: str):
    """Turn a failed safetensors read into a CorruptFile naming ``path``."""
    try:
        yield
    except SafetensorError as e:
        raise CorruptFile(f"corrupt safetensors file {path}: {one_line(e)}") from None
    except OSError as e:
        raise CorruptFile(f"cannot read safetensors file {path}: {one_line(e)}") from None


def check_safetensors(path: str) -> None:
    """Read a safetensors file's header (which also checks the file is long enough for
    every tensor it lists); a CorruptFile naming the file when it is not usable."""
    with _reading(path), safe_open(path, framework="pt", device="cpu") as f:
        f.keys()


def _read_index(index: str, folder: str) -> Tuple[list, Dict[str, str]]:
    """(shard paths, key -> file) of a ``*.safetensors.index.json``; every shard must exist."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptFile(f"{index} is not a valid safetensors index (need a 'weight_map'): {one_line(e)}") \
            from None
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise MissingFile(f"{index} names shard(s) that are missing from {folder}: {missing}")
    return [os.path.join(folder, f) for f in files], weight_map


def _refuse_pickles(folder: str, what: str) -> None:
    pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_EXTS))
    if pickles:
        raise MissingFile(f"{folder} ({what}) holds only pickle weights ({', '.join(pickles)}); lens_fast loads "
                          "safetensors only and never unpickles. To use it, " + _conversion_hint(folder, pickles[0]))


def check_weights_folder(folder: str, what: str) -> list:
    """The safetensors files of a component folder (any file names: transformers,
    diffusers and lens_fast layouts), each header checked. A folder holding only pickle
    weights, no weights, or a sharded index naming missing files is refused with one line."""
    names = sorted(os.listdir(folder))
    for index in (n for n in names if n.endswith(".safetensors.index.json")):
        _read_index(os.path.join(folder, index), folder)
    paths = [os.path.join(folder, n) for n in names if n.endswith(".safetensors")]
    if not paths:
        _refuse_pickles(folder, what)
        raise MissingFile(f"{folder} ({what}) holds no weights; expected *.safetensors files")
    for path in paths:
        check_safetensors(path)
    return paths


WEIGHTED_COMPONENTS = ("transformer", "vae", "text_encoder")


def check_component_files(folder: str, components) -> None:
    """Every JSON file of each component folder parses, and each weighted component
    holds readable safetensors: a checkpoint folder's problems surface before any of
    its components loads."""
    for name in components:
        sub = os.path.join(folder, name)
        for json_name in sorted(n for n in os.listdir(sub) if n.endswith(".json")):
            read_json(os.path.join(sub, json_name))
        if name in WEIGHTED_COMPONENTS:
            check_weights_folder(sub, f"the {name.replace('_', ' ')}")


def _variants_in(folder: str, weights_name: str) -> list:
    """The variant tags of a folder's weight files (``<name>.<tag>[-00001-of-00002].safetensors``)."""
    pattern = re.compile(re.escape(weights_name) + r"\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.safetensors")
    return sorted({m.group(1) for m in map(pattern.fullmatch, os.listdir(folder)) if m})


def find_weight_files(folder: str, weights_name: str, variant: Optional[str] = None
                      ) -> Tuple[list, Optional[Dict[str, str]]]:
    """The safetensors file(s) of a model folder (of ``variant``, diffusers' naming) and,
    when sharded, the key -> file map."""
    single_name = variant_name(weights_name + ".safetensors", variant)
    index_name = variant_name(weights_name + ".safetensors.index.json", variant)
    if os.path.isfile(os.path.join(folder, index_name)):
        return _read_index(os.path.join(folder, index_name), folder)
    if os.path.isfile(os.path.join(folder, single_name)):
        return [os.path.join(folder, single_name)], None
    variants = [v for v in _variants_in(folder, weights_name) if v != variant]
    if variant is None:
        _refuse_pickles(folder, "weights")
    hint = f"; it holds variant {variants} files: pass variant={variants[0]!r}" if variants else ""
    raise MissingFile(f"{folder} has neither {single_name} nor {index_name}{hint}")


def iter_safetensors(files: Iterable[str], device="cpu"):
    for path in files:
        with _reading(path), safe_open(path, framework="pt", device=str(device)) as f:
            for key in f.keys():
                yield path, key, f.get_slice(key).get_shape(), lambda f=f, key=key: f.get_tensor(key)


def load_state_dict_into(model: torch.nn.Module, files, dtype: Optional[torch.dtype], device="cpu",
                         strict: bool = True) -> None:
    """Check names and shapes against ``model`` (possibly on meta), then assign tensors
    read from ``files`` (cast to ``dtype``) without a second copy."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {}
    tensors = {}
    wrong = []
    for path, key, shape, get in iter_safetensors(files, device):
        found[key] = path
        if key in expected and tuple(shape) != expected[key]:
            wrong.append(f"{key}: file has {tuple(shape)}, model expects {expected[key]}")
            continue
        if key in expected:
            try:
                t = get()
            except SafetensorError as e:
                raise CorruptFile(f"corrupt safetensors file {path} (tensor {key}): {one_line(e)}") from None
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[key] = t
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {wrong[:8]}")
    if problems and (strict or wrong):
        raise CorruptFile(f"checkpoint {sorted(set(found.values()))} does not match {type(model).__name__}: "
                         + "; ".join(problems))
    model.load_state_dict(tensors, strict=strict, assign=True)


def atomic_write_folder(target: str, write_fn, overwrite: bool, stale_prefix: Optional[str] = None) -> None:
    """Write a folder's files into a temp dir beside ``target`` then move them in. A
    failed write (disk full, permissions) raises ``StorageError`` naming ``target``."""
    try:
        os.makedirs(target, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=target)
    except OSError as e:
        raise storage_error(f"cannot write {target}", e) from None
    try:
        _fill_folder(target, tmp, write_fn, overwrite, stale_prefix)
    except OSError as e:
        if isinstance(e, UserError):
            raise
        raise storage_error(f"cannot write {target}", e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fill_folder(target: str, tmp: str, write_fn, overwrite: bool, stale_prefix: Optional[str]) -> None:
    write_fn(tmp)
    names = os.listdir(tmp)
    clashes = [n for n in names if os.path.exists(os.path.join(target, n))]
    if clashes and not overwrite:
        raise OutputExists(f"{target} already holds {clashes}; pass overwrite=True to replace them")
    if overwrite and stale_prefix:
        # A replaced checkpoint must not leave shards (or an index) of the old one behind.
        for n in os.listdir(target):
            if n.startswith(stale_prefix) and n not in names and os.path.isfile(os.path.join(target, n)):
                os.remove(os.path.join(target, n))
    for n in names:
        dst = os.path.join(target, n)
        if os.path.isdir(dst) and not os.path.islink(dst):  # a component folder being replaced
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, n), dst)


class ModelLoadingMixin:
    """``from_pretrained`` / ``save_pretrained`` for a module with a ``config_class``,
    accepting diffusers' arguments (hub ids, ``variant``, ``max_shard_size`` strings,
    ``low_cpu_mem_usage``, single-device ``device_map``) and reading and writing
    safetensors only."""

    config_class = None
    weights_name = "diffusion_pytorch_model"

    @classmethod
    def _resolve_folder(cls, folder, subfolder: Optional[str], hub_kwargs: Optional[dict] = None) -> str:
        folder = os.fspath(folder)
        patterns = [f"{subfolder}/*"] if subfolder else None
        folder = resolve_folder(folder, patterns, **(hub_kwargs or {}))
        if subfolder:
            folder = os.path.join(folder, subfolder)
        if not os.path.isdir(folder):
            raise MissingFile(f"model folder {folder} does not exist")
        if not os.path.isfile(os.path.join(folder, "config.json")) and \
                os.path.isfile(os.path.join(folder, "model_index.json")) and \
                os.path.isdir(os.path.join(folder, "transformer")):
            folder = os.path.join(folder, "transformer")
        return folder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, torch_dtype=None,
                        device=None, *, variant: Optional[str] = None, low_cpu_mem_usage: bool = True,
                        device_map=None, use_safetensors: Optional[bool] = None, cache_dir=None,
                        revision: Optional[str] = None, token=None, local_files_only: Optional[bool] = None,
                        force_download: bool = False, proxies=None, **overrides):
        """Load ``config.json`` + safetensors weights (single file or sharded) from a
        folder or a Hub repo id (``subfolder`` inside it), as diffusers' ``from_pretrained``
        does; ``overrides`` replace config keys. ``low_cpu_mem_usage`` (default) builds the
        model on the meta device and assigns the file's tensors (no second copy); False
        builds it on the CPU first. Pickle weights are never read (``use_safetensors=False``
        is refused)."""
        if use_safetensors is False:
            raise InvalidValue("use_safetensors=False: lens_fast loads safetensors only and never unpickles")
        target = parse_device_map(device_map)
        if target is not None and device is not None and torch.device(device) != target:
            raise InvalidValue(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
        device = target if target is not None else (device if device is not None else "cpu")
        hub = dict(cache_dir=cache_dir, revision=revision, token=token, local_files_only=local_files_only,
                   force_download=force_download, proxies=proxies)
        folder = cls._resolve_folder(pretrained_model_name_or_path, subfolder, hub)
        dtype = None if torch_dtype == "auto" else resolve_dtype(torch_dtype)
        config = cls.config_class.from_json_file(os.path.join(folder, "config.json"))
        config.update(overrides)
        files, _ = find_weight_files(folder, cls.weights_name, variant)
        if low_cpu_mem_usage:
            with torch.device("meta"):
                model = cls(**config)
        else:
            model = cls(**config)
        load_state_dict_into(model, files, dtype, device=device)
        for name, buf in list(model.named_buffers()):
            if buf.is_meta:
                raise RuntimeError(f"buffer {name} was not materialised from the checkpoint")
        return model.to(device).eval()

    def _config_json(self) -> dict:
        """``config.json``: the config class's keys (lens_fast options only when not at their
        default), plus diffusers' ``_diffusers_version``. Keys registered with
        ``register_to_config`` that the class does not know are left out, with a warning."""
        import diffusers

        data = {k: v for k, v in dict(self.config).items() if not k.startswith("_")}
        known = set(self.config_class.known_keys())
        dropped = sorted(set(data) - known)
        if dropped:
            logger.warning("config key(s) %s are not %s config keys; config.json leaves them out",
                           dropped, self.config_class.class_name)
        out = self.config_class.from_dict({k: v for k, v in data.items() if k in known}).to_json_dict()
        return {**out, "_diffusers_version": diffusers.__version__}

    def save_pretrained(self, save_directory, is_main_process: bool = True, save_function=None,
                        safe_serialization: bool = True, variant: Optional[str] = None,
                        max_shard_size: Union[int, str, None] = "10GB", push_to_hub: bool = False,
                        overwrite: bool = False, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                        **kwargs) -> None:
        """Write ``config.json`` and ``<weights_name>[.variant].safetensors`` (sharded
        above ``max_shard_size``, bytes or a string like "5GB", with an index) atomically,
        in diffusers' layout. Never overwrites an existing checkpoint unless
        ``overwrite=True``. Only safetensors are written: ``safe_serialization=False`` is
        answered with a warning, not a pickle; ``push_to_hub`` and ``save_function`` are
        refused (upload the folder with ``huggingface_hub.upload_folder``)."""
        if push_to_hub or save_function is not None or kwargs:
            extra = sorted(kwargs) + (["push_to_hub"] if push_to_hub else []) + \
                (["save_function"] if save_function is not None else [])
            raise InvalidValue(f"save_pretrained got {extra}: lens_fast writes the folder locally in safetensors; "
                               "upload it with huggingface_hub.upload_folder")
        if not safe_serialization:
            logger.warning("safe_serialization=False: lens_fast writes safetensors only (never pickle)")
        if not is_main_process:
            return
        sd = state_dict if state_dict is not None else self.state_dict()
        sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
        config = self._config_json()
        name = variant_name(self.weights_name + ".safetensors", variant)
        pattern = name.replace(".safetensors", "{suffix}.safetensors")

        def write(tmp):
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
            if max_shard_size is None:
                save_file(sd, os.path.join(tmp, name), metadata={"format": "pt"})
                return
            from huggingface_hub import split_torch_state_dict_into_shards

            split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size, filename_pattern=pattern)
            for filename, keys in split.filename_to_tensors.items():
                save_file({k: sd[k] for k in keys}, os.path.join(tmp, filename), metadata={"format": "pt"})
            if split.is_sharded:
                index = variant_name(self.weights_name + ".safetensors.index.json", variant)
                with open(os.path.join(tmp, index), "w", encoding="utf-8") as f:
                    json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2)

        atomic_write_folder(os.fspath(save_directory), write, overwrite, stale_prefix=self.weights_name)
