"""Stage 9: near-duplicates by embedding cosine, cluster-then-compare (as SemDeDup does).

All-pairs cosine is quadratic: 800M images would be 3.2e17 pairs. Instead:
1. ``train_centroids``: spherical k-means (faiss) on a sample of the embeddings;
2. ``assign``: every embedding goes to its nearest centroid (one faiss search per unit);
3. ``dedup_cluster``: inside each cluster, exact cosine between all members. Members are
   ordered by priority (the larger image first, then the id); a member whose cosine to an
   EARLIER member reaches ``max_cosine`` is dropped, with that member as ``dup_of`` (the
   SemDeDup rule: within a group of near-duplicates only the first survives). Its score is
   its highest cosine to any other member (the nearest neighbour in the cluster).
Pairs split across two clusters are missed; SemDeDup measured that this loses few
duplicates because near-duplicates sit far closer to each other than to other centroids.
Clusters are independent, so step 3 runs in parallel over groups of clusters.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np

from ..errors import MissingDependency

BLOCK = 2048  # rows of the cosine matrix computed at once (memory: BLOCK x cluster size)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MissingDependency("the dedup stage needs faiss: pip install -e '.[curate]' (faiss-cpu)") from None
    return faiss


def n_clusters(n: int, clusters: Optional[int]) -> int:
    k = clusters if clusters else max(1, int(round(math.sqrt(n))))
    return max(1, min(int(k), n))


def train_centroids(sample: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Unit-norm centroids [k, d] of spherical k-means on ``sample`` [n, d]."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if x.shape[0] == 0:
        return np.zeros((0, x.shape[1] if x.ndim == 2 else 0), np.float32)
    k = min(k, x.shape[0])
    if k == 1:
        c = x.mean(axis=0, keepdims=True)
        return c / max(np.linalg.norm(c), 1e-12)
    faiss = _faiss()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, min_points_per_centroid=1,
                      max_points_per_centroid=1_000_000, verbose=False)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def assign(emb: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (highest cosine) of every row."""
    if emb.shape[0] == 0:
        return np.zeros(0, np.int64)
    if centroids.shape[0] == 1:
        return np.zeros(emb.shape[0], np.int64)
    faiss = _faiss()
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, labels = index.search(np.ascontiguousarray(emb, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64)


def dedup_cluster(emb: np.ndarray, order: np.ndarray, max_cosine: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one cluster's members ``emb`` [m, d] visited in ``order`` (a permutation):
    (dropped [m] bool, dup_of [m] member index or -1, nearest-neighbour cosine [m], NaN for
    a cluster of one)."""
    m = emb.shape[0]
    dropped = np.zeros(m, bool)
    dup_of = np.full(m, -1, np.int64)
    nearest = np.full(m, np.nan, np.float64)
    if m < 2:
        return dropped, dup_of, nearest
    x = np.ascontiguousarray(emb[order], dtype=np.float32)
    for start in range(0, m, BLOCK):
        sims = x[start:start + BLOCK] @ x.T  # [b, m], in visiting order
        rows = np.arange(start, min(start + BLOCK, m))
        sims[np.arange(len(rows)), rows] = -np.inf
        nearest[order[rows]] = sims.max(axis=1)
        earlier = np.where(np.arange(m)[None, :] < rows[:, None], sims, -np.inf)
        best = earlier.argmax(axis=1)
        hit = earlier[np.arange(len(rows)), best] >= max_cosine
        dropped[order[rows[hit]]] = True
        dup_of[order[rows[hit]]] = order[best[hit]]
    return dropped, dup_of, nearest


def priority_order(areas: np.ndarray, ids: List[str]) -> np.ndarray:
    """Visiting order: the larger image first, then by id (deterministic)."""
    return np.array(sorted(range(len(ids)), key=lambda i: (-float(areas[i]), ids[i])), dtype=np.int64)
