"""Shared k-NN search (FAISS / torch) used by deduplication, decontamination and retrieval."""

import os

# faiss' OpenMP threads spin while they wait by default; where cores are shared (Ray workers,
# other jobs) that turns seconds into minutes (measured here: IVF-PQ training 2.4 s passive vs
# 74 s spinning). Must be set before faiss (libgomp) is first imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from retrieval.index import (  # noqa: E402
    KnnIndex,
    SearchParams,
    auto_spec,
    build_index,
    knn_search,
    l2_normalize,
    resolve_backend,
)

__all__ = ["KnnIndex", "SearchParams", "auto_spec", "build_index", "knn_search", "l2_normalize", "resolve_backend"]
