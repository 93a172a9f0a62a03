"""Provenance of retrieved pool images from their (pool, seed) links, in either execution form.

A link says: seed image ``seed_uid`` (content id ``seed_id``) of ``dataset`` retrieved pool image
``pool_uid`` by ``method`` with cosine ``similarity`` (in ``cluster``, or -1 for sample
retrieval). An image is kept once, however many links it has; its provenance lists the methods
("sample+cluster"), the sorted datasets, the linking seed ids most similar first (ties: seed uid)
up to ``max_links``, the best similarity and its cluster. Everything depends only on uids, so the
single task (all links at once) and the partitioned form (the links of one group of shards)
give the same rows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

METHOD_ORDER = ("sample", "cluster")


@dataclass
class Provenance:
    uid: np.ndarray  # int64 [m], ascending: the retrieved pool images
    method: list[str]
    dataset: list[str]
    seed_ids: list[list[str]]
    similarity: np.ndarray  # float32 [m]
    cluster: list[int | None]
    by_dataset: dict[str, int]  # retrieved images per seed dataset (an image counts for each)

    @property
    def shared_between_datasets(self) -> int:
        return sum(1 for d in self.dataset if "," in d)


def provenance(pool_uid, seed_uid, seed_id, similarity, method, dataset, cluster, max_links: int) -> Provenance:
    """One provenance row per distinct ``pool_uid`` of the links."""
    pool_uid = np.asarray(pool_uid, np.int64)
    seed_uid = np.asarray(seed_uid, np.int64)
    similarity = np.asarray(similarity, np.float32)
    order = np.lexsort((seed_uid, -similarity, pool_uid))
    pool_uid, seed_uid, similarity = pool_uid[order], seed_uid[order], similarity[order]
    seed_id, method, dataset = (np.asarray(a, object)[order] for a in (seed_id, method, dataset))
    cluster = np.asarray(cluster, np.int64)[order]
    starts = np.flatnonzero(np.r_[True, pool_uid[1:] != pool_uid[:-1]]) if len(pool_uid) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(pool_uid)].astype(np.int64)
    out = Provenance(pool_uid[starts], [], [], [], similarity[starts], [], defaultdict(int))
    for a, b in zip(starts, ends):
        methods = set(method[a:b])
        datasets = sorted(set(dataset[a:b]))
        for d in datasets:
            out.by_dataset[d] += 1
        seen: list[str] = []
        for sid in seed_id[a:b]:
            if sid not in seen:
                seen.append(sid)
                if len(seen) == max_links:
                    break
        cl = cluster[a:b][cluster[a:b] >= 0]
        out.method.append("+".join(x for x in METHOD_ORDER if x in methods))
        out.dataset.append(",".join(datasets))
        out.seed_ids.append(seen)
        out.cluster.append(int(cl[0]) if len(cl) else None)
    out.by_dataset = dict(out.by_dataset)
    return out
