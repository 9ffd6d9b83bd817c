"""The curation pipeline's toy proof (CPU, measured):

    python -m lens_fast.curate.toy_proof --out DIR [--clean 400 --defects 40 --train-steps 60]

1. makes a toy-world set with planted defects (``toyset``) and calibrates on it;
2. curates it with ``TOY_SETTINGS`` on one worker (so worker seconds are per core), the
   toy captioner behind a real local chat-completions server (``toy_models``), the toy
   scene embedding for dedup (no CLIP weights exist offline here), the model stages off
   (no defects are planted for them);
3. scores each stage against the truth: per stage, precision and recall of its own
   decision on the clean images plus the defects planted for it (every stage scores every
   image), and the pipeline's attribution (which stage dropped each kind: in the paper's
   order an earlier stage may take a defect planted for a later one); the clean images
   kept; captions that match the scene;
4. trains the miniature Lens with ``lens-fast train`` from the curated shards (a tiny
   random GPT-OSS as text encoder) and reports the loss at the start and the end;
5. writes ``report.md`` and ``report.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace

import yaml

from .config import CurateConfig
from .toyset import EXPECTED_STAGE, make_toy_set

# Chosen from the calibration histograms of the toy set (STAGES.md gives the numbers).
TOY_SETTINGS = {
    "area": {"min_area": 1024},
    "nsfw": {"enabled": False}, "aesthetic": {"enabled": False}, "watermark": {"enabled": False},
    "clarity": {"side": 72, "min_score": 2.5},
    "entropy": {"min_score": 0.08},
    "luminance": {"min_score": 0.075, "max_score": 0.955},
    "dedup": {"max_cosine": 0.95},
    "embedder": {"model": "toy"},
    "caption": {"image_format": "PNG", "max_concurrency": 4},
    "shards": {"samples_per_shard": 64, "image_format": "png"},
    "execution": {"workers": 1, "unit_size": 100},
}
TOY_BUCKETS = {"base": "tiny-cpu", "data": {"source": "webdataset", "areas": [36, 48], "ratios": ["2:3", "1:1", "3:2"],
                                            "batch_per_area": {36: 16, 48: 8}, "multiple": 4, "min_side": 24,
                                            "max_text_tokens": 160, "workers": 2}}
DEMO_MODEL = dict(patch_size=4, in_channels=48, out_channels=3, num_layers=4, attention_head_dim=32,
                  num_attention_heads=4, inner_dim=128, enc_hidden_dim=64, axes_dims_rope=[8, 12, 12],
                  selected_layer_index=[1, 2])


def toy_config(out: str, caption_url: str = None) -> CurateConfig:
    buckets = os.path.join(out, "toy_buckets.yaml")
    with open(buckets, "w", encoding="utf-8") as f:
        yaml.safe_dump(TOY_BUCKETS, f)
    cfg = CurateConfig().update(json.loads(json.dumps(TOY_SETTINGS)))
    cfg.shards.buckets = buckets
    if caption_url:
        cfg.caption.base_url, cfg.caption.model = caption_url, "toy-vlm"
    return cfg.validate()


def _fails(stage: str, row: dict, cfg: CurateConfig) -> bool:
    if stage == "decode":
        return row["decode_error"] is not None
    if stage == "dedup":
        return row["dropped_by"] == "dedup"
    score = row.get(f"score_{stage}")
    if score is None:
        return False
    if stage == "area":
        return score < cfg.area.min_area
    if stage == "luminance":
        return not cfg.luminance.min_score <= score <= cfg.luminance.max_score
    return score < getattr(cfg, stage).min_score


def score_stages(manifest: list, truth: list, cfg: CurateConfig) -> dict:
    kind = {os.path.basename(r["id"]): None for r in manifest}
    kind.update({t["file"]: t["kind"] for t in truth})
    rows = [dict(r, kind=kind[os.path.basename(r["id"])]) for r in manifest]
    stages = defaultdict(list)
    for k, s in EXPECTED_STAGE.items():
        stages[s].append(k)
    out = {}
    for stage, kinds in stages.items():
        pool = [r for r in rows if r["kind"] in kinds or r["kind"] == "clean"]
        if stage == "dedup":  # judged where dedup runs: among the images that reached it
            pool = [r for r in pool if r["dropped_by"] in (None, "dedup", "caption")]
        flagged = [r for r in pool if _fails(stage, r, cfg)]
        hits = sum(r["kind"] in kinds for r in flagged)
        planted = sum(r["kind"] in kinds for r in pool)
        out[stage] = {"defects": kinds, "planted": planted, "flagged": len(flagged),
                      "precision": hits / len(flagged) if flagged else None,
                      "recall": hits / planted if planted else None}
    confusion = defaultdict(Counter)
    for r in rows:
        confusion[r["kind"]][r["dropped_by"] or "kept"] += 1
    clean = [r for r in rows if r["kind"] == "clean"]
    return {"per_stage": out, "attribution": {k: dict(v) for k, v in confusion.items()},
            "clean_kept": sum(r["status"] == "kept" for r in clean) / len(clean)}


def caption_accuracy(manifest: list, truth: list) -> dict:
    from ..toy.captions import dense_caption
    from ..toy.scene import Scene

    scenes = {t["file"]: t["scene"] for t in truth if t["kind"] == "clean"}
    n = right = 0
    for r in manifest:
        name = os.path.basename(r["id"])
        if r["status"] == "kept" and name in scenes:
            s = Scene.from_dict(scenes[name])
            s = replace(s, relation=None, objects=tuple(sorted(s.objects, key=lambda o: (o.row, o.col))))
            n += 1
            right += r["caption"] == dense_caption(s)
    return {"captions": n, "match_scene": right, "rate": right / n if n else None}


def train_on_shards(out: str, shards: str, steps: int) -> dict:
    from ..testing import make_tiny_gpt_oss, make_tiny_tokenizer

    enc = os.path.join(out, "text_encoder_ckpt")
    make_tiny_gpt_oss(os.path.join(enc, "text_encoder"), num_layers=3, hidden=DEMO_MODEL["enc_hidden_dim"])
    make_tiny_tokenizer(os.path.join(enc, "tokenizer"))
    config = dict(TOY_BUCKETS, model={"transformer": DEMO_MODEL},
                  encoders={"vae": "pixel", "pixel_patch": 4, "text_encoder": enc, "dtype": "float32"},
                  logging={"every": 1, "progress_bar": False, "tensorboard": False},
                  checkpoint={"every": steps}, optim={"lr": 1e-3, "warmup_steps": 5})
    path = os.path.join(out, "toy_train.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    run = os.path.join(out, "train_run")
    cmd = [sys.executable, "-m", "lens_fast.cli", "train", "--config", path, "--data", shards, "--max-steps",
           str(steps), "--out", run, "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"lens-fast train failed ({proc.returncode}): {proc.stderr[-2000:]}")
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    k = max(1, len(losses) // 5)
    return {"command": " ".join(["lens-fast"] + cmd[3:]), "steps": len(losses),
            "wall_s": round(time.perf_counter() - t0, 1), "loss_first": sum(losses[:k]) / k,
            "loss_last": sum(losses[-k:]) / k, "last_line": proc.stdout.strip()[-300:]}


def run_proof(out: str, n_clean: int = 400, n_defect: int = 40, seed: int = 0, train_steps: int = 60) -> dict:
    from ..chat_server import LocalChatServer
    from .calibrate import calibrate
    from .pipeline import curate
    from .worker import read_parquet

    os.makedirs(out, exist_ok=True)
    images = os.path.join(out, "images")
    truth = make_toy_set(images, n_clean, n_defect, seed, truth_path=os.path.join(out, "truth.jsonl"))
    calibrate([images], os.path.join(out, "calibration"), toy_config(out), sample=len(truth), say=lambda s: None)
    with LocalChatServer("lens_fast.curate.toy_models:caption_handler", model="toy-vlm") as server:
        cfg = toy_config(out, server.url)
        t0 = time.perf_counter()
        report = curate([images], os.path.join(out, "curated"), cfg, say=lambda s: None)
        wall = time.perf_counter() - t0
        requests = server.stats()["requests"]
    manifest = read_parquet(os.path.join(out, "curated", "manifest.parquet"))
    result = {"images": len(truth), "clean": n_clean, "defects_per_kind": n_defect, "seed": seed,
              "curate_wall_s": round(wall, 1), "caption_requests": requests, "curate_report": report,
              **score_stages(manifest, truth, cfg), "captions": caption_accuracy(manifest, truth)}
    world = os.path.join(out, "world")
    world_truth = make_toy_set(world, n_clean, 0, seed + 1, restrict=False, truth_path=os.path.join(out, "world.jsonl"))
    cal = calibrate([world], os.path.join(out, "world_calibration"), toy_config(out), sample=len(world_truth),
                    say=lambda s: None)
    result["whole_world_would_drop"] = {s: v["would_drop"] for s, v in cal["stages"].items()}
    result["training"] = train_on_shards(out, os.path.join(out, "curated", "shards", "*.tar"), train_steps)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(render(result))
    return result


def render(r: dict) -> str:
    fmt = (lambda v: "n/a" if v is None else f"{v:.3f}")
    lines = [f"# Curation toy proof ({r['images']} images: {r['clean']} clean, {r['defects_per_kind']} per defect "
             "kind, "
             f"seed {r['seed']})", "", "| stage | defects planted for it | planted | flagged | precision | recall |",
             "|---|---|---|---|---|---|"]
    for stage, s in r["per_stage"].items():
        lines.append(f"| {stage} | {', '.join(s['defects'])} | {s['planted']} | {s['flagged']} | "
                     f"{fmt(s['precision'])} | "
                     f"{fmt(s['recall'])} |")
    lines += ["", f"Clean images kept: **{r['clean_kept']:.3f}**. Captions matching the scene: "
              f"{r['captions']['match_scene']} / {r['captions']['captions']} ({r['caption_requests']} requests to the "
              "local server).", "", "Which stage dropped each kind in the pipeline (paper order):", ""]
    for kind, counts in sorted(r["attribution"].items()):
        lines.append(f"- {kind}: {counts}")
    lines += ["", f"Whole toy world (white backgrounds and yellow on light grey included), share each stage would "
              f"drop: {json.dumps({k: round(v, 3) for k, v in r['whole_world_would_drop'].items()})}", "",
              f"Curation wall {r['curate_wall_s']} s (one worker). Per-stage throughput: see curated/report.md.", "",
              f"Training from the shards: `{r['training']['command']}`: {r['training']['steps']} steps in "
              f"{r['training']['wall_s']} s, loss {r['training']['loss_first']:.4f} (first fifth) -> "
              f"{r['training']['loss_last']:.4f} (last fifth).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lens_fast.curate.toy_proof", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--clean", type=int, default=400)
    p.add_argument("--defects", type=int, default=40, help="images per defect kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=60)
    args = p.parse_args(argv)
    result = run_proof(args.out, args.clean, args.defects, args.seed, args.train_steps)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
