"""Per-stage throughput of the curation pipeline on ONE CPU core, on photo-sized images.

    python bench/curate_throughput.py --out bench/results/curate_cpu2_DATE [--images 48]

Synthetic 1024x768 JPEGs (q90; smooth colour fields with noise, ~200 KB: the decode cost of a
typical web photo) through the real stage code: decode (stage 1), area, clarity (at a
512 short side), entropy, luminance, the model stages with RANDOM weights of the real
architectures (speed does not depend on the weights): CLIP ViT-L/14 image embedding (dedup
and the heads), the aesthetic MLP head (LAION layout), a ViT-B/16 image classifier (NSFW or
watermark); dedup (faiss k-means + exact in-cluster cosine) on synthetic 768-d embeddings;
and the shard writer (cover-resize to the bucket + JPEG q95). One thread, one process: the
numbers are images per second per core. Captioning is not measured (it is the VLM server's
throughput). Prints a table and writes results.json / results.md under --out.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time

import numpy as np
import torch
from PIL import Image


def photo(seed: int, w: int = 1024, h: int = 768) -> bytes:
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (h // 64, w // 64, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.clip(np.asarray(field, np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rate(fn, items, repeat: int = 1) -> float:
    fn(items[:2])  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(items)
    return repeat * len(items) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    from lens_fast.curate import dedup as dd
    from lens_fast.curate import measures
    from lens_fast.curate.decode import decode, encode
    from lens_fast.curate.shards import assign_bucket, bucket_table, fit_image

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--model-images", type=int, default=8)
    p.add_argument("--dedup-n", type=int, default=50_000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    files = [photo(i) for i in range(args.images)]
    decoded = [decode(f, draft_side=512).image for f in files]
    arrays = [np.asarray(im) for im in decoded]
    res = {}
    res["decode"] = rate(lambda xs: [decode(f, draft_side=512) for f in xs], files)
    res["area"] = rate(lambda xs: [measures.area(*im.size) for im in xs], decoded, repeat=100)
    res["clarity"] = rate(lambda xs: [measures.clarity(a, 512) for a in xs], arrays)
    res["entropy"] = rate(lambda xs: [measures.entropy(a) for a in xs], arrays)
    res["luminance"] = rate(lambda xs: [measures.luminance(a) for a in xs], arrays)

    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig,
                              ViTForImageClassification)

    model_images = decoded[:args.model_images]
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    clip_l14 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                patch_size=14, image_size=224, projection_dim=768)
    clip = CLIPVisionModelWithProjection(clip_l14).eval()
    vit = ViTForImageClassification(ViTConfig(image_size=224, patch_size=16, num_labels=2)).eval()

    def embed(xs):
        with torch.inference_mode():
            return clip(pixel_values=proc(images=xs, return_tensors="pt")["pixel_values"]).image_embeds

    def classify(xs):
        with torch.inference_mode():
            return vit(pixel_values=proc(images=xs, return_tensors="pt")["pixel_values"]).logits.softmax(-1)

    res["embed (CLIP ViT-L/14)"] = rate(embed, model_images)
    res["nsfw / watermark (ViT-B/16 classifier)"] = rate(classify, model_images)
    shapes = [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]  # LAION's aesthetic MLP
    head = [np.random.default_rng(0).normal(0, 0.03, s).astype(np.float32) for s in shapes]
    emb = np.random.default_rng(1).normal(size=(4096, 768)).astype(np.float32)

    def aesthetic(xs):
        x = xs
        for w in head:
            x = x @ w.T
        return x

    res["aesthetic (MLP head)"] = rate(aesthetic, emb, repeat=10)

    rng = np.random.default_rng(2)
    n = args.dedup_n
    x = rng.normal(size=(n, 768)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k = dd.n_clusters(n, None)
    t0 = time.perf_counter()
    cents = dd.train_centroids(x[:min(n, 100 * k)], k, 0)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = dd.assign(x, cents)
    t_assign = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        dd.dedup_cluster(x[idx], np.arange(len(idx)), 0.95)
    t_compare = time.perf_counter() - t0
    res["dedup (assign + compare)"] = n / (t_assign + t_compare)
    table = bucket_table("stage2")

    def shard(xs):
        for im in xs:
            area, ratio, h, w, _ = assign_bucket(im.size[0], im.size[1], table)
            encode(fit_image(im, h, w, True), "jpg", 95)

    res["shard (resize + JPEG q95)"] = rate(shard, decoded[:16])
    meta = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU, shared with other work", "threads": 1,
            "torch": torch.__version__,
            "images": "1024x768 JPEG q90, ~%d KB" % (sum(map(len, files)) / len(files) / 1024),
            "dedup": {"n": n, "clusters": k, "kmeans_train_s": round(t_train, 2), "assign_s": round(t_assign, 2),
                      "compare_s": round(t_compare, 2), "dim": 768},
            "date": time.strftime("%Y-%m-%d")}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"images_per_s_per_core": res, **meta}, f, indent=1)
    lines = [f"# Curation stages, images/s on one core ({meta['machine']}, {meta['date']})", "",
             f"Images: {meta['images']}; models: random weights of the real architectures; dedup: {meta['dedup']}.", "",
             "| stage | images/s per core | core-seconds per 1k images |", "|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r:,.1f} | {1000 / r:,.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
