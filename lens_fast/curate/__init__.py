"""Data curation for Lens: filter, deduplicate and densely caption images into the
trainer's WebDataset shards, on one machine or a Ray cluster (``lens-fast curate``).

    from lens_fast.curate import CurateConfig, curate
    cfg = CurateConfig()
    cfg.embedder.model = "/models/clip-vit-large-patch14"      # CLIP for dedup and the heads
    cfg.aesthetic.model = "/models/aesthetic-head"               # head.safetensors
    cfg.nsfw.model, cfg.watermark.model = "/models/nsfw", "/models/watermark"
    cfg.caption.base_url, cfg.caption.model = "http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-VL-7B-Instruct"
    report = curate(["/data/raw"], "/data/curated", cfg)        # shards in /data/curated/shards

Stages, in the paper's order (STAGES.md beside this file gives thresholds and sources):
decode, area, nsfw, aesthetic, watermark, clarity, entropy, luminance, dedup; then dense
captioning and sharding into resolution buckets. ``calibrate`` prints score percentiles
and draws a histogram per stage so thresholds are chosen by looking.
"""
from .config import STAGES, CurateConfig, CurateConfigError
from .pipeline import CurationIncomplete, curate

__all__ = ["STAGES", "CurateConfig", "CurateConfigError", "CurationIncomplete", "curate", "calibrate"]


def calibrate(*args, **kwargs):
    from .calibrate import calibrate as run

    return run(*args, **kwargs)
