"""Sample-based retrieval: the ``k`` nearest pool images of every seed image (DINOv2, Table 15).

Several seeds may retrieve the same pool image (a "collision", which the paper names as the
reason k stays small). The image is kept once; all its (seed, similarity) links are returned so
provenance can list every seed that asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.index import SearchParams, knn_search


@dataclass
class SampleRetrieval:
    """Links sorted by (pool index, similarity descending, seed index)."""

    pool_idx: np.ndarray  # int64 [links]
    seed_idx: np.ndarray  # int64 [links]
    similarity: np.ndarray  # float32 [links]

    @property
    def retrieved(self) -> int:
        """Links kept, counting an image once per seed that retrieved it (Table 15's count)."""
        return len(self.pool_idx)

    @property
    def unique(self) -> np.ndarray:
        return np.unique(self.pool_idx)

    @property
    def collisions(self) -> int:
        """Links that landed on an image another seed had already retrieved."""
        return self.retrieved - len(self.unique)


def sample_retrieval(
    pool: np.ndarray,
    seeds: np.ndarray,
    k: int,
    *,
    min_similarity: float | None = None,
    index: str = "auto",
    gpu: str | bool = "auto",
    params: SearchParams | None = None,
    seed: int = 0,
) -> SampleRetrieval:
    """Top-``k`` pool neighbours (cosine, L2-normalised inputs) of every seed embedding."""
    if len(pool) == 0 or len(seeds) == 0:
        empty = np.zeros(0, np.int64)
        return SampleRetrieval(empty, empty, np.zeros(0, np.float32))
    sims, ids = knn_search(pool, seeds, k, spec=index, metric="ip", gpu=gpu, params=params, seed=seed)
    keep = ids >= 0
    if min_similarity is not None:
        keep &= sims >= min_similarity
    seed_idx = np.broadcast_to(np.arange(len(seeds), dtype=np.int64)[:, None], ids.shape)[keep]
    pool_idx, similarity = ids[keep], sims[keep]
    order = np.lexsort((seed_idx, -similarity, pool_idx))
    return SampleRetrieval(pool_idx[order], seed_idx[order], similarity[order].astype(np.float32))
