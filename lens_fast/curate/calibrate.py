"""``lens-fast curate calibrate``: score a sample with every stage, print percentiles and
draw one histogram per stage (with the configured threshold), so thresholds are chosen by
looking at the data rather than guessed.

The sample is spread over the inputs' units (the first images of each, an equal share of
what is left). The dedup score is each image's highest cosine to any other image of the sample
(exact, all pairs: the sample is small). Writes ``OUT/calibration.json`` and
``OUT/<stage>.png``; the folder must be new or empty.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List

import numpy as np
from PIL import Image, ImageDraw

from ..errors import OutputExists
from .config import STAGES, CurateConfig
from .inputs import scan
from .layout import write_json
from .shards import bucket_table, smallest_bucket_area
from .worker import Worker

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
LOG_SCALE = ("area", "clarity")


def thresholds(cfg: CurateConfig, min_area: float) -> Dict[str, tuple]:
    """stage -> (low, high): an image is dropped below low or at/above high (None: no bound)."""
    return {"area": (min_area, None), "nsfw": (None, cfg.nsfw.max_score), "aesthetic": (cfg.aesthetic.min_score, None),
            "watermark": (None, cfg.watermark.max_score), "clarity": (cfg.clarity.min_score, None),
            "entropy": (cfg.entropy.min_score, None), "luminance": (cfg.luminance.min_score, cfg.luminance.max_score),
            "dedup": (None, cfg.dedup.max_cosine)}


def histogram_png(path: str, stage: str, values: np.ndarray, bounds: tuple, bins: int = 40) -> None:
    log = stage in LOG_SCALE
    x = np.log10(np.maximum(values, 1e-6)) if log else values
    marks = [None if b is None else (math.log10(max(b, 1e-6)) if log else b) for b in bounds]
    lo, hi = float(np.min(x)), float(np.max(x))
    for m in marks:
        if m is not None:
            lo, hi = min(lo, m), max(hi, m)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(x, bins=bins, range=(lo, hi))
    w, h, left, bottom, top = 640, 360, 50, 40, 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    plot_w, plot_h = w - left - 20, h - bottom - top
    peak = max(int(counts.max()), 1)
    for k, c in enumerate(counts):
        x0 = left + plot_w * k / bins
        bar = plot_h * c / peak
        d.rectangle([x0 + 1, h - bottom - bar, left + plot_w * (k + 1) / bins - 1, h - bottom], fill=(70, 110, 200))
    d.line([left, h - bottom, left + plot_w, h - bottom], fill="black")
    d.line([left, top, left, h - bottom], fill="black")
    for m in marks:
        if m is not None:
            xm = left + plot_w * (m - lo) / (hi - lo)
            d.line([xm, top, xm, h - bottom], fill=(220, 40, 40), width=2)
    scale = "log10 " if log else ""
    d.text((left, 8), f"{stage}: {len(values)} images, {scale}score; red: threshold(s); peak bin {peak}", fill="black")
    d.text((left, h - bottom + 6), f"{edges[0]:.3g}", fill="black")
    d.text((left + plot_w - 40, h - bottom + 6), f"{edges[-1]:.3g}", fill="black")
    img.save(path)


def _dedup_scores(emb: np.ndarray) -> np.ndarray:
    if emb.shape[0] < 2:
        return np.full(emb.shape[0], np.nan)
    x = emb.astype(np.float32)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return sims.max(axis=1).astype(np.float64)


def calibrate(inputs: List[str], out: str, cfg: CurateConfig = None, sample: int = 1000,
              say: Callable[[str], None] = print) -> dict:
    cfg = (cfg or CurateConfig()).validate()
    cfg.execution.score_all = True
    if os.path.isdir(out) and os.listdir(out):
        raise OutputExists(f"--out {out} already holds files; calibration writes into a new or empty folder")
    os.makedirs(out, exist_ok=True)
    min_area = cfg.area.min_area or smallest_bucket_area(bucket_table(cfg.shards.buckets))
    units, _ = scan(inputs, cfg.execution.unit_size, os.path.join(out, "listing"))
    worker = Worker(None, cfg=cfg, min_area=min_area)
    rows, embs = [], []
    for k, unit in enumerate(units):
        if len(rows) >= sample:
            break
        r, emb, _ = worker.score_unit(unit, limit=math.ceil((sample - len(rows)) / (len(units) - k)))
        if emb is not None:
            embs.append(emb[[row["emb_row"] for row in r if row["emb_row"] >= 0]])
            for row in r:
                row["_has_emb"] = row["emb_row"] >= 0
        rows += r
    if cfg.dedup.enabled and embs:
        scores = iter(_dedup_scores(np.concatenate(embs)))
        for row in rows:
            if row.get("_has_emb"):
                row["score_dedup"] = float(next(scores))
    bounds = thresholds(cfg, min_area)
    result = {"images": len(rows), "decode_errors": sum(1 for r in rows if r.get("decode_error")), "stages": {}}
    say(f"calibration on {len(rows)} images ({result['decode_errors']} undecodable); percentiles:")
    say(f"{'stage':10s} " + " ".join(f"{'p' + str(p):>9s}" for p in PERCENTILES) + "   would drop")
    for stage in STAGES[1:]:
        values = np.array([r[f"score_{stage}"] for r in rows if r.get(f"score_{stage}") is not None
                           and not np.isnan(r[f"score_{stage}"])], dtype=np.float64)
        if not cfg.stage_on(stage) or values.size == 0:
            continue
        low, high = bounds[stage]
        drop = np.zeros(values.size, bool)
        if low is not None:
            drop |= values < low
        if high is not None:
            drop |= values >= high if stage != "luminance" else values > high
        pct = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
        result["stages"][stage] = {"n": int(values.size), **pct, "threshold_low": low, "threshold_high": high,
                                   "would_drop": float(drop.mean())}
        histogram_png(os.path.join(out, f"{stage}.png"), stage, values, (low, high))
        cells = " ".join(f"{pct['p' + str(p)]:9.4g}" for p in PERCENTILES)
        say(f"{stage:10s} {cells}   {100 * drop.mean():.1f}%")
    write_json(os.path.join(out, "calibration.json"), result)
    say(f"histograms: {out}/<stage>.png; numbers: {out}/calibration.json")
    return result
