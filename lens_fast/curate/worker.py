"""The stage code every executor runs: one ``Worker`` per process (or Ray actor) holds the
config and the loaded models, and runs units of work by kind:

- ``filter``: one input unit through stages 1-8 (and the embedding), written to
  ``work/units/<unit>.parquet`` (+ ``.emb.npy``), atomically: a unit whose parquet exists is done;
- ``assign``: a unit's surviving embeddings to their nearest dedup centroid;
- ``dedup``: a part of the clusters, compared exactly (stage 9);
- ``shard``: one output shard: re-read, caption, resize, write (atomically).
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from typing import Dict, List, Optional

import numpy as np

from . import dedup as dd
from . import measures
from .config import MODEL_STAGES, STAGES, CurateConfig
from .decode import BadImage, decode, encode
from .inputs import iter_unit, read_item
from .layout import Layout, read_json, write_json
from .shards import EXTENSIONS, fit_image, sample_key, write_tar

ROW_FIELDS = [("id", "string"), ("unit", "string"), ("source", "string"), ("key", "string"), ("offset", "int64"),
              ("caption_in", "string"), ("sha256", "string"), ("bytes", "int64"), ("format", "string"),
              ("mode", "string"), ("width", "int64"), ("height", "int64"), ("rotated", "bool"),
              ("decode_error", "string"), ("decode_detail", "string")] + \
             [(f"score_{s}", "float64") for s in ("area", "nsfw", "aesthetic", "watermark", "clarity", "entropy",
                                                   "luminance")] + [("failed", "string"), ("emb_row", "int64")]


def write_parquet(path: str, rows: List[dict], fields) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, "bool_" if kind == "bool" else kind)()) for name, kind in fields])
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_parquet(path: str, columns=None) -> List[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=columns).to_pylist()


class Worker:
    def __init__(self, out: Optional[str], captioner_share: int = 1, cfg: Optional[CurateConfig] = None,
                 min_area: Optional[float] = None):
        """A worker of the run in ``out`` (its saved config), or, with ``out=None``, one that
        only scores (``score_unit``) with ``cfg`` and ``min_area`` (calibration)."""
        self.layout = Layout(out) if out else None
        if out:
            state = read_json(self.layout.state)
            cfg, min_area = CurateConfig().update(state["config"]).validate(), state["min_area"]
        self.cfg, self.min_area = cfg, min_area
        self.share = captioner_share
        self._models: Optional[dict] = None
        self._captioner = None

    # -- models, loaded once per process --------------------------------------------------
    def models(self) -> dict:
        if self._models is None:
            from .models import AestheticScore, ClassifierScore, load_embedder

            cfg, m = self.cfg, {}
            if cfg.needs_embedding():
                m["embed"] = load_embedder(cfg.embedder.model, cfg.embedder.device, cfg.embedder.batch_size,
                                           needed_by="dedup" if cfg.dedup.enabled else "head")
            for stage in ("nsfw", "watermark"):
                if cfg.stage_on(stage):
                    s = getattr(cfg, stage)
                    m[stage] = ClassifierScore(stage, s.model, s.labels, cfg.embedder.device, cfg.embedder.batch_size)
            if cfg.stage_on("aesthetic"):
                m["aesthetic"] = AestheticScore(cfg.aesthetic.model)
            self._models = m
        return self._models

    def captioner(self):
        if self._captioner is None:
            from .caption import Captioner

            self._captioner = Captioner(self.cfg.caption, self.layout.captions, share=self.share)
        return self._captioner

    # -- stage 1-8 ------------------------------------------------------------------------
    def _fails(self, stage: str, score: float) -> bool:
        cfg = self.cfg
        if stage == "area":
            return score < self.min_area
        if stage in ("nsfw", "watermark"):
            return score >= getattr(cfg, stage).max_score
        if stage == "luminance":
            return not cfg.luminance.min_score <= score <= cfg.luminance.max_score
        return score < getattr(cfg, stage).min_score

    def filter(self, unit: dict) -> dict:
        """Stages 1-8 (+ the embedding) of one unit, written to the run folder."""
        lay = self.layout
        rows, emb, summary = self.score_unit(unit)
        if emb is not None:
            np.save(lay.unit_embeddings(unit["id"]) + ".tmp.npy", emb.astype(np.float16))
            os.replace(lay.unit_embeddings(unit["id"]) + ".tmp.npy", lay.unit_embeddings(unit["id"]))
        write_json(lay.unit_rows(unit["id"]) + ".json", summary)
        write_parquet(lay.unit_rows(unit["id"]), rows, ROW_FIELDS)
        return summary

    def score_unit(self, unit: dict, limit: Optional[int] = None):
        """(rows, embeddings or None, summary) of a unit's first ``limit`` images. Model stages
        run a batch at a time: a process holds at most ``embedder.batch_size`` decoded images."""
        cfg = self.cfg
        timing, evaluated = Counter(), Counter()
        rows, batch, chunks = [], [], []
        draft = max(cfg.clarity.side or 0, 448)
        for item, data, missing in iter_unit(unit):
            if limit is not None and len(rows) >= limit:
                break
            row = {k: item.get(k) for k in ("id", "unit", "source", "key", "offset", "caption_in")}
            row.update(emb_row=-1, failed=None)
            rows.append(row)
            image = self._decode(row, data, missing, timing, evaluated, draft)
            if image is None:
                continue
            self._cheap_stages(row, np.asarray(image), timing, evaluated)
            if cfg.execution.score_all or row["failed"] is None:
                batch.append((row, image))
            if len(batch) >= cfg.embedder.batch_size:
                chunks.append(self._model_stages(batch, timing, evaluated, sum(len(c) for c in chunks)))
                batch = []
        if batch:
            chunks.append(self._model_stages(batch, timing, evaluated, sum(len(c) for c in chunks)))
        for row in rows:  # the first failing stage in the paper's order
            if row["failed"] != "decode":
                fails = [s for s in STAGES[1:8] if cfg.stage_on(s) and row.get(f"score_{s}") is not None
                         and self._fails(s, row[f"score_{s}"])]
                row["failed"] = fails[0] if fails else None
        emb = None
        if cfg.needs_embedding():
            emb = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
        summary = {"unit": unit["id"], "images": len(rows), "timing": dict(timing), "evaluated": dict(evaluated)}
        return rows, emb, summary

    def _decode(self, row, data, missing, timing, evaluated, draft):
        cfg = self.cfg
        t0 = time.perf_counter()
        evaluated["decode"] += 1
        try:
            if data is None:
                row.update(decode_error="unreadable", decode_detail=missing, failed="decode")
                return None
            row.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
            try:
                dec = decode(data, cfg.decode.max_pixels, cfg.decode.max_aspect, cfg.decode.background, draft)
            except BadImage as e:
                row.update(decode_error=e.reason, decode_detail=str(e), failed="decode")
                return None
            row.update(format=dec.format, mode=dec.mode, width=dec.width, height=dec.height, rotated=dec.rotated)
            return dec.image
        finally:
            timing["decode"] += time.perf_counter() - t0

    def _cheap_stages(self, row, arr, timing, evaluated) -> None:
        cfg = self.cfg
        gray = []  # computed once, by the first stage that needs it (its time counts there)

        def g():
            if not gray:
                gray.append(measures.gray(arr))
            return gray[0]

        for stage, fn in (("area", lambda: measures.area(row["width"], row["height"])),
                          ("clarity", lambda: measures.clarity_of_gray(g(), cfg.clarity.side)),
                          ("entropy", lambda: measures.entropy_of_gray(g())),
                          ("luminance", lambda: measures.luminance(arr))):
            if not cfg.stage_on(stage) or (row["failed"] and not cfg.execution.score_all):
                continue
            t0 = time.perf_counter()
            row[f"score_{stage}"] = fn()
            timing[stage] += time.perf_counter() - t0
            evaluated[stage] += 1
            if row["failed"] is None and self._fails(stage, row[f"score_{stage}"]):
                row["failed"] = stage

    def _model_stages(self, batch, timing, evaluated, offset: int) -> np.ndarray:
        rows, images = [b[0] for b in batch], [b[1] for b in batch]
        models = self.models()
        emb = np.zeros((len(images), 0), np.float32)
        if "embed" in models:
            t0 = time.perf_counter()
            emb = np.asarray(models["embed"](images), dtype=np.float32).reshape(len(images), -1)
            timing["embed"] += time.perf_counter() - t0
            evaluated["embed"] += len(images)
            for k, row in enumerate(rows):
                row["emb_row"] = offset + k
        for stage in MODEL_STAGES:
            if stage in models:
                t0 = time.perf_counter()
                scores = models[stage](images, emb)
                timing[stage] += time.perf_counter() - t0
                evaluated[stage] += len(images)
                for row, score in zip(rows, scores):
                    row[f"score_{stage}"] = float(score)
        return emb

    # -- stage 9 --------------------------------------------------------------------------
    def assign(self, unit_id: str) -> dict:
        lay = self.layout
        rows = read_parquet(lay.unit_rows(unit_id), ["failed", "emb_row"])
        alive = np.array([k for k, r in enumerate(rows) if r["failed"] is None], np.int64)
        emb = np.load(lay.unit_embeddings(unit_id), mmap_mode="r")
        vec = np.asarray(emb[[rows[k]["emb_row"] for k in alive]], np.float32) if alive.size else np.zeros((0, 1))
        centroids = np.load(os.path.join(lay.dedup, "centroids.npy"))
        labels = dd.assign(vec, centroids) if alive.size else np.zeros(0, np.int64)
        order = np.argsort(labels, kind="stable")
        tmp = lay.unit_assign(unit_id) + ".tmp.npz"
        np.savez(tmp, rows=alive[order], clusters=labels[order], emb=vec[order].astype(np.float16))
        os.replace(tmp, lay.unit_assign(unit_id))
        return {"unit": unit_id, "alive": int(alive.size)}

    def dedup(self, task: dict) -> dict:
        lay, cfg = self.layout, self.cfg
        part, parts, units = task["part"], task["parts"], task["units"]
        members: Dict[int, list] = {}
        t0 = time.perf_counter()
        for unit_id in units:
            with np.load(lay.unit_assign(unit_id)) as z:
                clusters, mine = z["clusters"], None
                mine = np.nonzero(clusters % parts == part)[0]
                if not mine.size:
                    continue
                emb, unit_rows = z["emb"][mine].astype(np.float32), z["rows"][mine]
            meta = read_parquet(lay.unit_rows(unit_id), ["id", "width", "height"])
            for c, e, r in zip(clusters[mine], emb, unit_rows):
                m = meta[int(r)]
                members.setdefault(int(c), []).append((m["id"], m["width"] * m["height"], e))
        out = []
        for c in sorted(members):
            ids = [m[0] for m in members[c]]
            emb = np.stack([m[2] for m in members[c]])
            order = dd.priority_order(np.array([m[1] for m in members[c]]), ids)
            dropped, dup_of, nearest = dd.dedup_cluster(emb, order, cfg.dedup.max_cosine)
            for k, i in enumerate(ids):
                out.append({"id": i, "cluster": c, "score_dedup": None if np.isnan(nearest[k]) else float(nearest[k]),
                            "dup_of": ids[dup_of[k]] if dup_of[k] >= 0 else None, "dropped": bool(dropped[k])})
        summary = {"part": part, "images": len(out), "seconds": time.perf_counter() - t0}
        write_json(lay.dedup_part(part) + ".json", summary)
        write_parquet(lay.dedup_part(part), out, [("id", "string"), ("cluster", "int64"), ("score_dedup", "float64"),
                                                  ("dup_of", "string"), ("dropped", "bool")])
        return summary

    # -- captions and shards --------------------------------------------------------------
    def shard(self, entry: dict) -> dict:
        from lens_fast.chat_api import ChatError, image_sha256

        cfg, lay = self.cfg, self.layout
        timing = Counter()
        items = {i["id"]: i for i in entry["items"]}
        ids = [i["id"] for i in entry["items"]]
        samples, failed, images, hashes, kept = [], {}, [], [], []
        for item_id in ids:
            item = items[item_id]
            t0 = time.perf_counter()
            try:
                dec = decode(read_item(item), cfg.decode.max_pixels, cfg.decode.max_aspect, cfg.decode.background)
            except BadImage as e:
                failed[item_id] = f"the file no longer decodes as it did when it was filtered ({e})"
                continue
            images.append(fit_image(dec.image, item["bucket_height"], item["bucket_width"], cfg.shards.resize))
            hashes.append(image_sha256(images[-1]))
            kept.append(item_id)
            timing["resize"] += time.perf_counter() - t0
        captions: List = [items[i]["caption_in"] for i in kept]
        if cfg.caption.enabled and kept:
            t0 = time.perf_counter()
            captions = self.captioner().caption_many(images, hashes)
            timing["caption"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        ext = EXTENSIONS[cfg.shards.image_format]
        for item_id, image, caption in zip(kept, images, captions):
            if isinstance(caption, ChatError) or caption is None:
                failed[item_id] = str(caption) if caption is not None else "no caption"
                continue
            item = items[item_id]
            meta = {"caption": caption, "width": image.size[0], "height": image.size[1],
                    "original_width": item["width"], "original_height": item["height"],
                    "bucket": {"base": item["bucket_area"], "ratio": item["bucket_ratio"],
                               "height": item["bucket_height"], "width": item["bucket_width"]},
                    "upscaled": item["upscaled"], "id": item_id}
            samples.append((sample_key(item_id), ext, encode(image, cfg.shards.image_format, cfg.shards.quality), meta))
        record = {"name": entry["name"], "written": [s[3]["id"] for s in samples], "failed": failed,
                  "captions": {s[3]["id"]: s[3]["caption"] for s in samples}, "timing": dict(timing)}
        if failed and not cfg.caption.drop_failed:
            record["complete"] = False
            return record
        timing["write"] += time.perf_counter() - t0
        record["complete"], record["timing"] = True, dict(timing)
        write_json(lay.record(entry["name"]), record)
        write_tar(lay.shard(entry["name"]), samples)
        return record


_WORKER: Optional[Worker] = None


def init_worker(out: str, share: int = 1) -> None:
    global _WORKER
    import torch

    torch.set_num_threads(1)
    _WORKER = Worker(out, share)


def run_task(task: tuple):
    kind, payload = task
    return getattr(_WORKER, kind)(payload)

