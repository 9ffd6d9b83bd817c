"""From a config to the parts of a run: the run folder (guarded), the frozen encoders
and the data source."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch

from .buckets import BucketTable
from .config import TrainConfig
from .data import EncodedSource, InMemorySource, PixelSpace, SyntheticSource, load_cache


def check_run_dir(out: str, resume: bool, model_config: dict) -> bool:
    """Refuse a folder holding other files unless resuming a lens_fast run of the same
    model. Returns True when the folder has to be initialised."""
    if not os.path.exists(out):
        return True
    if not os.path.isdir(out):
        raise FileExistsError(f"--out {out} exists and is not a folder")
    names = sorted(os.listdir(out))
    if not names:
        return True
    if not resume:
        raise FileExistsError(f"--out {out} already holds files ({', '.join(names[:4])}"
                              f"{', ...' if len(names) > 4 else ''}); pass --resume to continue the run there, "
                              "or choose a new or empty folder")
    path = os.path.join(out, "run.json")
    if not os.path.isfile(path):
        raise FileExistsError(f"--out {out} holds files but no run.json: it is not a lens_fast training run, "
                              "refusing to write into it")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f).get("model_config")
    if saved != json.loads(json.dumps(model_config)):
        diff = sorted(k for k in set(saved or {}) | set(model_config) if (saved or {}).get(k) != model_config.get(k))
        raise ValueError(f"--resume into {out}: its run trained a different model (keys {diff} differ); "
                         "use the same model config or a new --out")
    return False


def init_run_dir(out: str, cfg: TrainConfig, model_config: dict, world: int, recipe: Optional[dict] = None
                 ) -> None:
    """Write ``run.json``: the config, the model config, the world size and the recipe's
    record (what a resume must match, e.g. the teacher's fingerprint)."""
    os.makedirs(out, exist_ok=True)
    record = {"config": cfg.to_dict(), "model_config": model_config, "world": world, "created": time.time(),
              "torch": torch.__version__, "recipe": recipe or {"name": cfg.recipe}}
    tmp = os.path.join(out, f".run.json.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(tmp, os.path.join(out, "run.json"))


def _component(folder: str, sub: str) -> str:
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    if os.path.isdir(os.path.join(folder, sub)):
        return os.path.join(folder, sub)
    raise FileNotFoundError(f"{folder} has neither config.json nor a {sub}/ folder")


def build_image_encoder(cfg: TrainConfig, device):
    """The frozen latent encoder: the pixel stand-in or the FLUX.2 VAE of a folder."""
    vae = cfg.encoders.vae or cfg.model.pretrained
    if vae is None:
        raise ValueError("encoders.vae is not set: give a checkpoint folder holding vae/, or 'pixel' for a "
                         "pixel-space model")
    if vae == "pixel":
        return PixelSpace(cfg.encoders.pixel_patch)
    from lens_fast.vae import LensVAE

    path = _component(vae, "vae")
    return LensVAE.from_pretrained(path, subfolder=None, torch_dtype=cfg.encoders.dtype, device=device)


def build_text_encoder(cfg: TrainConfig, model_config: dict, device):
    folder = cfg.encoders.text_encoder or cfg.model.pretrained
    if folder is None:
        raise ValueError("encoders.text_encoder is not set: give a checkpoint folder holding text_encoder/ "
                         "and tokenizer/")
    try:
        from lens_fast.text_encoder import LensTextEncoder
    except ImportError as e:
        raise ValueError(f"the Lens text encoder is unavailable ({e}); use a token cache (data.source: cache)") \
            from None
    return LensTextEncoder.from_pretrained(folder, model_config["selected_layer_index"],
                                           torch_dtype=cfg.encoders.dtype, device=device,
                                           template_date=cfg.encoders.template_date)


def build_data_source(cfg: TrainConfig, model_config: dict, device, image_encoder=None, text_encoder=None):
    """The DataSource a config describes (encoders given here take precedence)."""
    d = cfg.data
    table = BucketTable.from_config(d)
    k = len(model_config["selected_layer_index"]) if model_config["multi_layer_encoder_feature"] else 1
    if d.source == "synthetic":
        pixel = image_encoder or PixelSpace(cfg.encoders.pixel_patch)
        if not isinstance(pixel, PixelSpace) or pixel.token_channels != model_config["in_channels"]:
            raise ValueError(f"data.source synthetic makes pixel tokens of {3 * cfg.encoders.pixel_patch ** 2} "
                             f"channels (encoders.pixel_patch={cfg.encoders.pixel_patch}); the model takes "
                             f"in_channels={model_config['in_channels']}")
        return SyntheticSource(table, pixel, k, model_config["enc_hidden_dim"], d.text_len, cfg.train.seed)
    if d.source == "cache":
        if not d.path:
            raise ValueError("data.source cache needs data.path (a folder written by save_cache)")
        buckets = load_cache(d.path)
        factor = cfg.encoders.pixel_patch if cfg.encoders.vae == "pixel" else 16
        sizes = {g: d.batch_per_area[min(d.areas, key=lambda a: abs(a - math.sqrt(g[0] * g[1]) * factor))]
                 for g in buckets}
        return InMemorySource(buckets, sizes, seed=cfg.train.seed)
    from .webdata import WebDatasetSource

    if not d.shards:
        raise ValueError("data.source webdataset needs data.shards (tar files, globs or {000..099} patterns)")
    image_encoder = image_encoder or build_image_encoder(cfg, device)
    text_encoder = text_encoder or build_text_encoder(cfg, model_config, device)
    for b in table.all():
        image_encoder.latent_grid(b.height, b.width)
    raw = WebDatasetSource(d.shards, table, seed=cfg.train.seed, min_side=d.min_side, caption_keys=d.caption_keys,
                           workers=d.workers, prefetch=d.prefetch, device=device)
    return EncodedSource(raw, image_encoder, text_encoder, device=device, max_text_tokens=d.max_text_tokens)


def pretrained_folder(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    return _component(path, "transformer")
