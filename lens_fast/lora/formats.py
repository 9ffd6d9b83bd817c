"""LoRA files: reading them (safetensors only), mapping their keys onto Lens's official
module names, checking them against a model, and writing the diffusers/PEFT layout.

Key layouts read (one file, one adapter), for a module ``M`` of the official state dict
(``transformer_blocks.0.attn.img_qkv``, ``transformer_blocks.3.img_mlp.w1``, ...):

- diffusers / PEFT: ``transformer.M.lora_A.weight`` [r, in] and ``transformer.M.lora_B.weight``
  [out, r] (what diffusers' ``save_lora_weights`` and ``LensTransformer2DModel.load_lora_adapter``
  use); also without the ``transformer.`` prefix, with PEFT's ``base_model.model.`` prefix
  or ComfyUI's ``diffusion_model.``, with an adapter name (``lora_A.NAME.weight``), and with
  ``lora_down`` / ``lora_up`` for A / B;
- kohya (sd-scripts, musubi): ``lora_unet_M_WITH_UNDERSCORES.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (also ``lora_transformer_``), mapped back by matching every official module name
  with its dots turned into underscores.

Scaling: ``alpha / r`` per module, alpha from a ``M.alpha`` key, else the LoRA config
(diffusers' ``lora_adapter_metadata`` in the safetensors header, or PEFT's
``adapter_config.json`` beside the file: ``lora_alpha``, ``alpha_pattern``, ``use_rslora``),
else alpha = r (scale 1, the diffusers/PEFT convention for files without alphas).

Refused with one line naming the keys: pickle files, text-encoder LoRAs, DoRA, LoRA biases,
full-weight diffs, keys of any other form, modules this model does not have (a LoRA for
another model), and shapes or ranks that do not fit. Nothing here touches a model.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..atomic import write_bytes
from ..errors import CorruptFile, InvalidValue, MissingFile, OutputExists, one_line

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"   # diffusers' save_lora_weights
PEFT_WEIGHT_NAME = "adapter_model.safetensors"          # PEFT's save_pretrained
PEFT_CONFIG_NAME = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"                  # diffusers: LoraConfig kwargs, "transformer."-prefixed
PREFIX = "transformer"
PICKLE_EXTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_PAIR = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?"
                   r"\.weight$")
_DOWN = ("lora_A", "lora_down")
SHOWN = 4  # offending keys named in an error


class LoraMismatch(InvalidValue):
    """A LoRA file does not fit this model (other modules, shapes or ranks)."""


class LoraFormatError(CorruptFile):
    """A file is not a LoRA in a layout lens_fast reads."""


@dataclass
class ModuleLora:
    """One adapter on one official module: ``down`` (A) [r, in], ``up`` (B) [out, r] and
    ``alpha``; the module's update is ``(alpha / r) * up @ down``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoraFile:
    path: str
    tensors: Dict[str, torch.Tensor]
    config: Optional[dict]  # LoraConfig keyword arguments, when the file (or its folder) has them


def _named(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


# -- reading ------------------------------------------------------------------------------
def resolve_file(path: str, weight_name: Optional[str] = None) -> str:
    """The safetensors file a user named: the file itself, or in a folder ``weight_name``,
    diffusers' ``pytorch_lora_weights.safetensors``, PEFT's ``adapter_model.safetensors`` or
    the folder's only ``*.safetensors``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFile(f"LoRA {path} does not exist")
    if os.path.isdir(path):
        if weight_name is not None:
            candidate = os.path.join(path, weight_name)
            if not os.path.isfile(candidate):
                raise MissingFile(f"LoRA folder {path} has no {weight_name}")
            return resolve_file(candidate)
        for name in (LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if len(found) == 1:
            return os.path.join(path, found[0])
        pickles = sorted(n for n in os.listdir(path) if n.endswith(PICKLE_EXTS))
        if not found and pickles:
            raise MissingFile(f"LoRA folder {path} holds only pickle files ({_named(pickles)}); lens_fast reads "
                              "safetensors only (convert with safetensors.torch.save_file(torch.load(f, "
                              "weights_only=True), ...) where you trust the file)")
        what = f"several ({_named(found)}): pass weight_name" if found else "none"
        raise MissingFile(f"LoRA folder {path}: expected {LORA_WEIGHT_NAME}, {PEFT_WEIGHT_NAME} or one "
                          f"*.safetensors file, found {what}")
    if path.endswith(PICKLE_EXTS):
        raise MissingFile(f"LoRA {path} is a pickle file; lens_fast reads safetensors only (convert with "
                          "safetensors.torch.save_file(torch.load(f, weights_only=True), ...) where you trust "
                          "the file)")
    return path


def read_file(path: str, weight_name: Optional[str] = None) -> LoraFile:
    """Read a LoRA file (``resolve_file``) and its LoRA config, if any."""
    path = resolve_file(path, weight_name)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LoraFormatError(f"LoRA {path} is not a readable safetensors file: {one_line(e)}") from None
    config = None
    if METADATA_KEY in header:
        try:
            packed = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise LoraFormatError(f"LoRA {path}: its {METADATA_KEY} header is not JSON: {e}") from None
        config = {k[len(PREFIX) + 1:]: v for k, v in packed.items() if k.startswith(PREFIX + ".")} or None
    sidecar = os.path.join(os.path.dirname(path), PEFT_CONFIG_NAME)
    if config is None and os.path.isfile(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoraFormatError(f"{sidecar} is not valid JSON: {e}") from None
    return LoraFile(path, tensors, config)


# -- keys -----------------------------------------------------------------------------------
def _refuse_foreign(keys: List[str], source: str) -> None:
    text = [k for k in keys if k.startswith(("text_encoder", "lora_te", "te."))]
    if text:
        raise LoraMismatch(f"LoRA {source} adapts a text encoder ({_named(text)}); lens_fast loads LoRAs of the "
                           "Lens transformer only")
    dora = [k for k in keys if "lora_magnitude_vector" in k or k.endswith(".dora_scale")]
    if dora:
        raise LoraFormatError(f"LoRA {source} is a DoRA ({_named(dora)}); lens_fast loads plain LoRA only")
    bias = [k for k in keys if re.search(r"\.(lora_B|lora_up)(\.[^.]+)?\.bias$", k)]
    if bias:
        raise LoraFormatError(f"LoRA {source} has LoRA biases ({_named(bias)}, PEFT lora_bias=True); lens_fast "
                              "loads plain LoRA only")
    diffs = [k for k in keys if k.endswith((".diff", ".diff_b"))]
    if diffs:
        raise LoraFormatError(f"LoRA {source} holds full-weight differences ({_named(diffs)}); lens_fast loads "
                              "low-rank A/B pairs only")


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def canonical_keys(tensors: Dict[str, torch.Tensor], module_names: Iterable[str], source: str
                   ) -> Tuple[Dict[str, Dict[str, torch.Tensor]], List[str]]:
    """Group a LoRA state dict by official module: ``{module: {"down", "up", "alpha"}}``,
    and the keys that follow no known layout. ``module_names``: the official names of
    the model's linear modules (kohya names are mapped back through them)."""
    keys = list(tensors)
    _refuse_foreign(keys, source)
    kohya_names = {name.replace(".", "_"): name for name in module_names}
    grouped: Dict[str, Dict[str, torch.Tensor]] = {}
    unknown, adapters = [], set()
    for key in keys:
        if key.startswith(KOHYA_PREFIXES):
            prefix = next(p for p in KOHYA_PREFIXES if key.startswith(p))
            flat, _, part = key[len(prefix):].partition(".")
            module = kohya_names.get(flat, f"{prefix}{flat}")
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
        else:
            stripped = _strip(key)
            match = _PAIR.match(stripped)
            if match:
                module, role = match["module"], "down" if match["part"] in _DOWN else "up"
                if match["adapter"]:
                    adapters.add(match["adapter"])
            elif stripped.endswith(".alpha"):
                module, role = stripped[:-len(".alpha")], "alpha"
            else:
                module, role = None, None
        if role is None:
            unknown.append(key)
            continue
        if role in grouped.setdefault(module, {}):
            raise LoraFormatError(f"LoRA {source} has two {role} tensors for module {module} (keys in two layouts?)")
        grouped[module][role] = tensors[key]
    if len(adapters) > 1:
        raise LoraFormatError(f"LoRA {source} holds several PEFT adapters ({_named(adapters)}); save each to its "
                              "own file")
    return grouped, unknown


def _pattern_value(pattern: dict, module: str):
    """A PEFT rank/alpha pattern's value for ``module``, matched as PEFT does
    (``re.match(rf"(.*\\.)?({key})$", module)``), or None."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _config_alpha(config: Optional[dict], module: str, rank: int) -> float:
    if not config:
        return float(rank)
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    if alpha is None:
        alpha = config.get("lora_alpha", rank)
    if config.get("use_rslora"):
        return float(alpha) * math.sqrt(rank)  # scaling alpha / sqrt(r) = (alpha sqrt(r)) / r
    return float(alpha)


def parse(lora: LoraFile, targets: Dict[str, Tuple[int, int]]) -> Dict[str, ModuleLora]:
    """The file's adapter per official module, checked against ``targets`` (official
    linear module name -> (in_features, out_features) of the model it is for)."""
    source = lora.path
    if not lora.tensors:
        raise LoraFormatError(f"LoRA {source} holds no tensors")
    if lora.config and lora.config.get("use_dora"):
        raise LoraFormatError(f"LoRA {source} is a DoRA (use_dora in its config); lens_fast loads plain LoRA only")
    grouped, unknown = canonical_keys(lora.tensors, targets, source)
    if unknown:
        raise LoraFormatError(f"LoRA {source}: {len(unknown)} key(s) follow no LoRA layout lens_fast reads "
                              f"({_named(unknown)}); expected M.lora_A.weight / M.lora_B.weight (diffusers, PEFT) or "
                              "lora_unet_M.lora_down.weight / .lora_up.weight / .alpha (kohya)")
    foreign = [m for m in grouped if m not in targets]
    if foreign:
        if len(foreign) == len(grouped):
            raise LoraMismatch(f"LoRA {source} is for another model: none of its {len(grouped)} modules exists in "
                               f"this Lens transformer ({_named(foreign)})")
        raise LoraMismatch(f"LoRA {source}: {len(foreign)} of its {len(grouped)} modules do not exist in this Lens "
                           f"transformer ({_named(foreign)}); is it for another model or another Lens config?")
    modules = {}
    for name, parts in sorted(grouped.items()):
        missing = [p for p in ("down", "up") if p not in parts]
        if missing:
            raise LoraFormatError(f"LoRA {source}: module {name} has no {' / '.join(missing)} tensor (A = lora_A / "
                                  "lora_down, B = lora_B / lora_up)")
        down, up = parts["down"], parts["up"]
        fin, fout = targets[name]
        for label, t in (("A", down), ("B", up)):
            if t.dim() != 2 or not t.is_floating_point():
                raise LoraMismatch(f"LoRA {source}: {name} {label} is a {t.dim()}-d {t.dtype} tensor "
                                   f"{tuple(t.shape)}; expected a 2-d floating-point matrix")
        rank = down.shape[0]
        if down.shape[1] != fin or up.shape[0] != fout or up.shape[1] != rank or rank == 0:
            raise LoraMismatch(f"LoRA {source}: {name} has A {tuple(down.shape)} and B {tuple(up.shape)}; this "
                               f"model's {name} is {fin} -> {fout}, so expected A [r, {fin}] and B [{fout}, r] "
                               "with one rank r >= 1")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoraMismatch(f"LoRA {source}: {name} holds NaN or infinite values")
        if "alpha" in parts:
            alpha_t = parts["alpha"]
            if alpha_t.numel() != 1 or not math.isfinite(float(alpha_t.reshape(-1)[0])):
                raise LoraMismatch(f"LoRA {source}: {name}.alpha is {tuple(alpha_t.shape)}; expected one finite "
                                   "number")
            alpha = float(alpha_t.reshape(-1)[0])
        else:
            alpha = _config_alpha(lora.config, name, rank)
        modules[name] = ModuleLora(down.contiguous(), up.contiguous(), alpha)
    return modules


# -- writing ------------------------------------------------------------------------------
def lora_config(modules: Dict[str, ModuleLora]) -> dict:
    """The LoraConfig keyword arguments describing ``modules`` (what diffusers and PEFT
    rebuild the adapter from): the commonest rank and alpha, patterns for the others."""
    ranks = Counter(m.rank for m in modules.values())
    alphas = Counter(m.alpha for m in modules.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
            "rank_pattern": {f"^{n}$": m.rank for n, m in modules.items() if m.rank != r},
            "alpha_pattern": {f"^{n}$": m.alpha for n, m in modules.items() if m.alpha != alpha},
            "use_dora": False, "lora_bias": False, "init_lora_weights": True}


def lora_state_dict(modules: Dict[str, ModuleLora], dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The diffusers layout: ``transformer.M.lora_A.weight`` / ``lora_B.weight``."""
    out = {}
    for name, m in sorted(modules.items()):
        out[f"{PREFIX}.{name}.lora_A.weight"] = m.down.detach().to("cpu", dtype or m.down.dtype).contiguous()
        out[f"{PREFIX}.{name}.lora_B.weight"] = m.up.detach().to("cpu", dtype or m.up.dtype).contiguous()
    return out


def save_file(folder: str, modules: Dict[str, ModuleLora], dtype: Optional[torch.dtype] = None,
              overwrite: bool = False, extra_metadata: Optional[Dict[str, str]] = None) -> str:
    """Write ``folder/pytorch_lora_weights.safetensors`` as diffusers' ``save_lora_weights``
    does (keys, ``lora_adapter_metadata``), atomically; returns its path."""
    if not modules:
        raise InvalidValue("no LoRA modules to save")
    path = os.path.join(os.fspath(folder), LORA_WEIGHT_NAME)
    if os.path.exists(path) and not overwrite:
        raise OutputExists(f"{path} already exists; choose another folder or pass overwrite=True")
    config = {f"{PREFIX}.{k}": v for k, v in lora_config(modules).items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True), **(extra_metadata or {})}
    write_bytes(path, safetensors_bytes(lora_state_dict(modules, dtype), metadata=metadata))
    return path
