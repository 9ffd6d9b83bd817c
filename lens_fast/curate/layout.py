"""Where a curation run keeps its files (one output folder, nothing outside it).

    OUT/curate.json           config, inputs, units, status: marks the folder as this run's
    OUT/shards/*.tar          the training shards (lens-fast train --data 'OUT/shards/*.tar')
    OUT/manifest.parquet      one row per input image: every stage's score, the dropping stage
    OUT/report.json, .md      counts, times and throughput per stage
    OUT/work/                 resumable intermediate results (safe to delete once complete)
"""
from __future__ import annotations

import json
import os


class Layout:
    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        self.state = os.path.join(self.out, "curate.json")
        self.shards = os.path.join(self.out, "shards")
        self.manifest = os.path.join(self.out, "manifest.parquet")
        self.report_json = os.path.join(self.out, "report.json")
        self.report_md = os.path.join(self.out, "report.md")
        self.work = os.path.join(self.out, "work")
        self.listing = os.path.join(self.work, "listing")
        self.units = os.path.join(self.work, "units")
        self.dedup = os.path.join(self.work, "dedup")
        self.records = os.path.join(self.work, "shard_records")
        self.captions = os.path.join(self.work, "captions")
        self.plan = os.path.join(self.work, "plan.json")

    def make(self) -> None:
        for d in (self.shards, self.listing, self.units, self.dedup, self.records, self.captions):
            os.makedirs(d, exist_ok=True)

    def unit_rows(self, unit_id: str) -> str:
        return os.path.join(self.units, f"{unit_id}.parquet")

    def unit_embeddings(self, unit_id: str) -> str:
        return os.path.join(self.units, f"{unit_id}.emb.npy")

    def unit_assign(self, unit_id: str) -> str:
        return os.path.join(self.dedup, f"assign-{unit_id}.npz")

    def dedup_part(self, part: int) -> str:
        return os.path.join(self.dedup, f"part-{part:05d}.parquet")

    def record(self, shard_name: str) -> str:
        return os.path.join(self.records, shard_name + ".json")

    def shard(self, shard_name: str) -> str:
        return os.path.join(self.shards, shard_name)


def write_json(path: str, value) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
