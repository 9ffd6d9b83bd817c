"""The manifest (one parquet row per input image) and the run report (counts, times and
throughput per stage), written at the end of every run."""
from __future__ import annotations

import os
from collections import Counter
from typing import List

from .config import STAGES, CurateConfig
from .layout import Layout, read_json, write_json
from .worker import read_parquet, write_parquet

MANIFEST_FIELDS = [("id", "string"), ("source", "string"), ("key", "string"), ("offset", "int64"),
                   ("sha256", "string"), ("bytes", "int64"), ("format", "string"), ("mode", "string"),
                   ("width", "int64"), ("height", "int64"), ("rotated", "bool"), ("decode_error", "string"),
                   ("decode_detail", "string")] + [(f"score_{s}", "float64") for s in STAGES[1:]] + \
                  [("cluster", "int64"), ("dup_of", "string"), ("status", "string"), ("dropped_by", "string"),
                   ("caption_in", "string"), ("caption", "string"), ("caption_error", "string"),
                   ("bucket", "string"), ("shard", "string"), ("sample_key", "string")]


def build_manifest(cfg: CurateConfig, lay: Layout, state: dict, plan: List[dict]) -> List[dict]:
    from .shards import sample_key

    dedup = {}
    if cfg.dedup.enabled:
        for name in sorted(os.listdir(lay.dedup)):
            if name.startswith("part-") and name.endswith(".parquet"):
                dedup.update({r["id"]: r for r in read_parquet(os.path.join(lay.dedup, name))})
    placed = {}
    for entry in plan:
        record = read_json(lay.record(entry["name"])) if os.path.isfile(lay.shard(entry["name"])) else None
        for item in entry["items"]:
            placed[item["id"]] = (entry["name"], item["bucket"], record)
    rows = []
    for unit in state["units"]:
        for r in read_parquet(lay.unit_rows(unit["id"])):
            d = dedup.get(r["id"], {})
            row = {k: r.get(k) for k, _ in MANIFEST_FIELDS if k in r}
            row.update(score_dedup=d.get("score_dedup"), cluster=d.get("cluster"), dup_of=d.get("dup_of"))
            status, dropped_by = "dropped", r["failed"]
            if dropped_by is None and d.get("dropped"):
                dropped_by = "dedup"
            elif dropped_by is None and r["id"] in placed:
                shard, bucket, record = placed[r["id"]]
                row.update(bucket=bucket, sample_key=sample_key(r["id"]))
                if record is None:
                    status = "pending"
                elif r["id"] in record["written"]:
                    status = "kept"
                    row.update(shard=shard, caption=record["captions"][r["id"]])
                else:
                    dropped_by, row["caption_error"] = "caption", record["failed"].get(r["id"])
            elif dropped_by is None:
                dropped_by, row["caption_error"] = "caption", "no caption in the input and captioning is off"
            row.update(status=status, dropped_by=dropped_by if status == "dropped" else None)
            rows.append(row)
    write_parquet(lay.manifest, rows, MANIFEST_FIELDS)
    return rows


def _seconds(lay: Layout, state: dict) -> Counter:
    total: Counter = Counter()
    for unit in state["units"]:
        path = lay.unit_rows(unit["id"]) + ".json"
        if os.path.isfile(path):
            total.update(read_json(path)["timing"])
    for name in os.listdir(lay.dedup):
        if name.startswith("part-") and name.endswith(".json"):
            total["dedup"] += read_json(os.path.join(lay.dedup, name))["seconds"]
    for name in os.listdir(lay.records):
        if name.endswith(".json"):
            total.update(read_json(os.path.join(lay.records, name)).get("timing", {}))
    return total


def write_reports(cfg: CurateConfig, lay: Layout, state: dict, manifest: List[dict], plan: List[dict],
                  executor: str, workers: int) -> dict:
    seconds = _seconds(lay, state)
    dropped = Counter(r["dropped_by"] for r in manifest if r["status"] == "dropped")
    status = Counter(r["status"] for r in manifest)
    stages = {}
    remaining = len(manifest)
    for stage in STAGES + ("caption",):
        on = stage == "caption" or cfg.stage_on(stage)
        scored = sum(1 for r in manifest if r.get(f"score_{stage}") is not None) if stage not in ("decode", "caption") \
            else (len(manifest) if stage == "decode" else sum(1 for r in manifest if r.get("bucket")))
        sec = seconds.get(stage, 0.0) + (seconds.get("embed", 0.0) if stage == "dedup" else 0.0)
        stages[stage] = {"on": on, "in": remaining, "dropped": dropped.get(stage, 0), "scored": scored,
                         "seconds": round(sec, 3), "images_per_s_per_core": round(scored / sec, 1) if sec > 0 else None}
        remaining -= dropped.get(stage, 0)
    stages["dedup"]["embed_seconds"] = round(seconds.get("embed", 0.0), 3)
    for extra in ("resize", "write"):
        stages["caption"][f"{extra}_seconds"] = round(seconds.get(extra, 0.0), 3)
    buckets = Counter(r["bucket"] for r in manifest if r["status"] == "kept")
    report = {"images": len(manifest), "kept": status.get("kept", 0), "pending": status.get("pending", 0),
              "dropped": sum(dropped.values()), "shards": sum(1 for e in plan if os.path.isfile(lay.shard(e["name"]))),
              "stages": stages,
              "decode_errors": dict(Counter(r["decode_error"] for r in manifest if r["decode_error"])),
              "buckets": dict(sorted(buckets.items())),
              "walls_s": {k: round(v, 2) for k, v in state.get("walls", {}).items()},
              "executor": executor, "workers": workers, "ignored_files": state["scan"]["ignored_files"],
              "cpu": os.cpu_count()}
    write_json(lay.report_json, report)
    lines = [f"# Curation report: {lay.out}", "",
             f"{report['images']} images in, {report['kept']} kept in {report['shards']} shards, "
             f"{report['dropped']} dropped, {report['pending']} pending; executor {executor} with {workers} "
             "workers.", "",
             "| stage | on | in | dropped | scored | worker s | images/s/core |", "|---|---|---|---|---|---|---|"]
    for stage, s in stages.items():
        rate = "" if s["images_per_s_per_core"] is None else f"{s['images_per_s_per_core']:,.1f}"
        lines.append(f"| {stage} | {'yes' if s['on'] else 'no'} | {s['in']} | {s['dropped']} | {s['scored']} | "
                     f"{s['seconds']:.2f} | {rate} |")
    lines += ["", f"Decode failures: {report['decode_errors'] or 'none'}. Buckets kept: {report['buckets']}.",
              f"Wall time per phase (s): {report['walls_s']}. Dedup seconds include the embedding "
              f"({stages['dedup']['embed_seconds']} s); caption seconds exclude re-reading and resizing "
              f"({stages['caption']['resize_seconds']} s) and writing ({stages['caption']['write_seconds']} s).", ""]
    with open(lay.report_md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return report
