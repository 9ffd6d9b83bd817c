"""Model configs: dicts with attribute access that read and write ``config.json``."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from ..errors import CorruptFile, InvalidValue, MissingFile


def read_json(path: str):
    """A JSON file's content, or a CorruptFile naming the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFile(f"{path} is not valid JSON: {e}") from None
    except IsADirectoryError:
        raise CorruptFile(f"{path} is a folder; expected a JSON file") from None


class Config(dict):
    """A ``config.json`` as a dict whose keys are also attributes (as diffusers' FrozenDict).

    ``defaults`` are the official keys, always present. ``extensions`` are lens_fast's own
    options, absent from official folders: an absent one means its default (the reference
    behaviour), and one is kept in the dict, hence written to ``config.json``, only while it
    differs from its default, so a default model's folder holds exactly the official keys."""

    class_name = ""
    defaults: Dict[str, Any] = {}
    extensions: Dict[str, Any] = {}

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            if key in self.extensions:
                return self.extensions[key]
            raise AttributeError(f"{type(self).__name__} has no key {key!r}") from None

    @classmethod
    def known_keys(cls) -> List[str]:
        return sorted({**cls.defaults, **cls.extensions})

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config") -> "Config":
        unknown = sorted(k for k in data if not k.startswith("_") and k not in cls.defaults and k not in cls.extensions)
        if unknown:
            raise InvalidValue(f"{source}: unknown config key(s) {unknown}; expected keys from {cls.known_keys()}")
        cfg = cls(**cls.defaults)
        for k, v in data.items():
            if not k.startswith("_"):
                cfg.set(k, v)
        cfg.validate()
        return cfg

    def set(self, key: str, value: Any) -> None:
        """Set one key; an extension set to its default is dropped (see the class docstring)."""
        if key in self.extensions and value == self.extensions[key]:
            self.pop(key, None)
        else:
            self[key] = value

    @classmethod
    def from_json_file(cls, path: str) -> "Config":
        if not os.path.isfile(path):
            raise MissingFile(f"missing config file {path}")
        data = read_json(path)
        if not isinstance(data, dict):
            raise CorruptFile(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=path)

    def to_json_dict(self) -> Dict[str, Any]:
        return {"_class_name": self.class_name, **{k: self[k] for k in sorted(self)}}

    def validate(self) -> None:
        pass


class LensTransformerConfig(Config):
    class_name = "LensTransformer2DModel"
    defaults = dict(patch_size=2, in_channels=128, out_channels=32, num_layers=48, attention_head_dim=64,
                    num_attention_heads=24, inner_dim=1536, enc_hidden_dim=2880, axes_dims_rope=[8, 28, 28],
                    gate_mlp=True, rms_norm=True, multi_layer_encoder_feature=True,
                    selected_layer_index=[5, 11, 17, 23])
    # mask_every_block: apply the text mask in every block. The reference applies it in
    # the first block only (LensTransformer2DModel's docstring), which is what False means.
    extensions = dict(mask_every_block=False)

    def validate(self) -> None:
        for key in ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                    "enc_hidden_dim"):
            v = self[key]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or (key == "num_layers" and v < 0):
                raise InvalidValue(f"config {key}={v!r}: expected a positive integer")
        axes = list(self["axes_dims_rope"])
        if len(axes) != 3 or any(a % 2 for a in axes) or sum(axes) != self["attention_head_dim"]:
            raise InvalidValue(f"config axes_dims_rope={axes}: expected three even sizes summing to "
                             f"attention_head_dim={self['attention_head_dim']}")
        if not self["selected_layer_index"]:
            raise InvalidValue("config selected_layer_index is empty; expected the text-encoder layers to use")
        if not isinstance(self.mask_every_block, bool):
            raise InvalidValue(f"config mask_every_block={self.mask_every_block!r}: expected true or false")
