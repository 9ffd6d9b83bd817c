"""``LensPipeline.from_pretrained`` / ``save_pretrained`` with diffusers' arguments.

A folder or Hub repo id in the official diffusers layout (``model_index.json`` +
``transformer/``, ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``) loads
into the pipeline's five components: lens_fast's ``LensTransformer2DModel``, diffusers'
``AutoencoderKLFlux2`` and scheduler, the GPT-OSS causal LM and its tokenizer
(transformers). diffusers' arguments work as there: ``torch_dtype`` (one dtype, or a
dict by component name with "default"), ``variant`` (weight-file variants such as
"fp16"), ``device_map`` (one device), ``low_cpu_mem_usage``, the Hub options, and
components passed in by name replace the folder's. What lens_fast adds: every
component's files are checked before any loads (one-line errors), weights are read
from safetensors only, and ``save_pretrained`` writes atomically and never overwrites a
checkpoint unless ``overwrite=True``.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Optional

import torch

from .errors import InvalidValue, MissingFile
from .models.config import read_json
from .models.hub import parse_device_map, resolve_folder
from .models.loading import atomic_write_folder, check_component_files, resolve_dtype
from .models.transformer import LensTransformer2DModel
from .text_encoder import LensTextEncoder
from .vae import LensVAE, load_flux2_vae

COMPONENTS = ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
REQUIRED = ("transformer", "vae", "scheduler")
WEIGHTED = ("transformer", "vae", "text_encoder")
# Recommended settings per Lens variant: (steps, guidance).
VARIANT_DEFAULTS = {"lens": (20, 5.0), "lens-turbo": (4, 1.0), "lens-base": (20, 5.0)}
# diffusers' DiffusionPipeline reports what it loaded on this logger; a subclass does the same.
load_logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
logger = logging.getLogger(__name__)


def detect_variant(folder: str) -> str:
    """The Lens variant of a checkpoint folder (a root or its transformer/): ``_lens_variant``
    in ``model_index.json`` (written by lens_fast's exports), else "lens-turbo" when the
    folder's name says turbo (``microsoft/Lens-Turbo``), else "lens"."""
    folder = os.path.normpath(os.fspath(folder))
    root = os.path.dirname(folder) if os.path.basename(folder) == "transformer" else folder
    index_path = os.path.join(root, "model_index.json")
    variant = read_json(index_path).get("_lens_variant") if os.path.isfile(index_path) else None
    if variant is None:
        variant = "lens-turbo" if "turbo" in os.path.basename(root).lower() else "lens"
    if variant not in VARIANT_DEFAULTS:
        raise InvalidValue(f"{index_path}: _lens_variant={variant!r}; expected one of {sorted(VARIANT_DEFAULTS)}")
    return variant


def _dtype_for(torch_dtype, name: str) -> Optional[torch.dtype]:
    if isinstance(torch_dtype, dict):
        unknown = sorted(set(torch_dtype) - set(COMPONENTS) - {"default"})
        if unknown:
            raise InvalidValue(f"torch_dtype has key(s) {unknown}; expected component names {list(COMPONENTS)} "
                               "or 'default'")
        return resolve_dtype(torch_dtype.get(name, torch_dtype.get("default", torch.float32)))
    return None if torch_dtype == "auto" else resolve_dtype(torch_dtype)


def _has_variant(folder: str, variant: str) -> bool:
    return any(f".{variant}." in n or f".{variant}-" in n for n in os.listdir(folder))


def _library_entry(name: str, module) -> list:
    """The ``model_index.json`` entry [library, class] that diffusers writes for ``module``."""
    if module is None:
        return [None, None]
    if isinstance(module, LensTransformer2DModel):
        return ["diffusers", "LensTransformer2DModel"]  # the reference's name: diffusers loads it too
    cls = type(module)
    library = cls.__module__.split(".")[0]
    if name == "text_encoder" and cls.__name__ == "LensGptOssEncoder":
        library = "transformers"  # diffusers' Lens registers its encoder under transformers
    return [library, cls.__name__]


class LensPipelineLoading:
    """The loading half of ``LensPipeline`` (see the module docstring)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, torch_dtype=None, variant: Optional[str] = None,
                        lens_variant: Optional[str] = None, lens_defaults: bool = False, device=None,
                        device_map=None, low_cpu_mem_usage: bool = True, use_safetensors: Optional[bool] = None,
                        cache_dir=None, revision: Optional[str] = None, token=None,
                        local_files_only: Optional[bool] = None, force_download: bool = False, proxies=None,
                        template_date: Optional[str] = None, text_encoder_dtype=None,
                        quantization: Optional[str] = None, reasoner=None, **components):
        """Load every component of a Lens checkpoint (a folder or a Hub repo id).

        diffusers' arguments behave as in ``DiffusionPipeline.from_pretrained``;
        components passed by name (``transformer=...``, ``text_encoder=None``) are used
        instead of the folder's. lens_fast's: ``lens_variant`` ("lens", "lens-turbo",
        "lens-base"; read from the folder when None) picks ``pipe.recommended``, which
        ``lens_defaults=True`` makes the steps/guidance of calls that give none (else
        diffusers' 50 / 4.0); ``template_date`` fixes the date the chat template stamps
        (reproducible encodings); ``quantization="fp8"`` the opt-in FP8 layers;
        ``reasoner`` a prompt rewriter (``lens_fast.reasoner``). ``variant`` naming a Lens
        variant is read as ``lens_variant`` (lens_fast's earlier spelling)."""
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise TypeError(f"LensPipeline.from_pretrained got unexpected argument(s) {unknown}")
        if variant in VARIANT_DEFAULTS:
            lens_variant, variant = variant, None
        if quantization not in (None, "fp8"):
            raise InvalidValue(f"quantization={quantization!r}; expected None or 'fp8'")
        if use_safetensors is False:
            raise InvalidValue("use_safetensors=False: lens_fast loads safetensors only and never unpickles")
        target = parse_device_map(device_map)
        device = target if target is not None else (device if device is not None else "cpu")
        hub = dict(cache_dir=cache_dir, revision=revision, token=token, local_files_only=local_files_only,
                   force_download=force_download, proxies=proxies)
        folder = resolve_folder(pretrained_model_name_or_path, None, **hub)
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            raise MissingFile(f"{folder} is not a Lens checkpoint folder: model_index.json is missing")
        index = read_json(index_path)
        to_load = [n for n in COMPONENTS if n not in components and _present(index, n)]
        for name in REQUIRED:
            if name not in components and name not in to_load:
                raise InvalidValue(f"{index_path} has no {name} component; a Lens pipeline needs one")
        for name in to_load:
            if not os.path.isdir(os.path.join(folder, name)):
                raise MissingFile(f"{folder} is missing the {name}/ folder named in model_index.json")
        sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
        if "scheduler" in to_load and not os.path.isfile(sched_path):
            raise MissingFile(f"missing {sched_path}")
        check_component_files(folder, to_load)  # every component's files, before any of them loads
        with_variant = {n for n in to_load if n in WEIGHTED and variant and _has_variant(os.path.join(folder, n),
                                                                                          variant)}
        if variant is not None and not with_variant:
            raise InvalidValue(f"You are trying to load the model files of the `variant={variant}`, but no such "
                               f"modeling files are available in {folder}.")
        loaded = {}
        for name in to_load:
            loaded[name] = cls._load_component(folder, name, index[name], _dtype_for(torch_dtype, name), device,
                                               variant if name in with_variant else None, low_cpu_mem_usage,
                                               loaded, template_date, text_encoder_dtype)
            load_logger.info(f"Loaded {name} as {index[name][1]} from `{name}` subfolder of "
                             f"{pretrained_model_name_or_path}.")
        encoder = loaded.pop("prompt_encoder", None)
        parts = {**{n: None for n in COMPONENTS}, **loaded, **components}
        if lens_variant is None:
            lens_variant = detect_variant(folder)
        if isinstance(reasoner, str):
            from .reasoner import build_reasoner

            reasoner = build_reasoner(reasoner, encoder)
        pipe = cls(**parts, lens_variant=lens_variant, reasoner=reasoner, lens_defaults=lens_defaults)
        if encoder is not None and parts["text_encoder"] is encoder.model and parts["tokenizer"] is encoder.tokenizer:
            pipe.prompt_encoder = encoder  # keeps its template date and settings
        elif template_date is not None and pipe.prompt_encoder is not None:
            pipe.prompt_encoder.template_date = template_date
        pipe.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        if quantization is not None:
            from .quant import apply_quantization

            apply_quantization(pipe, quantization)
        return pipe

    @classmethod
    def _load_component(cls, folder, name, entry, dtype, device, variant, low_cpu_mem_usage, loaded,
                        template_date, text_encoder_dtype):
        if name == "transformer":
            return LensTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype,
                                                          device=device, variant=variant,
                                                          low_cpu_mem_usage=low_cpu_mem_usage)
        if name == "vae":
            return load_flux2_vae(os.path.join(folder, "vae"), dtype, device, variant=variant)
        if name == "scheduler":
            import diffusers

            scheduler_cls = getattr(diffusers, entry[1], None) if entry[0] == "diffusers" else None
            if scheduler_cls is None or not issubclass(scheduler_cls, diffusers.SchedulerMixin):
                raise InvalidValue(f"model_index.json names scheduler {entry}; expected a diffusers scheduler "
                                   "such as FlowMatchEulerDiscreteScheduler")
            return scheduler_cls.from_pretrained(folder, subfolder="scheduler")
        if name in ("text_encoder", "tokenizer"):
            if "prompt_encoder" not in loaded:
                layers = cls._selected_layers(folder, loaded)
                loaded["prompt_encoder"] = LensTextEncoder.from_pretrained(
                    folder, layers, torch_dtype=resolve_dtype(text_encoder_dtype) or dtype, device=device,
                    template_date=template_date, variant=variant)
            encoder = loaded["prompt_encoder"]
            return encoder.model if name == "text_encoder" else encoder.tokenizer
        raise InvalidValue(f"unknown component {name!r}")

    @staticmethod
    def _selected_layers(folder, loaded):
        transformer = loaded.get("transformer")
        if transformer is not None:
            return transformer.config.selected_layer_index
        return read_json(os.path.join(folder, "transformer", "config.json")).get("selected_layer_index",
                                                                                 [5, 11, 17, 23])

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: Optional[str] = None,
                        max_shard_size=None, push_to_hub: bool = False, overwrite: bool = False, **kwargs) -> None:
        """Write every component and ``model_index.json`` in diffusers' layout (what
        ``from_pretrained`` here and diffusers' ``LensPipeline`` read), atomically; an
        existing checkpoint is replaced only with ``overwrite=True``. Safetensors only
        (``safe_serialization=False`` gets a warning, not a pickle); ``push_to_hub`` is
        refused (upload the folder with ``huggingface_hub.upload_folder``)."""
        if push_to_hub or kwargs:
            raise InvalidValue(f"save_pretrained got {sorted(kwargs) + (['push_to_hub'] if push_to_hub else [])}: "
                               "lens_fast writes the folder locally; upload it with huggingface_hub.upload_folder")
        if not safe_serialization:
            logger.warning("safe_serialization=False: lens_fast writes safetensors only (never pickle)")
        parts = dict(self.components)
        if isinstance(parts["vae"], LensVAE):
            parts["vae"] = parts["vae"].vae
        if isinstance(parts["text_encoder"], LensTextEncoder):
            parts["text_encoder"], parts["tokenizer"] = parts["text_encoder"].model, parts["text_encoder"].tokenizer
        shard = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        index = {"_class_name": type(self).__name__}
        import diffusers

        index["_diffusers_version"] = diffusers.__version__
        if self.variant != "lens":
            index["_lens_variant"] = self.variant

        def write(tmp):
            for name in COMPONENTS:
                module = parts[name]
                if module is not None and not hasattr(module, "save_pretrained"):
                    logger.warning("%s (%s) cannot be saved; model_index.json lists it as null", name,
                                   type(module).__name__)
                    module = None
                index[name] = _library_entry(name, module)
                if module is None:
                    continue
                path = os.path.join(tmp, name)
                if name in ("scheduler", "tokenizer"):
                    module.save_pretrained(path)
                else:
                    options = dict(variant=variant, **shard)
                    if "safe_serialization" in inspect.signature(module.save_pretrained).parameters:
                        options["safe_serialization"] = True
                    module.save_pretrained(path, **options)
            with open(os.path.join(tmp, "model_index.json"), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)

        atomic_write_folder(os.fspath(save_directory), write, overwrite)


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None
