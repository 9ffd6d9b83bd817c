"""The driver: ``curate(inputs, out, cfg)`` runs the phases in order, each resumable.

1. scan     the inputs' units of work are fixed and saved in ``OUT/curate.json``;
2. filter   every unit not yet done runs stages 1-8 and the embedding (in parallel);
3. dedup    k-means centroids on a sample, then assignment per unit and exact comparison per
            group of clusters (in parallel);
4. plan     the kept images' buckets and the shards they go to (deterministic);
5. shards   every shard not yet written is captioned and written (in parallel); the first
            runs here first, so a captioning server that is down stops the run at once;
6. report   ``manifest.parquet``, ``report.json`` and ``report.md``.

A killed run, rerun with the same command, skips every finished unit, part and shard, so it
ends with the same output as an uninterrupted run. A folder holding anything else (another
run's shards, a run with other settings) is refused, never overwritten.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, List, Optional

import numpy as np

from ..errors import OutputExists
from . import dedup as dd
from .caption import CaptionServerDown
from .config import CurateConfig
from .executors import make_executor
from .inputs import expand_inputs, scan
from .layout import Layout, read_json, write_json
from .report import build_manifest, write_reports
from .shards import assign_bucket, bucket_name, bucket_table, plan_shards, smallest_bucket_area
from .worker import Worker, read_parquet

log = logging.getLogger(__name__)
DEDUP_PARTS = 64


class CurationIncomplete(RuntimeError):
    """Some shards could not be written (captions failed); a rerun retries them."""


def _diff(a: dict, b: dict, prefix: str = "") -> List[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            keys += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(prefix + k)
    return keys


def prepare(cfg: CurateConfig, inputs: List[str], lay: Layout) -> dict:
    """Create the run's state, or return the saved one to resume; refuse anything else."""
    paths = expand_inputs(inputs)
    if os.path.exists(lay.out) and not os.path.isdir(lay.out):
        raise OutputExists(f"--out {lay.out} exists and is not a folder")
    names = sorted(os.listdir(lay.out)) if os.path.isdir(lay.out) else []
    if names:
        if not os.path.isfile(lay.state):
            tars = [n for n in names if n.endswith(".tar")] + (["shards/"] if "shards" in names else [])
            what = f"shards ({', '.join(tars[:3])})" if tars else f"files ({', '.join(names[:3])})"
            raise OutputExists(f"--out {lay.out} already holds {what} and no curate.json; curation never "
                                  "overwrites a folder it did not start: choose a new or empty folder")
        state = read_json(lay.state)
        changed = _diff(state["fingerprint"], cfg.fingerprint())
        if changed or state["input_paths"] != paths:
            what = f"settings {changed[:6]}" if changed else "inputs"
            raise OutputExists(f"--out {lay.out} holds a curation run with other {what}; its shards are never "
                                  "overwritten: use a new folder, or rerun with the same inputs and settings to resume")
        state["config"] = cfg.to_dict()  # execution settings (workers, endpoint, ...) may change on a resume
        write_json(lay.state, state)
        return state
    lay.make()
    table = bucket_table(cfg.shards.buckets)
    units, summary = scan(paths, cfg.execution.unit_size, lay.listing)
    state = {"config": cfg.to_dict(), "fingerprint": cfg.fingerprint(), "input_paths": paths, "units": units,
             "scan": summary, "status": "running", "created": time.time(),
             "min_area": cfg.area.min_area or smallest_bucket_area(table), "buckets": len(table)}
    write_json(lay.state, state)
    return state


def _dedup(cfg: CurateConfig, lay: Layout, units: List[dict], ex, say) -> None:
    ids = [u["id"] for u in units]
    alive = {}
    for uid in ids:
        rows = read_parquet(lay.unit_rows(uid), ["failed", "emb_row"])
        alive[uid] = [r["emb_row"] for r in rows if r["failed"] is None]
    total = sum(len(v) for v in alive.values())
    centroids_path = os.path.join(lay.dedup, "centroids.npy")
    if not os.path.isfile(centroids_path):
        rng = np.random.default_rng(cfg.dedup.seed)
        keep = set(rng.choice(total, size=min(total, cfg.dedup.sample), replace=False).tolist()) if total else set()
        sample, seen = [], 0
        for uid in ids:
            chosen = [r for j, r in enumerate(alive[uid]) if seen + j in keep]
            seen += len(alive[uid])
            if chosen:
                sample.append(np.asarray(np.load(lay.unit_embeddings(uid), mmap_mode="r")[chosen], np.float32))
        sample = np.concatenate(sample) if sample else np.zeros((0, 1), np.float32)
        k = dd.n_clusters(max(total, 1), cfg.dedup.clusters)
        np.save(centroids_path + ".tmp.npy", dd.train_centroids(sample, k, cfg.dedup.seed))
        os.replace(centroids_path + ".tmp.npy", centroids_path)
    k = np.load(centroids_path).shape[0]
    list(ex.map("assign", [u for u in ids if not os.path.isfile(lay.unit_assign(u))]))
    parts = max(1, min(k, DEDUP_PARTS))
    todo = [{"part": p, "parts": parts, "units": ids} for p in range(parts) if not os.path.isfile(lay.dedup_part(p))]
    list(ex.map("dedup", todo))
    say(f"dedup: {total} images in {k} clusters compared in {parts} parts")


def _plan(cfg: CurateConfig, lay: Layout, units: List[dict]) -> List[dict]:
    if os.path.isfile(lay.plan):
        return read_json(lay.plan)
    dropped = set()
    if cfg.dedup.enabled:
        for p in range(max(1, min(np.load(os.path.join(lay.dedup, "centroids.npy")).shape[0], DEDUP_PARTS))):
            dropped |= {r["id"] for r in read_parquet(lay.dedup_part(p), ["id", "dropped"]) if r["dropped"]}
    table = bucket_table(cfg.shards.buckets)
    items = []
    for u in units:
        for r in read_parquet(lay.unit_rows(u["id"])):
            if r["failed"] is not None or r["id"] in dropped:
                continue
            if not cfg.caption.enabled and not r["caption_in"]:
                continue  # counted as dropped by "caption" in the manifest
            area, ratio, h, w, up = assign_bucket(r["width"], r["height"], table)
            items.append({"id": r["id"], "source": r["source"], "offset": r["offset"], "caption_in": r["caption_in"],
                          "width": r["width"], "height": r["height"], "bucket": bucket_name(area, ratio),
                          "bucket_area": area, "bucket_ratio": ratio, "bucket_height": h, "bucket_width": w,
                          "upscaled": up})
    by_id = {i["id"]: i for i in items}
    plan = [{"name": e["name"], "bucket": e["bucket"], "items": [by_id[i] for i in e["ids"]]}
            for e in plan_shards(items, cfg.shards.samples_per_shard, cfg.shards.seed)]
    write_json(lay.plan, plan)
    return plan


def _require(module: str, what: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs {module}, which is not installed: pip install -e '.[curate]' "
                          "(pyarrow, faiss-cpu)") from None


def curate(inputs: List[str], out: str, cfg: Optional[CurateConfig] = None,
           say: Callable[[str], None] = print) -> dict:
    """Run (or resume) a curation; returns the report. Raises ``CurationIncomplete`` when
    shards are left unwritten (captions failed; a rerun retries them)."""
    cfg = (cfg or CurateConfig()).validate()
    _require("pyarrow", "the manifest")
    if cfg.dedup.enabled:
        _require("faiss", "the dedup stage")
    lay = Layout(out)
    state = prepare(cfg, inputs, lay)
    if state["status"] == "complete":
        say(f"curate: {lay.out} is already complete; nothing to do (report: {lay.report_md})")
        return read_json(lay.report_json)
    if cfg.caption.enabled:
        from .caption import read_prompt, resolve_endpoint

        resolve_endpoint(cfg.caption)
        read_prompt(cfg.caption)
    walls = state.get("walls", {})
    ex = make_executor(cfg.execution.executor, lay.out, cfg.execution.workers, cfg.execution.ray_address)
    try:
        t0 = time.perf_counter()
        todo = [u for u in state["units"] if not os.path.isfile(lay.unit_rows(u["id"]))]
        if todo:  # load the models here first: a missing weight fails once, before any work
            Worker(lay.out).models()
        for n, summary in enumerate(ex.map("filter", todo), 1):
            say(f"filter: unit {summary['unit']} ({summary['images']} images) done, {n}/{len(todo)}")
        walls["filter"] = walls.get("filter", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        if cfg.dedup.enabled:
            _dedup(cfg, lay, state["units"], ex, say)
        walls["dedup"] = walls.get("dedup", 0.0) + time.perf_counter() - t0
        plan = _plan(cfg, lay, state["units"])
        todo = [e for e in plan if not os.path.isfile(lay.shard(e["name"]))]
        t0 = time.perf_counter()
        records = []
        if todo:
            first = Worker(lay.out).shard(todo[0])  # a dead captioning server stops the run here
            records = [first] + list(ex.map("shard", todo[1:]))
        walls["shards"] = walls.get("shards", 0.0) + time.perf_counter() - t0
    except CaptionServerDown as e:
        raise CaptionServerDown(f"{e}. Nothing was lost: filtering results are kept in {lay.work}; start the "
                                "server and rerun the same command to resume") from None
    finally:
        ex.close()
        state["walls"] = walls
        write_json(lay.state, state)
    incomplete = [r for r in records if not r.get("complete")]
    manifest = build_manifest(cfg, lay, state, plan)
    report = write_reports(cfg, lay, state, manifest, plan, executor=ex.name, workers=ex.workers)
    if incomplete:
        failed = sum(len(r["failed"]) for r in incomplete)
        raise CurationIncomplete(f"{len(incomplete)} shard(s) not written: {failed} caption(s) failed (first: "
                                 f"{next(iter(incomplete[0]['failed'].values()))[:200]}); rerun the same command to "
                                 "retry them (captions already made are cached), or pass --drop-failed-captions")
    state["status"] = "complete"
    write_json(lay.state, state)
    say(f"curate: {report['kept']} of {report['images']} images kept in {report['shards']} shards under {lay.shards}; "
        f"manifest {lay.manifest}, report {lay.report_md}")
    return report
