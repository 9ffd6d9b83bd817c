"""From a config to the parts of a run: the checks of its inputs, the frozen encoders
and the data source. (The run folder is ``run_dir``.)"""
from __future__ import annotations

import math
import os
from typing import Optional

from lens_fast.errors import InvalidValue, MissingFile
from lens_fast.models.config import read_json
from lens_fast.models.loading import check_weights_folder

from .buckets import BucketTable
from .config import TrainConfig
from .data import EncodedSource, InMemorySource, PixelSpace, SyntheticSource, check_cache, load_cache


def _component(folder: str, sub: str, key: str) -> str:
    """``folder`` itself when it holds config.json, else its ``sub/``; ``key`` names the
    setting the folder came from."""
    if not os.path.isdir(folder):
        raise MissingFile(f"{key} {folder} does not exist; expected a checkpoint folder")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    if os.path.isdir(os.path.join(folder, sub)):
        return os.path.join(folder, sub)
    raise MissingFile(f"{key} {folder} has neither config.json nor a {sub}/ folder")


PRETRAINED = "model.pretrained (--pretrained)"


def check_inputs(cfg: TrainConfig, model_given: bool = False, data_given: bool = False) -> None:
    """Every input folder and file the config names (pretrained weights, encoders, token
    cache, shards) exists and is readable safetensors / JSON / tar, before anything loads."""
    if cfg.model.pretrained and not model_given:
        folder = pretrained_folder(cfg.model.pretrained)
        read_json(os.path.join(folder, "config.json"))
        check_weights_folder(folder, "the transformer")
    if data_given:
        return
    d = cfg.data
    if d.source == "cache":
        if not d.path:
            raise InvalidValue("data.source cache needs data.path (--cache, a folder written by save_cache)")
        check_cache(d.path)
    elif d.source == "webdataset":
        from .webdata import expand_shards

        if not d.shards:
            raise InvalidValue("data.source webdataset needs data.shards (--data: tar files, globs or {000..099} "
                               "patterns)")
        expand_shards(d.shards)
        vae = cfg.encoders.vae or cfg.model.pretrained
        if vae not in (None, "pixel"):
            key = "encoders.vae" if cfg.encoders.vae else PRETRAINED
            path = _component(vae, "vae", key)
            read_json(os.path.join(path, "config.json"))
            check_weights_folder(path, "the VAE")
        te = cfg.encoders.text_encoder or cfg.model.pretrained
        if te is not None:
            key = "encoders.text_encoder" if cfg.encoders.text_encoder else PRETRAINED
            for sub in ("text_encoder", "tokenizer"):
                if not os.path.isdir(os.path.join(te, sub)):
                    raise MissingFile(f"{key} {te} has no {sub}/ folder")
            check_weights_folder(os.path.join(te, "text_encoder"), "the text encoder")


def build_image_encoder(cfg: TrainConfig, device):
    """The frozen latent encoder: the pixel stand-in or the FLUX.2 VAE of a folder."""
    vae = cfg.encoders.vae or cfg.model.pretrained
    if vae is None:
        raise InvalidValue("encoders.vae is not set: give a checkpoint folder holding vae/, or 'pixel' for a "
                         "pixel-space model")
    if vae == "pixel":
        return PixelSpace(cfg.encoders.pixel_patch)
    from lens_fast.vae import LensVAE

    path = _component(vae, "vae", "encoders.vae" if cfg.encoders.vae else PRETRAINED)
    return LensVAE.from_pretrained(path, subfolder=None, torch_dtype=cfg.encoders.dtype, device=device)


def build_text_encoder(cfg: TrainConfig, model_config: dict, device):
    folder = cfg.encoders.text_encoder or cfg.model.pretrained
    if folder is None:
        raise InvalidValue("encoders.text_encoder is not set: give a checkpoint folder holding text_encoder/ "
                         "and tokenizer/")
    try:
        from lens_fast.text_encoder import LensTextEncoder
    except ImportError as e:
        raise InvalidValue(f"the Lens text encoder is unavailable ({e}); use a token cache (data.source: cache)") \
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
            raise InvalidValue(f"data.source synthetic makes pixel tokens of {3 * cfg.encoders.pixel_patch ** 2} "
                             f"channels (encoders.pixel_patch={cfg.encoders.pixel_patch}); the model takes "
                             f"in_channels={model_config['in_channels']}")
        return SyntheticSource(table, pixel, k, model_config["enc_hidden_dim"], d.text_len, cfg.train.seed)
    if d.source == "cache":
        if not d.path:
            raise InvalidValue("data.source cache needs data.path (a folder written by save_cache)")
        buckets = load_cache(d.path)
        factor = cfg.encoders.pixel_patch if cfg.encoders.vae == "pixel" else 16
        sizes = {g: d.batch_per_area[min(d.areas, key=lambda a: abs(a - math.sqrt(g[0] * g[1]) * factor))]
                 for g in buckets}
        return InMemorySource(buckets, sizes, seed=cfg.train.seed)
    from .webdata import WebDatasetSource

    if not d.shards:
        raise InvalidValue("data.source webdataset needs data.shards (tar files, globs or {000..099} patterns)")
    image_encoder = image_encoder or build_image_encoder(cfg, device)
    text_encoder = text_encoder or build_text_encoder(cfg, model_config, device)
    for b in table.all():
        image_encoder.latent_grid(b.height, b.width)
    raw = WebDatasetSource(d.shards, table, seed=cfg.train.seed, min_side=d.min_side, caption_keys=d.caption_keys,
                           workers=d.workers, prefetch=d.prefetch, device=device,
                           max_consecutive_skips=d.max_consecutive_skips)
    return EncodedSource(raw, image_encoder, text_encoder, device=device, max_text_tokens=d.max_text_tokens)


def pretrained_folder(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    return _component(path, "transformer", PRETRAINED)
