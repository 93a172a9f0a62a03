"""k-means for pool clustering: faiss on the CPU or faiss-gpu, torch on CUDA otherwise.

The pip ``faiss-cpu`` wheel has no GPU support, so on a CUDA machine without ``faiss-gpu`` the
Lloyd iterations run in torch (chunked matmuls), which keeps 100k-cluster runs feasible.
Training subsamples ``max_points_per_centroid * k`` points like faiss does; the final
assignment always covers every point.

``spherical=True`` (default) keeps centroids on the unit sphere and assigns by inner product,
which is what cosine-similarity retrieval over L2-normalised embeddings wants.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import faiss
import numpy as np

from retrieval.index import knn_search, resolve_backend

log = logging.getLogger(__name__)


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [k, d]
    labels: np.ndarray  # int64 [n]: cluster of each point
    scores: np.ndarray  # float32 [n]: similarity to its centroid (spherical) or squared distance
    spherical: bool
    backend: str
    seconds: float

    @property
    def k(self) -> int:
        return len(self.centroids)

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)


def assign(x: np.ndarray, centroids: np.ndarray, spherical: bool = True, gpu: str | bool = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: (labels int64 [n], similarity or squared distance [n])."""
    sims, ids = knn_search(np.ascontiguousarray(centroids, np.float32), x, 1, spec="Flat", metric="ip" if spherical else "l2", gpu=gpu)
    return ids[:, 0].astype(np.int64), sims[:, 0]


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = True,
    gpu: str | bool = "auto",
    max_points_per_centroid: int = 256,
    init_centroids: np.ndarray | None = None,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` clusters (deterministic for a given ``seed``)."""
    t0 = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n points, got k={k}, n={n}")
    backend = resolve_backend("auto", gpu)
    if backend == "torch":
        centroids = _torch_lloyd(x, k, niter, seed, spherical, max_points_per_centroid, init_centroids)
    else:
        km = faiss.Kmeans(
            d,
            k,
            niter=niter,
            seed=seed,
            spherical=spherical,
            gpu=backend == "faiss-gpu",
            max_points_per_centroid=max_points_per_centroid,
            min_points_per_centroid=1,
            verbose=False,
        )
        km.train(x, init_centroids=None if init_centroids is None else np.ascontiguousarray(init_centroids, np.float32))
        centroids = km.centroids.astype(np.float32)
    labels, scores = assign(x, centroids, spherical, gpu)
    result = KMeansResult(centroids, labels, scores, spherical, backend, time.perf_counter() - t0)
    log.info("k-means: %d points, k=%d, %s, %.1f s", n, k, backend, result.seconds)
    return result


# k-means++ seeding costs k passes over the data: worth it for small k, where a random start
# often puts two centroids in one cluster; for large k random starts (as faiss does) are fine.
KMEANS_PP_MAX_K = 1024


def _kmeans_pp(xt, k, rng):
    import torch

    n = len(xt)
    chosen = [int(rng.integers(n))]
    d2 = ((xt - xt[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2.double().cpu().numpy()
        p = p / p.sum() if p.sum() > 0 else np.full(n, 1.0 / n)
        chosen.append(int(rng.choice(n, p=p)))
        d2 = torch.minimum(d2, ((xt - xt[chosen[-1]]) ** 2).sum(1))
    return xt[chosen].clone()


def _torch_lloyd(x, k, niter, seed, spherical, max_points_per_centroid, init_centroids, device=None, chunk=65536):
    """Lloyd iterations in torch (fp32). Empty clusters take the points worst served by theirs,
    so no centroid is wasted (faiss splits large clusters for the same reason)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(seed)
    n = len(x)
    if n > max_points_per_centroid * k:
        x = x[np.sort(rng.choice(n, max_points_per_centroid * k, replace=False))]
    xt = torch.from_numpy(x).to(device)
    if init_centroids is not None:
        c = torch.from_numpy(np.ascontiguousarray(init_centroids, np.float32)).to(device)
    elif k <= KMEANS_PP_MAX_K:
        c = _kmeans_pp(xt, k, rng)
    else:
        c = xt[torch.from_numpy(np.sort(rng.choice(len(x), k, replace=False))).to(device)].clone()
    for _ in range(niter):
        labels = torch.empty(len(xt), dtype=torch.long, device=device)
        score = torch.empty(len(xt), dtype=torch.float32, device=device)
        csq = (c * c).sum(1)
        for s in range(0, len(xt), chunk):
            dots = xt[s : s + chunk] @ c.T
            key = dots if spherical else 2 * dots - csq[None]  # argmax of -||x-c||^2 + ||x||^2
            score[s : s + chunk], labels[s : s + chunk] = key.max(1)
        sums = torch.zeros_like(c).index_add_(0, labels, xt)
        counts = torch.bincount(labels, minlength=k).float()
        empty = (counts == 0).nonzero().flatten()
        c = sums / counts.clamp(min=1)[:, None]
        if len(empty):
            worst = torch.argsort(score)[: len(empty)]
            c[empty] = xt[worst]
        if spherical:
            c = torch.nn.functional.normalize(c, dim=1)
    return c.cpu().numpy().astype(np.float32)
